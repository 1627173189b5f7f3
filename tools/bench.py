"""Benchmark TinyReason against its peers, transformers + PEFT + bitsandbytes (+ TRL for RL), on one machine in one run.

    python tools/bench.py --model /path/to/qwen2-folder --data path/to/gsm8k/train.jsonl
    python tools/bench.py --model ... --data ... --steps 0 --rounds 0 --rl_steps 2   # RL only: one GRPO step each side
    python tools/bench.py --model ... --data ... --baseline ../old-checkout      # this code against another version

Both sides get the same checkpoint, the same GSM8K sequences and the same recipe: QLoRA training (NF4 base with
double quantization, r=16 on all seven projections, the same compute dtype, AdamW) and batched greedy generation from the
16-bit model, until each row's <|im_end|> or gen_tokens. Each side runs in its own process, so each peak memory figure
is one side's alone, and the two take turns step by step, so a machine that slows down for a while slows both.

RL (--rl_steps N): one GRPO step (rollout + update) per item on a fresh LoRA over the NF4 base. Ours is rl.py's
setup + rl_step (grpo preset); the peer is TRL's GRPOTrainer + PEFT + bitsandbytes, its own training loop held to one
optimizer step per item by a callback. Both: step i's rl_prompts questions (the i-th slice of --data) x rl_group
samples at rl_temperature, top_p 1, up to rl_tokens; reward = grade.py's correctness; advantages z-scored in each group;
clipped ratio (eps 0.2) averaged per sequence, then over the step's sequences (our loss_agg "seq" = TRL's loss_type
"grpo"); beta 0, mu 1, rl_micro_batch completions per backward, gradient checkpointing, lr 1e-5, AdamW, fp32 LoRA
weights. Rollout = generation + rewards + advantages, its tokens/s counting completion tokens (stop token included);
update = the rest of the step, counting prompt + completion tokens. Sampled lengths differ between the sides (see new
tokens a step). Still different by design: we share a prompt's prefill among its G samples and drop finished rows;
transformers' generate prefills all P x G rows and decodes them all until the longest ends. The last line's rl_ratio
is the peer's step seconds / ours (> 1: ours is faster), like ratio and gen_ratio for training and generation.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from pathlib import Path

import torch

# The TinyReason checkout this file belongs to, or BENCH_CODE's: eval's --baseline side runs this file on older code.
sys.path.insert(0, os.environ.get("BENCH_CODE") or str(Path(__file__).resolve().parents[1]))
from load import resolve_precision  # noqa: E402
from loop import peak_memory_gb  # noqa: E402


@dataclass
class BenchConfig:
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"
    data: str = "openai/gsm8k"  # or a local .jsonl with question/answer records
    steps: int = 3  # timed training steps per side, after one untimed warm-up step (0: no training)
    batch_size: int = 2
    seq_len: int = 256  # every training sequence is cut to this many tokens
    gen_batch: int = 16  # prompts generated at once
    gen_sweep: str = ""  # e.g. 1,16,64: one generation lockstep per batch size, a table with the limit beside each
    eval_problems: int = 0  # > 0: a whole greedy eval of this many boxed prompts, gen_batch rows at once (ours
    # refills the slots of ended rows with the next prompts; the peer generates them gen_batch at a time, as eval
    # loops do)
    gen_tokens: int = 256  # at most, per prompt: GSM8K answers end between about 100 and 300 tokens
    rounds: int = 2  # timed generations per side, after one untimed warm-up (0: no generation)
    no_peer: bool = False
    device: str = "auto"
    dtype: str = "auto"  # compute dtype of both sides; auto: bf16 where the hardware has it, else fp32/fp16
    rl_steps: int = 0  # timed GRPO steps per side, after one untimed warm-up step (0: no RL; the peer needs trl)
    rl_prompts: int = 4  # questions per GRPO step
    rl_group: int = 4  # G: samples per question
    rl_tokens: int = 128  # at most, per completion
    rl_temperature: float = 1.0
    rl_micro_batch: int = 8  # completions per forward/backward of the update (rl.py's default); divides prompts x group
    compile: bool = False  # ours compiles its static decode step (generation, eval, RL rollouts) in the warm-up
    baseline: str = ""  # another TinyReason checkout: its own side stands in for the peer (an A/B of two versions)


def training_batches(cfg, tokenizer):
    from data import build_example, collate, format_example, load_records
    records = [r for r in load_records(cfg.data) if format_example(r)][:cfg.batch_size * (cfg.steps + 1)]
    examples = [{k: v[:cfg.seq_len] for k, v in build_example(tokenizer, r).items()} for r in records]
    return [collate(examples[i:i + cfg.batch_size], tokenizer.pad_id) for i in range(0, len(examples), cfg.batch_size)]


def gen_prompts(cfg, tokenizer, n=None):
    """The first n (default gen_batch) questions of --data as chat prompts; with n, as eval.py --prompt_style boxed
    writes them, longest first as it orders them."""
    from data import load_records, prompt_ids
    records = load_records(cfg.data)[:n or cfg.gen_batch]
    if n is None:
        return [tokenizer.apply_chat([{"role": "user", "content": r["question"]}]) for r in records]
    return sorted((prompt_ids(tokenizer, r["question"], "boxed") for r in records), key=len, reverse=True)


def adamw_steps(model, loss_of, cfg, device, dtype):
    """A function that runs one AdamW step on training batch i and returns its real tokens; the two sides differ
    only in `loss_of(batch)`, the mean loss over the batch's target tokens."""
    from load import resolve_checkpoint
    from tokenizer import Tokenizer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    batches = training_batches(cfg, Tokenizer.from_pretrained(resolve_checkpoint(cfg.model)))

    def step(i):
        batch = {k: v.to(device) for k, v in batches[i].items()}
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            loss = loss_of(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"tokens": int(batch["attention_mask"].sum())}
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


def peer_qlora(cfg, device, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from load import resolve_checkpoint
    from tinyreason import Config
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    projections = Config.from_json(resolve_checkpoint(cfg.model) / "config.json").projections
    model = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(cfg.model), quantization_config=nf4,
                                                 dtype=dtype, device_map=str(device))
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(projections)))


def train_peer(cfg, device, dtype):
    model = peer_qlora(cfg, device, dtype)
    return adamw_steps(model, lambda batch: model(**batch).loss, cfg, device, dtype)  # full-vocabulary logits


def compiled(cfg) -> dict:
    """generate's compile flag with --compile, where the version has one (a --baseline without it runs eager)."""
    import inspect
    from generate import generate
    return {"compile": True} if cfg.compile and "compile" in inspect.signature(generate).parameters else {}


def gen_ours(cfg, device, dtype):
    from generate import generate, stopped
    from load import load_model
    model, tok = load_model(cfg.model, None, "none", dtype, device)  # as eval.py and chat.py load it
    prompts, kw = gen_prompts(cfg, tok), compiled(cfg)
    return lambda i: {"tokens": sum(len(row) - stopped(row, tok)  # up to the stops, as the peer's count
                                    for row in generate(model, tok, prompts, cfg.gen_tokens if i else 2, **kw)[0])}


def hf_side(cfg, device, dtype):
    """transformers' model of --model and our tokenizer of it (the same prompts as ours)."""
    from transformers import AutoModelForCausalLM
    from load import resolve_checkpoint
    from tokenizer import Tokenizer
    model = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(cfg.model), dtype=dtype).to(device).eval()
    return model, Tokenizer.from_pretrained(resolve_checkpoint(cfg.model))


@torch.inference_mode()
def hf_new_tokens(model, tok, prompts, max_new_tokens) -> int:
    """transformers' greedy `generate` of the prompts as one left-padded batch: its new tokens up to the stops."""
    from generate import left_pad
    ids, mask = left_pad(prompts, tok.pad_id, model.device)
    out = model.generate(ids, attention_mask=mask.long(), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(tok.stop_ids), pad_token_id=tok.pad_id)[:, ids.shape[1]:].tolist()
    return sum(next((j for j, t in enumerate(row) if t in tok.stop_ids), len(row)) for row in out)


def gen_peer(cfg, device, dtype):
    model, tok = hf_side(cfg, device, dtype)
    prompts = gen_prompts(cfg, tok)
    return lambda i: {"tokens": hf_new_tokens(model, tok, prompts, cfg.gen_tokens if i else 2)}


def eval_ours(cfg, device, dtype):
    import inspect
    from generate import generate, stopped
    from load import load_model
    model, tok = load_model(cfg.model, None, "none", dtype, device)
    prompts, kw = gen_prompts(cfg, tok, cfg.eval_problems), compiled(cfg)
    if "batch_size" in inspect.signature(generate).parameters:
        def run_all(prompts, n):
            return generate(model, tok, prompts, n, batch_size=cfg.gen_batch, **kw)[0]
    else:  # a version without refilling (--baseline): eval.py's loop over batches
        def run_all(prompts, n):
            return [row for i in range(0, len(prompts), cfg.gen_batch)
                    for row in generate(model, tok, prompts[i:i + cfg.gen_batch], n)[0]]
    return lambda i: {"tokens": sum(len(row) - stopped(row, tok) for row in run_all(
        prompts if i else prompts[:cfg.gen_batch], cfg.gen_tokens if i else 2))}


def eval_peer(cfg, device, dtype):
    model, tok = hf_side(cfg, device, dtype)
    prompts = gen_prompts(cfg, tok, cfg.eval_problems)
    return lambda i: {"tokens": sum(hf_new_tokens(model, tok, prompts[start:start + cfg.gen_batch],
                                                  cfg.gen_tokens if i else 2)
                                    for start in range(0, len(prompts) if i else cfg.gen_batch, cfg.gen_batch))}


def rl_questions(cfg):
    """The RL steps' GSM8K records in file order: step i (0: the warm-up) takes the i-th slice of rl_prompts."""
    from data import gold_answer, load_records
    records = [r for r in load_records(cfg.data) if isinstance(r.get("question"), str) and gold_answer(r)]
    return records[:cfg.rl_prompts * (cfg.rl_steps + 1)]


def rl_ours(cfg, device, dtype):
    """rl.py's setup and rl_step, for `--adapter none --algo grpo` at the bench's sizes, as rl.py would run it."""
    import data
    import loop
    import rl
    flags = dict(model=cfg.model, adapter="none", data=cfg.data, algo="grpo", group_size=cfg.rl_group,
                 prompts_per_step=cfg.rl_prompts, micro_batch_size=cfg.rl_micro_batch, max_new_tokens=cfg.rl_tokens,
                 temperature=cfg.rl_temperature, reward_weights="1.0,0.0,0.0", beta=0.0, ppo_epochs=1, optim="adamw",
                 learning_rate=1e-5, eval_samples=0, device=cfg.device, dtype=cfg.dtype)
    rcfg = rl.parse_config([f"--{k}={v}" for k, v in flags.items()] + ["--compile"] * cfg.compile)
    model, tok, _, _, params, optimizer, device, dtype = rl.setup(rcfg)
    autocast, scaler = loop.amp(device, dtype)
    questions, P, G = rl_questions(cfg), cfg.rl_prompts, cfg.rl_group

    def run(i):
        batch = questions[i * P:(i + 1) * P]
        s, _ = rl.rl_step(model, tok, optimizer, scaler, params, batch, None, rcfg, i, device, autocast,
                          rcfg.learning_rate)
        new = round(s["len_mean"] * P * G)
        prompt = G * sum(len(data.prompt_ids(tok, q["question"], rcfg.format)) for q in batch)
        return {"new_tokens": new, "rollout_s": s["t_gen"], "update_tokens": prompt + new,
                "update_s": s["t_ref"] + s["t_update"]}
    return run


def rl_peer(cfg, device, dtype):
    """TRL's GRPOTrainer on the same recipe. trainer.train() runs in a thread where each optimizer step waits for
    the bench's next item (a callback), so TRL's own loop is timed; its rollout is _generate_and_score_completions."""
    import queue
    import tempfile
    import threading
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import data
    import grade
    from generate import stopped
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(cfg.model)

    def correct(completions, answer, completion_ids, **_):
        return [grade.rewards(c[0]["content"], gold, "tinyreason", stopped(ids, tok))["correct"]
                for c, gold, ids in zip(completions, answer, completion_ids)]

    args = GRPOConfig(  # one optimizer step = rl_prompts x rl_group completions, as in rl.py's step
        num_generations=cfg.rl_group, per_device_train_batch_size=cfg.rl_micro_batch,
        gradient_accumulation_steps=cfg.rl_prompts * cfg.rl_group // cfg.rl_micro_batch,
        max_completion_length=cfg.rl_tokens, temperature=cfg.rl_temperature, top_p=1.0, top_k=0, use_vllm=False,
        beta=0.0, num_iterations=1, epsilon=0.2, scale_rewards="group", loss_type="grpo",  # loss_agg "seq"
        learning_rate=1e-5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        gradient_checkpointing=True, use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, max_steps=cfg.rl_steps + 1, shuffle_dataset=False, seed=3407,
        output_dir=tempfile.mkdtemp(), logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True)
    dataset = Dataset.from_list([{"prompt": data.prompt_messages(q["question"]), "answer": data.gold_answer(q)}
                                 for q in rl_questions(cfg)])
    go, done, rollout = queue.Queue(), queue.Queue(), {}

    class Lockstep(TrainerCallback):
        def on_step_begin(self, *_, **__):
            go.get()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            done.put({**rollout, "update_s": time.perf_counter() - self.start - rollout["rollout_s"]})

    trainer = GRPOTrainer(peer_qlora(cfg, device, dtype), correct, args, dataset, callbacks=[Lockstep()])
    for p in trainer.model.parameters():  # TRL stores a quantized model's LoRA weights in bf16; ours are fp32
        if p.requires_grad:
            p.data = p.data.float()
    generate_and_score = trainer._generate_and_score_completions

    def timed(inputs):
        start, out = time.perf_counter(), generate_and_score(inputs)
        new, prompt = int(out["completion_mask"].sum()), int(out["prompt_mask"].sum())
        rollout.update(new_tokens=new, rollout_s=time.perf_counter() - start, update_tokens=prompt + new)
        return out
    trainer._generate_and_score_completions = timed

    def train():
        try:
            trainer.train()
        except BaseException as e:  # to the bench's thread, which waits for the step
            done.put(e)
    threading.Thread(target=train, daemon=True).start()

    def run(i):
        go.put(i)
        if isinstance(out := done.get(), BaseException):
            raise out
        return out
    return run


def hardware_limit(cfg, device, dtype) -> dict:
    """How fast a batch-`gen_batch` greedy decoding step could go here: it reads every weight but the embedding rows
    once (bytes / the read bandwidth measured now) and does 2 FLOPs per weight per row (/ the GEMM throughput
    measured now, square matrices in the compute dtype). The KV cache and activations are left out: small here."""
    from load import resolve_checkpoint
    from tinyreason import Decoder, Config
    config = Config.from_json(resolve_checkpoint(cfg.model) / "config.json")
    with torch.device("meta"):
        model = Decoder(config)
    n = sum(p.numel() for p in model.parameters())
    n -= 0 if config.tie_word_embeddings else model.model.embed_tokens.weight.numel()  # lm_head reads it if tied

    def best(f, repeats=5):
        times = []
        for _ in range(repeats + 1):  # the first run warms up
            start = time.perf_counter()
            f()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times[1:])
    x = torch.ones(2**27, device=device)  # 512 MiB of fp32
    read_gb_s = x.numel() * 4 / best(x.sum) / 1e9
    a = torch.ones(4096, 4096, device=device, dtype=dtype)
    tflops = 2 * 4096**3 / best(lambda: a @ a) / 1e12
    step_gb = n * torch.finfo(dtype).bits / 8 / 1e9
    hw = dict(read_gb_s=read_gb_s, gemm_tflops=tflops, step_gb=step_gb, weights=n)
    return hw | dict(limit_tok_s=limit(hw, cfg.gen_batch))


def limit(hw: dict, batch: int) -> float:
    """The most new tokens/s a batch of `batch` rows can decode: the weights' read time or their FLOPs, the larger."""
    return min(batch * hw["read_gb_s"] / hw["step_gb"], hw["gemm_tflops"] * 1e12 / (2 * hw["weights"]))


WORKERS = {"train_ours": train_ours, "train_peer": train_peer, "gen_ours": gen_ours, "gen_peer": gen_peer,
           "eval_ours": eval_ours, "eval_peer": eval_peer, "rl_ours": rl_ours, "rl_peer": rl_peer}


def serve(name, cfg):
    """Worker process: set up one side, then run each item number read from stdin and answer its figures (tokens, or
    RL's), seconds and peak GB on stdout (everything else the libraries print goes to stderr)."""
    reply, sys.stdout = sys.stdout, sys.stderr
    device, dtype = resolve_precision(cfg.device, cfg.dtype)
    run = WORKERS[name](cfg, device, dtype)
    for line in sys.stdin:
        start = time.perf_counter()
        figures = run(int(line))
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(json.dumps({**figures, "seconds": time.perf_counter() - start, "peak_gb": peak_memory_gb(device)}),
              file=reply, flush=True)


def lockstep(names, cfg, n_items):
    """Start one worker process per side (so each peak memory figure is one side's alone), then run item i on
    each side in turn: a slow spell of a shared machine hits both alike. Item 0 warms up and is not counted.
    Returns {name: each figure summed over the timed items, peak_gb the highest}."""
    cmd = [sys.executable, __file__, "--cfg", json.dumps(asdict(cfg)), "--worker"]
    commands, env = {name: cmd + [name] for name in names}, {name: None for name in names}
    if cfg.baseline:  # the other checkout's bench.py runs its own side in place of the peer's
        other = next(p for p in (Path(cfg.baseline) / "tools/bench.py", Path(cfg.baseline) / "bench.py") if p.exists())
        config = json.dumps({k: v for k, v in asdict(cfg).items() if k not in ("baseline", "gen_sweep", "eval_problems")})
        for name in (n for n in names if n.endswith("_peer")):
            if name == "eval_peer":  # older versions have no eval mode: this file's, on the other checkout's code
                commands[name], env[name] = cmd + ["eval_ours"], os.environ | {"BENCH_CODE": str(Path(cfg.baseline))}
            else:
                commands[name] = [sys.executable, str(other), "--cfg", config, "--worker", name.replace("_peer", "_ours")]
    procs = {name: subprocess.Popen(commands[name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    env=env[name]) for name in names}
    totals = {name: {} for name in names}
    for i in range(n_items):
        for name, proc in procs.items():
            proc.stdin.write(f"{i}\n")
            proc.stdin.flush()
            if not (line := proc.stdout.readline()):
                raise SystemExit(f"bench: worker {name} failed (exit {proc.wait()}), see its output above")
            figures = json.loads(line)
            print(f"bench: {name} {'warm-up' if i == 0 else f'run {i}'}: "
                  + ", ".join(f"{k} {round(v, 4)}" for k, v in figures.items()), flush=True)
            t = totals[name]
            for k, v in figures.items():
                t[k] = max(t.get(k, 0), v) if k == "peak_gb" else t.get(k, 0) + v * (i > 0)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    return totals


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
    if cfg.rl_steps and cfg.rl_prompts * cfg.rl_group % cfg.rl_micro_batch:
        raise SystemExit(f"bench: --rl_micro_batch {cfg.rl_micro_batch} must divide --rl_prompts x --rl_group")
    sides = ("ours",) if cfg.no_peer else ("ours", "peer")
    r, sweep = {}, {}
    for mode, n in (("train", cfg.steps), ("rl", cfg.rl_steps), ("eval", cfg.rounds * (cfg.eval_problems > 0))):
        if n:
            r |= lockstep([f"{mode}_{s}" for s in sides], cfg, n + 1)
    for batch in [int(b) for b in cfg.gen_sweep.split(",") if b] or [cfg.gen_batch] * (cfg.rounds > 0):
        sweep[batch] = lockstep([f"gen_{s}" for s in sides], dataclasses.replace(cfg, gen_batch=batch),
                                cfg.rounds + 1)
    if sweep:
        r |= sweep.get(cfg.gen_batch, sweep[max(sweep)])  # the figures of gen_batch (else the largest) in the table

    def pair(mode, figure, per=1):
        """(ours, peer): a figure summed over the timed items, divided by the figure `per` or by a number; NaN
        where that side or mode did not run."""
        return tuple(t[figure] / (t[per] if isinstance(per, str) else per) if (t := r.get(f"{mode}_{s}")) else
                     float("nan") for s in ("ours", "peer"))
    rows = [("train_tok_s", "QLoRA train tokens/s", pair("train", "tokens", "seconds")),
            ("peak_gb", "QLoRA train peak memory (GB)", pair("train", "peak_gb")),
            ("gen_tok_s", "greedy generation new tokens/s", pair("gen", "tokens", "seconds")),
            ("gen_peak_gb", "generation peak memory (GB)", pair("gen", "peak_gb")),
            ("eval_tok_s", f"whole eval new tokens/s ({cfg.eval_problems} prompts)", pair("eval", "tokens", "seconds")),
            ("eval_peak_gb", "whole eval peak memory (GB)", pair("eval", "peak_gb")),
            ("rl_step_s", "GRPO step seconds", pair("rl", "seconds", cfg.rl_steps)),
            ("rl_new_tokens", "GRPO new tokens a step", pair("rl", "new_tokens", cfg.rl_steps)),
            ("rl_gen_tok_s", "GRPO rollout new tokens/s", pair("rl", "new_tokens", "rollout_s")),
            ("rl_update_tok_s", "GRPO update tokens/s (prompt+completion)", pair("rl", "update_tokens", "update_s")),
            ("rl_peak_gb", "GRPO peak memory (GB)", pair("rl", "peak_gb"))]
    other = "baseline" if cfg.baseline else "peer"  # --baseline: the other checkout's side
    print(f"\n| {'measure':40} | {'TinyReason':>10} | {other:>10} | {'ratio':>6} |")
    print(f"| {'-' * 40} | {'-' * 10}:| {'-' * 10}:| {'-' * 6}:|")
    for _, label, (ours, peer) in rows:
        if ours == ours:  # not NaN: the mode ran
            print(f"| {label:40} | {ours:10.2f} | {peer:10.2f} | {ours / peer:6.2f} |")
    if sweep:
        hw = hardware_limit(cfg, *resolve_precision(cfg.device, cfg.dtype))
        print(f"\nhardware limit: reads {hw['read_gb_s']:.1f} GB/s, GEMM {hw['gemm_tflops']:.2f} TFLOP/s; a decoding "
              f"step reads {hw['step_gb']:.2f} GB of weights.\n")
        print("| generation batch | TinyReason tok/s | peer tok/s | ratio | limit tok/s | TinyReason | peer |")
        print("|--:|--:|--:|--:|--:|--:|--:|")
        for batch, t in sweep.items():
            ours, peer = (t[f"gen_{s}"]["tokens"] / t[f"gen_{s}"]["seconds"] if f"gen_{s}" in t else float("nan")
                          for s in ("ours", "peer"))
            most = limit(hw, batch)
            print(f"| {batch} | {ours:.1f} | {peer:.1f} | {ours / peer:.2f} | {most:.0f} | {ours / most:.0%} | "
                  f"{peer / most:.0%} |")
        r["hw"] = hw
    keys = {prefix + key: v for key, _, both in rows for prefix, v in zip(("", "peer_"), both)} | r.get("hw", {})
    keys |= dict(ratio=keys["train_tok_s"] / keys["peer_train_tok_s"], rl_ratio=keys["peer_rl_step_s"] /
                 keys["rl_step_s"], gen_ratio=keys["gen_tok_s"] / keys["peer_gen_tok_s"],
                 eval_ratio=keys["eval_tok_s"] / keys["peer_eval_tok_s"])  # each > 1: we are faster
    print(" ".join(f"{k}={round(v, 4)}" for k, v in keys.items()))


if __name__ == "__main__":
    main()
