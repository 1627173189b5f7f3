"""Loading a model the way every script does: the model flags (--model --adapter --quantize --dtype --device),
the precision they resolve to, a local folder or hub download, the base in 16 bit or NF4, a LoRA adapter on it.

    model, tokenizer = load_model("Qwen/Qwen2.5-1.5B-Instruct", "outputs/lora_adapter", "nf4", torch.bfloat16, "cuda")
"""
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

import cpu
import lora
from quant import footprint_gb, quantize_block
from tinyreason import Decoder
from tokenizer import Tokenizer
from weights import BOOL, INTEGER, POSITIVE_INT, TEXT, check_fields, inside, read_json

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
DEFAULT_ADAPTER = "outputs/lora_adapter"  # where train.py exports its best adapter
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZE = ("nf4", "none")
RUN_FIELDS = {  # what the scripts read of the experiment_config.json beside an adapter
    **dict.fromkeys(("model", "task", "format"), TEXT), "quantize": (lambda x: x in QUANTIZE, f"one of {QUANTIZE}"),
    "calculator": BOOL, "test_samples": INTEGER}


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU computes in bf16. Without them (AVX2), bf16 is emulated and far slower."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def gpu_has_bf16(device: torch.device) -> bool:
    """Compute capability 8.0 (Ampere) and newer compute in bf16. torch.cuda.is_bf16_supported() says True on a T4
    or V100 as well, where bf16 is emulated: those need fp16 + a gradient scaler."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(device="auto", dtype="auto") -> tuple[torch.device, torch.dtype]:
    """The --device and --dtype flags as torch objects. auto: CUDA when present; bf16 where the hardware computes
    in it, fp16 on GPUs without bf16 (T4, V100), fp32 on CPUs without bf16 instructions."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device, expected cpu, cuda, cuda:1, ... or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here (a CPU build of torch, or no GPU)")
    if dtype not in (None, "auto"):
        if device.type == "cpu" and dtype == "bf16" and not cpu_has_bf16():
            warnings.warn("--dtype bf16 on a CPU without bf16 instructions is emulated, many times slower than "
                          "fp32 (docs/cpu.md); --dtype auto picks fp32 there.")
        return device, DTYPES[dtype]
    if device.type == "cuda":
        return device, torch.bfloat16 if gpu_has_bf16(device) else torch.float16
    return device, torch.bfloat16 if cpu_has_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def resolve_checkpoint(path_or_repo) -> Path:
    """A local checkpoint folder as it is, or a hub repo id ("Qwen/Qwen2.5-1.5B-Instruct") downloaded once."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json, this is not a Hugging Face checkpoint folder")
        return path
    # A hub id is "owner/name"; a string whose first folder exists here ("outputs/mdl", "./x", "/x", "~/x") is a path.
    if str(path_or_repo).count("/") != 1 or Path(str(path_or_repo).split("/")[0]).expanduser().exists():
        raise FileNotFoundError(f"{path_or_repo}: no such model folder (nor a hub repo id like 'Qwen/Qwen2.5-1.5B-Instruct')")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(path_or_repo), allow_patterns=[
            "config.json", "model*.safetensors*", "tokenizer.json", "tokenizer_config.json"]))
    except Exception as e:
        raise OSError(f"could not download {path_or_repo} from the Hugging Face hub ({type(e).__name__}: {e}). "
                      f"Offline? Pass a local checkpoint folder with --model /path/to/folder") from e


def load_base(path_or_repo, dtype=torch.bfloat16, device="cpu", quantize="nf4", inference=False) -> Decoder:
    """The frozen base model; with quantize="nf4" each block's projections become 4-bit as soon as it is loaded, and
    for inference on a CPU each block then goes through cpu.for_inference."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: expected one of {QUANTIZE}")
    def on_block(block):  # as soon as each block is loaded: one block's 16-bit copy at a time
        block = quantize_block(block) if quantize == "nf4" else block
        return cpu.for_inference(block) if inference and torch.device(device).type == "cpu" else block
    model = Decoder.from_pretrained(resolve_checkpoint(path_or_repo), dtype, device, on_block=on_block)
    print(f"loaded {path_or_repo}: {footprint_gb(model):.2f} GB of weights ({quantize} quantization, {dtype})",
          file=sys.stderr)  # stdout stays for the scripts' answers
    return model


def load_model(model, adapter, quantize, dtype, device) -> tuple[Decoder, Tokenizer]:
    """For inference: the base checkpoint (NF4 unless quantize="none") plus the LoRA adapter folder (None: the base
    alone) in the model's dtype. On a CPU, cpu.for_inference then dequantizes NF4 once and packs the weights."""
    path = resolve_checkpoint(model)
    net = load_base(path, dtype, device, quantize, inference=True)
    if adapter is not None:
        lora.load_adapter(net, adapter, dtype)
    if torch.device(device).type == "cpu":  # what loading left: the lm_head
        cpu.for_inference(net)
    return net.eval(), Tokenizer.from_pretrained(path)


@dataclass
class ModelFlags:
    """The model flags of eval.py and chat.py (rl.py has the same fields in its config)."""
    model: str = None  # checkpoint folder or hub repo id; default: the adapter's base model
    adapter: str = DEFAULT_ADAPTER  # adapter folder, or none for the base model
    quantize: Literal["nf4", "none"] = None  # base weights; default: as the adapter was trained
    device: str = "auto"  # cpu, cuda, ...; auto: cuda when available
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where the hardware computes in it
    calculator: bool = None  # after <<48/2= the calculator tool writes 24>>; default: as the adapter was trained
    compile: bool = False  # torch.compile the static decode step (CUDA graphs on a GPU); its first steps compile


def resolve_model_flags(args) -> tuple[Path | None, dict]:
    """Check the adapter folder (cheap, before any weights load) and fill unset flags from the run's
    experiment_config.json beside it, else the defaults. Returns (adapter folder or None, that run's config)."""
    run = {}
    adapter = None if str(args.adapter).lower() == "none" else Path(args.adapter)
    if adapter is not None:
        if not (adapter / "adapter_model.safetensors").is_file():
            raise SystemExit(f"--adapter: no adapter_model.safetensors in {adapter} "
                             "(train first, or pass --adapter none for the base model)")
        try:
            base = lora.read_adapter_config(adapter).get("base_model_name_or_path")
        except (OSError, ValueError) as e:
            raise SystemExit(f"--adapter: {e}")
        if (path := adapter / "experiment_config.json").is_file():
            check_fields(path, run := read_json(path), RUN_FIELDS)
        args.model = args.model or run.get("model") or base
    args.model = args.model or DEFAULT_MODEL
    args.quantize = args.quantize or run.get("quantize", "nf4")
    args.calculator = run.get("calculator", False) if args.calculator is None else args.calculator
    args.device, args.dtype = resolve_precision(args.device, args.dtype)
    return adapter, run


def model_folder(args) -> Path:
    """The --model checkpoint's folder (a hub id downloaded once); a missing one ends the script naming the flag."""
    try:
        return resolve_checkpoint(args.model)
    except OSError as e:
        raise SystemExit(f"--model: {e}")


def load_from_flags(args, adapter: Path | None) -> tuple[Decoder, Tokenizer]:
    """load_model for resolved flags."""
    model_folder(args)
    return load_model(args.model, adapter, args.quantize, args.dtype, args.device)


def context_length(folder) -> int | None:
    """The most tokens the checkpoint reads, prompt and answer together: max_position_embeddings of its config.json
    (None if it does not say)."""
    path = inside(folder, "config.json")
    check_fields(path, raw := read_json(path), {"max_position_embeddings": POSITIVE_INT})
    return raw.get("max_position_embeddings")
