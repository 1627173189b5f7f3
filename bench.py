"""Benchmark TinyReason against its peers, transformers + PEFT + bitsandbytes, on one machine in one run.

    python bench.py --model /path/to/qwen2-folder --data path/to/gsm8k/train.jsonl

Both sides get the same checkpoint, the same GSM8K sequences and the same recipe: QLoRA training (NF4 base with
double quantization, r=16 on all seven projections, the same compute dtype, AdamW) and batched greedy generation from the
16-bit model, until each row's <|im_end|> or gen_tokens. Each side runs in its own process, so each peak memory figure
is one side's alone, and the two take turns step by step, so a machine that slows down for a while slows both.
"""
import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from load import resolve_precision
from loop import peak_memory_gb


@dataclass
class BenchConfig:
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"
    data: str = "openai/gsm8k"  # or a local .jsonl with question/answer records
    steps: int = 3  # timed training steps per side, after one untimed warm-up step (0: no training)
    batch_size: int = 2
    seq_len: int = 256  # every training sequence is cut to this many tokens
    gen_batch: int = 16
    gen_tokens: int = 256  # at most, per prompt: GSM8K answers end between about 100 and 300 tokens
    rounds: int = 2  # timed generations per side, after one untimed warm-up (0: no generation)
    no_peer: bool = False
    device: str = "auto"
    dtype: str = "auto"  # compute dtype of both sides; auto: bf16 where the hardware has it, else fp32/fp16


def training_batches(cfg, tokenizer):
    from data import build_example, collate, format_example, load_records
    records = [r for r in load_records(cfg.data) if format_example(r)][:cfg.batch_size * (cfg.steps + 1)]
    examples = [{k: v[:cfg.seq_len] for k, v in build_example(tokenizer, r).items()} for r in records]
    return [collate(examples[i:i + cfg.batch_size], tokenizer.pad_id) for i in range(0, len(examples), cfg.batch_size)]


def gen_prompts(cfg, tokenizer):
    from data import load_records
    records = load_records(cfg.data)[:cfg.gen_batch]
    return [tokenizer.apply_chat([{"role": "user", "content": r["question"]}]) for r in records]


def adamw_steps(model, loss_of, cfg, device, dtype):
    """A function that runs one AdamW step on training batch i and returns its real tokens; the two sides differ
    only in `loss_of(batch)`, the mean loss over the batch's target tokens."""
    from tokenizer import Tokenizer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    batches = training_batches(cfg, Tokenizer.from_pretrained(cfg.model))

    def step(i):
        batch = {k: v.to(device) for k, v in batches[i].items()}
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            loss = loss_of(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum())
    return step


def train_ours(cfg, device, dtype):
    import lora
    from load import load_base
    from train import compute_loss
    model = lora.inject(load_base(cfg.model, dtype, device, quantize="nf4"), r=16, alpha=32).train()

    def loss_of(batch):
        loss_sum, n = compute_loss(model, batch)
        return loss_sum / n
    return adamw_steps(model, loss_of, cfg, device, dtype)


def train_peer(cfg, device, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from tinyreason import PROJECTIONS, resolve_checkpoint
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(cfg.model), quantization_config=nf4,
                                                 dtype=dtype, device_map=str(device))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(PROJECTIONS)))
    return adamw_steps(model, lambda batch: model(**batch).loss, cfg, device, dtype)  # full-vocabulary logits


def gen_ours(cfg, device, dtype):
    from generate import generate
    from load import load_base
    from tokenizer import Tokenizer
    model, tok = load_base(cfg.model, dtype, device, quantize="none"), Tokenizer.from_pretrained(cfg.model)
    prompts = gen_prompts(cfg, tok)
    return lambda i: sum(map(len, generate(model, tok, prompts, cfg.gen_tokens if i else 2)))


def gen_peer(cfg, device, dtype):
    from transformers import AutoModelForCausalLM
    from generate import left_pad
    from tinyreason import resolve_checkpoint
    from tokenizer import Tokenizer
    model = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(cfg.model), dtype=dtype).to(device).eval()
    tok = Tokenizer.from_pretrained(cfg.model)
    ids, mask = left_pad(gen_prompts(cfg, tok), tok.pad_id, device)
    T = ids.shape[1]
    stop = (tok.im_end_id, tok.pad_id)

    @torch.inference_mode()
    def run(i):
        out = model.generate(ids, attention_mask=mask.long(), max_new_tokens=cfg.gen_tokens if i else 2, do_sample=False,
                             eos_token_id=list(stop), pad_token_id=tok.pad_id)[:, T:].tolist()
        return sum(next((j for j, t in enumerate(row) if t in stop), len(row)) for row in out)  # up to each row's stop
    return run


WORKERS = {"train_ours": train_ours, "train_peer": train_peer, "gen_ours": gen_ours, "gen_peer": gen_peer}


def serve(name, cfg):
    """Worker process: set up one side, then run each item number read from stdin and answer
    [tokens, seconds, peak GB] on stdout (everything else the libraries print goes to stderr)."""
    reply, sys.stdout = sys.stdout, sys.stderr
    device, dtype = resolve_precision(cfg.device, cfg.dtype)
    run = WORKERS[name](cfg, device, dtype)
    for line in sys.stdin:
        start = time.perf_counter()
        tokens = run(int(line))
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(json.dumps([tokens, time.perf_counter() - start, peak_memory_gb(device)]), file=reply, flush=True)


def lockstep(names, cfg, n_items):
    """Start one worker process per side (so each peak memory figure is one side's alone), then run item i on
    each side in turn: a slow spell of a shared machine hits both alike. Item 0 warms up and is not counted.
    Returns {name: (tokens per second, peak GB)}."""
    cmd = [sys.executable, __file__, "--cfg", json.dumps(asdict(cfg)), "--worker"]
    procs = {name: subprocess.Popen(cmd + [name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name in names}
    totals = {name: [0, 0.0, 0.0] for name in names}
    for i in range(n_items):
        for name, proc in procs.items():
            proc.stdin.write(f"{i}\n")
            proc.stdin.flush()
            if not (line := proc.stdout.readline()):
                raise SystemExit(f"bench: worker {name} failed (exit {proc.wait()}), see its output above")
            tokens, seconds, gb = json.loads(line)
            print(f"bench: {name} {'warm-up' if i == 0 else f'run {i}'}: {tokens} tokens in {seconds:.1f} s", flush=True)
            totals[name] = [totals[name][0] + tokens * (i > 0), totals[name][1] + seconds * (i > 0), gb]
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    return {name: (tokens / seconds, gb) for name, (tokens, seconds, gb) in totals.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in asdict(BenchConfig()).items():
        if isinstance(value, bool):  # --no_peer or --no-peer
            p.add_argument(f"--{name}", f"--{name.replace('_', '-')}", action="store_true")
        else:
            p.add_argument(f"--{name}", type=type(value), default=value)
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    args = vars(p.parse_args())
    worker, cfg_json = args.pop("worker"), args.pop("cfg")
    if worker:
        return serve(worker, BenchConfig(**json.loads(cfg_json)))
    cfg = BenchConfig(**args)
    print(f"bench: {cfg} -> {resolve_precision(cfg.device, cfg.dtype)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    sides = ("ours",) if cfg.no_peer else ("ours", "peer")
    r = {**(lockstep([f"train_{s}" for s in sides], cfg, cfg.steps + 1) if cfg.steps else {}),
         **(lockstep([f"gen_{s}" for s in sides], cfg, cfg.rounds + 1) if cfg.rounds else {})}
    nan = (float("nan"), float("nan"))
    (tr, tr_gb), (ptr, ptr_gb) = r.get("train_ours", nan), r.get("train_peer", nan)
    (gen, gen_gb), (pgen, pgen_gb) = r.get("gen_ours", nan), r.get("gen_peer", nan)
    print(f"\n| {'measure':34} | {'TinyReason':>10} | {'peer':>10} | {'ratio':>6} |")
    print(f"| {'-' * 34} | {'-' * 10}:| {'-' * 10}:| {'-' * 6}:|")
    for label, ours, peer in [("QLoRA train tokens/s", tr, ptr), ("QLoRA train peak memory (GB)", tr_gb, ptr_gb),
                              ("greedy generation new tokens/s", gen, pgen), ("generation peak memory (GB)", gen_gb, pgen_gb)]:
        print(f"| {label:34} | {ours:10.2f} | {peer:10.2f} | {ours / peer:6.2f} |")
    print(f"train_tok_s={tr:.1f} peer_train_tok_s={ptr:.1f} ratio={tr / ptr:.2f} peak_gb={tr_gb:.2f} "
          f"peer_peak_gb={ptr_gb:.2f} gen_tok_s={gen:.1f} peer_gen_tok_s={pgen:.1f} gen_ratio={gen / pgen:.2f}")


if __name__ == "__main__":
    main()
