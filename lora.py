"""LoRA (Hu et al., 2021) on any linear layer, 16-bit or NF4, with adapters in PEFT's format.

    x ──> W (out, in), frozen, 16-bit or NF4 ───────────────────────────┐
    └───> dropout ──> A (r, in) ──> B (out, r) ──> * alpha / r ─────── (+) ──> y

A starts Kaiming-uniform and B at zero, so a fresh adapter changes nothing. Only A and B train, in fp32:
r * (d_in + d_out) numbers per wrapped layer.

    python lora.py merge --model Qwen/Qwen2.5-1.5B-Instruct --adapter out/adapter --out out/merged
    python lora.py merge ... --out out/merged --gguf out/model.gguf --gguf_type q8_0   # also for llama.cpp, Ollama
"""
import argparse
import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from quant import dequantize, replace_linears
from tinyreason import Decoder
from weights import FINITE, POSITIVE_INT, PROBABILITY, TEXT, check_fields, inside, read_header, read_json

MERGED_MARK = "merged_from.json"  # in a merge's folder: what it was made of, and that a later merge may replace it


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, dtype=torch.float32):
        super().__init__()
        self.base, self.r, self.alpha, self.scaling = base, r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout)
        # fp32 to train whatever the base dtype: 16-bit weights lose small updates, and fp16 grads can't be unscaled.
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)  # as PEFT
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):  # x: (..., in) -> (..., out)
        # To train, A and B are fp32 and autocast runs the matmuls in the compute dtype; for inference, load.py
        # loads them in the model's dtype.
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))


def inject(model: nn.Module, targets=(), r=16, alpha=32, dropout=0.0, dtype=torch.float32) -> nn.Module:
    """Wrap every linear layer whose attribute name is in `targets` (default: all of the architecture's projections)
    in a LoRALinear; freeze everything else."""
    model.requires_grad_(False)
    targets = check_targets(model.config, targets)
    return replace_linears(model, lambda name, child: LoRALinear(child, r, alpha, dropout, dtype)
                           if name in targets and isinstance(child, nn.Linear) else None)


def check_targets(config, targets) -> tuple[str, ...]:
    """`targets`, or all projections when empty; an error names any that the architecture does not have."""
    if unknown := sorted(set(targets) - set(config.projections)):
        raise ValueError(f"target modules {unknown} not found in the model (its projections: {list(config.projections)})")
    return tuple(targets) or config.projections


def trainable_report(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # An NF4 weight packs two values per byte: count its logical (out, in).
    total = sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) else p.numel()
                for p in model.parameters())
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"


def lora_modules(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict:
    """A and B under PEFT's names (PeftModel -> LoraModel -> our model; no adapter name in saved keys), e.g.
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return {"base_model.model." + name: p for name, p in model.named_parameters() if ".lora_" in name}


def save_adapter(model: nn.Module, out_dir, base_model_name=None):
    """adapter_model.safetensors (A, B as stored, fp32) + adapter_config.json, loadable by peft.PeftModel."""
    modules = lora_modules(model)
    m = next(iter(modules.values()))
    write_adapter(out_dir, lora_state_dict(model), m.r, m.alpha, m.dropout.p,
                  sorted({name.rsplit(".", 1)[-1] for name in modules}), base_model_name)


def write_adapter(out_dir, tensors: dict, r, alpha, dropout, targets, base_model_name=None, **extra):
    """PEFT's two files for LoRA tensors under PEFT's names; `extra` config keys are ours (PEFT ignores them)."""
    from safetensors.torch import save_file
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name,
                  r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=targets,
                  fan_in_fan_out=False, inference_mode=True, use_rslora=False, use_dora=False, modules_to_save=None,
                  **extra)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              Path(out_dir) / "adapter_model.safetensors", metadata={"format": "pt"})
    (Path(out_dir) / "adapter_config.json").write_text(json.dumps(config, indent=2))


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json, checked, before any model loads; neither of the adapter's files may lie outside its
    folder (a symlink out of it is refused by name)."""
    path = inside(adapter_dir, "adapter_config.json")
    inside(adapter_dir, "adapter_model.safetensors")
    if not path.exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json, this is not a LoRA adapter folder")
    config = read_json(path)
    # Plain LoRA on named modules only: these PEFT options change the math or add weights beyond A and B.
    used = [k for k in ("use_dora", "use_rslora", "modules_to_save", "layers_to_transform", "rank_pattern",
                        "alpha_pattern") if config.get(k)] + (["bias"] if config.get("bias", "none") != "none" else [])
    targets = config.get("target_modules")
    if config.get("peft_type") != "LORA" or type(targets) is not list or not all(type(t) is str for t in targets) \
            or used:
        raise ValueError(f"{path}: not a plain LoRA adapter (peft_type {config.get('peft_type')!r}, target_modules "
                         f"{targets!r}, unsupported options {used})")
    if missing := [k for k in ("r", "lora_alpha") if config.get(k) is None]:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    check_fields(path, config, dict(r=POSITIVE_INT, lora_alpha=FINITE, lora_dropout=PROBABILITY,
                                    base_model_name_or_path=TEXT))
    return config


def load_adapter(model: nn.Module, adapter_dir, dtype=torch.float32) -> nn.Module:
    """Inject the adapter's LoRA layers into `model` and load A, B (ours or PEFT-saved), the file checked first
    (read_adapter). `dtype`: fp32 to train on, the model's own for inference."""
    config = read_adapter_config(adapter_dir)
    r, targets = config["r"], check_targets(model.config, config["target_modules"])
    layers = {name: m for name, m in model.named_modules()  # what inject will wrap
              if name.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear)}
    tensors = read_adapter(adapter_dir, layers, r)
    inject(model, targets, r, config["lora_alpha"], config.get("lora_dropout") or 0.0, dtype)
    with torch.no_grad():
        for key, p in lora_state_dict(model).items():
            p.copy_(tensors[key])
    return model


def read_adapter(adapter_dir, layers: dict, r: int) -> dict[str, torch.Tensor]:
    """The A and B of `layers` (name -> the nn.Linear each adapts) at rank r from adapter_dir's
    adapter_model.safetensors under PEFT's names: every name and shape checked from the file's header before
    anything is allocated, and refused if a value is not finite (a diverged run's adapter is never used)."""
    path = inside(adapter_dir, "adapter_model.safetensors")
    wanted = {f"base_model.model.{name}.lora_{ab}.weight": shape for name, m in layers.items()
              for ab, shape in (("A", (r, m.in_features)), ("B", (m.out_features, r)))}
    stored = read_header(path)
    for key in sorted(set(stored) | set(wanted)):
        got, want = stored[key].shape if key in stored else "absent", wanted.get(key, "absent")
        if got != want:
            raise ValueError(f"{path}: tensor {key} is {got} in the adapter but {want} in the model "
                             f"(given r={r} and the target_modules of adapter_config.json)")
    tensors = {key: t.read() for key, t in stored.items()}
    if bad := next((key for key, t in tensors.items() if not torch.isfinite(t).all()), None):
        raise ValueError(f"{path}: tensor {bad} holds non-finite values")
    return tensors


def merged_linear(m: LoRALinear) -> nn.Linear:
    """A plain Linear with W + (alpha/r) B A, summed in fp32. An NF4 base is dequantized to its 16-bit dtype first:
    4-bit levels cannot hold the sum, so the merged layer is 16-bit."""
    w = dequantize(m.base)  # (out, in)
    delta = m.scaling * (m.lora_B.weight.detach().float() @ m.lora_A.weight.detach().float())  # (out, r) @ (r, in)
    layer = nn.Linear(m.base.in_features, m.base.out_features, bias=m.base.bias is not None, device="meta")
    layer.weight, layer.bias = nn.Parameter((w.float() + delta).to(w.dtype), requires_grad=False), m.base.bias
    return layer


def merge(model: nn.Module) -> nn.Module:
    """Each LoRALinear replaced by its merged_linear, in place."""
    return replace_linears(model, lambda name, m: merged_linear(m) if isinstance(m, LoRALinear) else None)


def export_merged(src: Path, adapter_dir, out_dir, dtype=torch.bfloat16):
    """Write base (a checkpoint folder) + adapter as one Hugging Face checkpoint folder (model.safetensors,
    config.json, tokenizer files) that transformers, vLLM or llama.cpp's GGUF converter read like the base's."""
    from safetensors.torch import save_file
    read_adapter_config(adapter_dir)  # a bad adapter fails before the base model is loaded
    src, out = Path(src), Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MERGED_MARK).exists():
        raise ValueError(f"--out {out} exists and is not an earlier merge: choose another --out")
    tokenizer_files = [inside(src, f.name) for f in src.iterdir() if f.name.startswith(  # none through a link out
        ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template"))]
    model = merge(load_adapter(Decoder.from_pretrained(src, dtype=dtype, device="cpu"), adapter_dir))
    # named_parameters lists a tied lm_head once, as the embedding: HF's layout, which transformers re-ties.
    tensors = {k: v.detach().contiguous() for k, v in model.named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["dtype" if "dtype" in config else "torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in tokenizer_files:
        (out / f.name).write_bytes(f.read_bytes())
    (out / MERGED_MARK).write_text(json.dumps({"model": str(src), "adapter": str(adapter_dir)}))
    print(f"merged {adapter_dir} into {src} ({str(dtype).removeprefix('torch.')}) -> {out}")


def main(argv=None):
    from checkpoint import overlap
    from export import GGUF_TYPES, export_gguf
    from load import resolve_checkpoint  # a hub id is downloaded once
    parser = argparse.ArgumentParser(description="Fold a LoRA adapter into its base model: a Hugging Face folder, "
                                                 "and optionally a GGUF file for llama.cpp and Ollama.")
    parser.add_argument("command", choices=["merge"])
    parser.add_argument("--model", required=True, help="base checkpoint folder or hub repo id")
    parser.add_argument("--adapter", required=True, help="folder with adapter_config.json + adapter_model.safetensors")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--gguf", help="also write the merge as this .gguf file (docs/export.md)")
    parser.add_argument("--gguf_type", choices=GGUF_TYPES, help="the GGUF's 2-D weights (default: f16)")
    args = parser.parse_args(argv)
    if args.gguf_type and not args.gguf:
        parser.error("--gguf_type needs --gguf FILE.gguf")
    if args.gguf and importlib.util.find_spec("gguf") is None:
        parser.error("--gguf needs the gguf package: pip install gguf")
    if args.gguf and (Path(args.gguf).suffix != ".gguf" or Path(args.gguf).is_dir()):
        parser.error(f"--gguf {args.gguf}: expected the name of a file to write, ending in .gguf")
    try:
        model = resolve_checkpoint(args.model)
        inputs = {"--model": model, "--adapter": args.adapter}
        if problem := overlap("--out", args.out, inputs) or args.gguf and overlap("--gguf", args.gguf, inputs):
            raise ValueError(problem)
        export_merged(model, args.adapter, args.out, getattr(torch, args.dtype))
        if args.gguf:
            Path(args.gguf).parent.mkdir(parents=True, exist_ok=True)
            export_gguf(args.out, args.gguf, args.gguf_type or "f16")
    except (OSError, ValueError) as e:
        raise SystemExit(f"lora.py: {e}")


if __name__ == "__main__":
    main()
