"""Benchmark TinyReason against its peers, transformers + PEFT + bitsandbytes, on one machine in one run.

    python bench.py --model /path/to/qwen2-folder --steps 3 --batch_size 2 --seq_len 256 --gen_batch 16 --gen_tokens 64

Both sides get the same checkpoint, the same GSM8K sequences and the same recipe: QLoRA training (NF4 base with
double quantization, r=16 on all seven projections, the same compute dtype, AdamW) and batched greedy generation from the
16-bit model. Every measurement runs in a fresh subprocess, so each peak memory figure belongs to one side alone.
"""
import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from tinyreason import resolve_precision


@dataclass
class BenchConfig:
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"
    data: str = "openai/gsm8k"  # or a local .jsonl such as ../shared/gsm8k/train.jsonl
    steps: int = 3  # timed training steps, after one untimed warm-up step
    batch_size: int = 2
    seq_len: int = 256  # every training sequence is cut to this many tokens
    gen_batch: int = 16
    gen_tokens: int = 64
    no_peer: bool = False
    device: str = "auto"
    dtype: str = "auto"  # compute dtype of both sides; auto: bf16 where the hardware has it, else fp32/fp16


def peak_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    status = open("/proc/self/status").read()  # VmHWM: the process's peak resident memory
    return int(status.split("VmHWM:")[1].split()[0]) / 1e6


def training_batches(cfg, tokenizer):
    from data import build_example, collate, format_example, load_records
    records = [r for r in load_records(cfg.data) if format_example(r)][:cfg.batch_size * (cfg.steps + 1)]
    examples = [{k: v[:cfg.seq_len] for k, v in build_example(tokenizer, r).items()} for r in records]
    return [collate(examples[i:i + cfg.batch_size], tokenizer.pad_id) for i in range(0, len(examples), cfg.batch_size)]


def gen_prompts(cfg, tokenizer):
    from data import load_records
    records = load_records(cfg.data)[:cfg.gen_batch]
    return [tokenizer.apply_chat([{"role": "user", "content": r["question"]}]) for r in records]


def timed_steps(step, batches, device):
    """Run one warm-up step, then time the rest; returns (tokens per second, peak GB)."""
    step(batches[0])
    start, tokens = time.perf_counter(), 0
    for batch in batches[1:]:
        step(batch)
        tokens += int(batch["attention_mask"].sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start), peak_gb(device)


def train_ours(cfg, device, dtype):
    import lora
    from tinyreason import Qwen2, Tokenizer
    from train import compute_loss
    model = lora.inject(Qwen2.from_pretrained(cfg.model, dtype, device, quantize="nf4"), r=16, alpha=32).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step(batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            loss, n = compute_loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed_steps(step, training_batches(cfg, Tokenizer.from_pretrained(cfg.model)), device)


def train_peer(cfg, device, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from tinyreason import PROJECTIONS, Tokenizer, resolve_checkpoint
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(cfg.model), quantization_config=nf4,
                                                 dtype=dtype, device_map=str(device))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(PROJECTIONS)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step(batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss  # mean over target tokens, full-vocabulary logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed_steps(step, training_batches(cfg, Tokenizer.from_pretrained(cfg.model)), device)


def timed_generation(run, device):
    run(2)  # warm-up
    start = time.perf_counter()
    new_tokens = run(None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start), peak_gb(device)


def gen_ours(cfg, device, dtype):
    from tinyreason import Qwen2, Tokenizer, generate
    model, tok = Qwen2.from_pretrained(cfg.model, dtype, device), Tokenizer.from_pretrained(cfg.model)
    prompts = gen_prompts(cfg, tok)
    return timed_generation(lambda n: sum(map(len, generate(model, tok, prompts, n or cfg.gen_tokens))), device)


def gen_peer(cfg, device, dtype):
    from transformers import AutoModelForCausalLM
    from tinyreason import Tokenizer, resolve_checkpoint
    model = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(cfg.model), dtype=dtype).to(device).eval()
    tok = Tokenizer.from_pretrained(cfg.model)
    prompts = gen_prompts(cfg, tok)
    T = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (T - len(p)) + p for p in prompts], device=device)
    mask = (ids != tok.pad_id).long()
    stop = (tok.im_end_id, tok.pad_id)

    def run(n):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n or cfg.gen_tokens, do_sample=False,
                             eos_token_id=list(stop), pad_token_id=tok.pad_id)[:, T:].tolist()
        return sum(next((i for i, t in enumerate(row) if t in stop), len(row)) for row in out)  # up to each row's stop
    with torch.inference_mode():
        return timed_generation(run, device)


WORKERS = {"train_ours": train_ours, "train_peer": train_peer, "gen_ours": gen_ours, "gen_peer": gen_peer}


def measure(name, cfg):
    """Run one worker in a fresh Python process; returns (tokens/s, peak GB)."""
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--cfg", json.dumps(asdict(cfg))],
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: worker {name} failed (exit {proc.returncode}), see its output above")
    tok_s, gb = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"bench: {name}: {tok_s:.2f} tokens/s, peak {gb:.2f} GB", flush=True)
    return tok_s, gb


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in asdict(BenchConfig()).items():
        if isinstance(value, bool):
            p.add_argument(f"--{name}", action="store_true")
        else:
            p.add_argument(f"--{name}", type=type(value), default=value)
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    args = vars(p.parse_args())
    worker, cfg_json = args.pop("worker"), args.pop("cfg")
    if worker:
        cfg = BenchConfig(**json.loads(cfg_json))
        print(json.dumps(WORKERS[worker](cfg, *resolve_precision(cfg.device, cfg.dtype))))
        return
    cfg = BenchConfig(**args)
    print(f"bench: {cfg} -> {resolve_precision(cfg.device, cfg.dtype)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    r = {name: measure(name, cfg) for name in WORKERS if not (cfg.no_peer and name.endswith("peer"))}
    nan = (float("nan"), float("nan"))
    (tr, tr_gb), (ptr, ptr_gb) = r["train_ours"], r.get("train_peer", nan)
    (gen, gen_gb), (pgen, pgen_gb) = r["gen_ours"], r.get("gen_peer", nan)
    print(f"\n| {'measure':34} | {'TinyReason':>10} | {'peer':>10} | {'ratio':>6} |")
    print(f"| {'-' * 34} | {'-' * 10}:| {'-' * 10}:| {'-' * 6}:|")
    for label, ours, peer in [("QLoRA train tokens/s", tr, ptr), ("QLoRA train peak memory (GB)", tr_gb, ptr_gb),
                              ("greedy generation new tokens/s", gen, pgen), ("generation peak memory (GB)", gen_gb, pgen_gb)]:
        print(f"| {label:34} | {ours:10.2f} | {peer:10.2f} | {ours / peer:6.2f} |")
    print(f"train_tok_s={tr:.1f} peer_train_tok_s={ptr:.1f} ratio={tr / ptr:.2f} peak_gb={tr_gb:.2f} "
          f"peer_peak_gb={ptr_gb:.2f} gen_tok_s={gen:.1f} peer_gen_tok_s={pgen:.1f} gen_ratio={gen / pgen:.2f}")


if __name__ == "__main__":
    main()
