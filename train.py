"""QLoRA fine-tuning of Qwen2.5 on GSM8K chain-of-thought, as one explicit loop (no trainer framework).

    python train.py                                    # the recipe: Qwen2.5-1.5B-Instruct, 2000 samples, 250 steps
    python train.py --model /path/to/qwen2 --data ../shared/gsm8k/train.jsonl --max_steps 30
    python train.py --resume latest                    # continue the newest checkpoint in --output_dir
    python train.py --config run.json --max_steps 100  # fields from JSON (e.g. an experiment_config.json); flags win

A step divides the summed token losses of its micro-batches by the target tokens of all of them, so
accumulation 4 x batch 1 equals batch 4. Only the fp32 LoRA matrices train, so all of them get weight decay
(there are no trainable biases or norms to exempt). output_dir/checkpoint-NNNNNN holds the adapter (PEFT
format) and training_state.pt (optimizer, grad scaler, RNG states, data position, losses); resuming from one
ends bit-identical to a run never stopped. The checkpoint with the lowest validation loss becomes --adapter_path.
"""
import argparse
import json
import os
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import lora
from data import collate, is_local, load_splits, step_batches
from tinyreason import DTYPES, IGNORE, Qwen2, Tokenizer, resolve_checkpoint, resolve_precision

CE_CHUNK = 1024  # target tokens per lm_head + cross-entropy chunk: (1024, 151936) fp32 logits = 0.6 GB
log = tqdm.write  # prints above the progress bar


@dataclass
class TrainConfig:
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"  # hub repo id or local Hugging Face checkpoint folder
    data: str = "openai/gsm8k"  # hub dataset (config "main") or local .jsonl/.json/.parquet with question/answer
    num_samples: int = 2000  # records drawn (after dropping malformed ones) for train + validation; <= 0: all
    validation_split: float = 0.1  # fraction of those held out for the validation loss; 0: none
    test_samples: int = 50  # test questions eval.py scores; recorded so the experiment config has it
    max_seq_length: int = 2048  # longer examples are dropped and counted, never cut
    quantize: str = "nf4"  # base weights: "nf4" (QLoRA) or "none" (16-bit LoRA)
    lora_r: int = 16  # adapter rank
    lora_alpha: float = 32  # the update is scaled by alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter input
    target_modules: tuple[str, ...] = lora.TARGETS  # projections of each block that get an adapter
    batch_size: int = 2  # examples per micro-batch
    gradient_accumulation_steps: int = 4  # micro-batches per optimizer step (effective batch 8)
    max_steps: int = 250  # optimizer steps
    warmup_steps: int = 50  # linear warmup, then linear decay to 0 at max_steps
    learning_rate: float = 2e-4  # peak learning rate
    weight_decay: float = 0.01  # decoupled (AdamW) decay of the LoRA matrices
    max_grad_norm: float = 1.0  # clip the global gradient norm to this
    optim: str = "auto"  # "adamw_8bit" (bitsandbytes, 8-bit states) or "adamw" (torch); auto: 8-bit on CUDA
    dtype: str = "auto"  # bf16/fp16/fp32; auto: bf16 if the hardware has it, else fp16 + grad scaler (GPU) or fp32
    device: str = "auto"  # "cuda", "cpu", ...; auto: cuda when available
    gradient_checkpointing: bool = True  # recompute each block's activations in backward: less memory, slower
    eval_steps: int = 50  # validation loss every this many steps (and at the end)
    save_steps: int = 50  # checkpoint every this many steps (and at the end)
    save_total_limit: int = 3  # newest checkpoints kept; the best one by validation loss is never deleted
    logging_steps: int = 10  # a log line every this many steps
    seed: int = 3407  # seeds Python, NumPy, torch, the data order and the adapter init
    output_dir: str = "outputs"  # checkpoints go here
    adapter_path: str = "outputs/lora_adapter"  # the best adapter + experiment_config.json end up here
    resume: str = ""  # a checkpoint folder, or "latest" in output_dir, to continue from


def parse_config(argv=None) -> TrainConfig:
    """Flags are generated from TrainConfig's fields; --config FILE.json sets fields that flags then override."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)  # only the flags given appear
    parser.add_argument("--config", help="JSON file of TrainConfig fields")
    for f in fields(TrainConfig):
        kind = ({"action": argparse.BooleanOptionalAction} if f.type is bool else
                {"nargs": "+"} if f.type == tuple[str, ...] else {"type": f.type})
        parser.add_argument(f"--{f.name}", help=f"default: {f.default}", **kind)
    args = vars(parser.parse_args(argv))
    values = {}
    if "config" in args:
        path = Path(args.pop("config"))
        if not path.is_file():
            parser.error(f"--config {path}: no such file")
        values = json.loads(path.read_text())
        if unknown := sorted(set(values) - {f.name for f in fields(TrainConfig)}):
            parser.error(f"--config {path}: unknown fields {unknown}")
    values.update(args)
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    return TrainConfig(**values)


def check_config(cfg: TrainConfig):
    """Every input problem visible before the model loads, in one specific error."""
    positive = ("batch_size", "gradient_accumulation_steps", "max_steps", "max_seq_length", "lora_r",
                "eval_steps", "save_steps", "save_total_limit", "logging_steps", "learning_rate")
    problems = [f"--{k} must be > 0 (got {getattr(cfg, k)})" for k in positive if getattr(cfg, k) <= 0]
    problems += [f"--{k} must be >= 0 (got {getattr(cfg, k)})"
                 for k in ("warmup_steps", "weight_decay", "max_grad_norm") if getattr(cfg, k) < 0]
    problems += [f"--{k} must be in [0, 1) (got {getattr(cfg, k)})"
                 for k in ("validation_split", "lora_dropout") if not 0 <= getattr(cfg, k) < 1]
    for flag, allowed in (("optim", ("auto", "adamw", "adamw_8bit")), ("dtype", ("auto", *DTYPES)),
                          ("quantize", ("nf4", "none"))):
        if getattr(cfg, flag) not in allowed:
            problems.append(f"--{flag} {getattr(cfg, flag)!r}: expected one of {allowed}")
    if unknown := sorted(set(cfg.target_modules) - set(lora.TARGETS)):
        problems.append(f"--target_modules {unknown}: expected a subset of {lora.TARGETS}")
    if is_local(cfg.data) and not Path(cfg.data).is_file():
        problems.append(f"--data {cfg.data}: no such file")
    if not cfg.resume and checkpoints(cfg.output_dir):
        problems.append(f"--output_dir {cfg.output_dir} already holds checkpoints: continue them with "
                        "--resume latest, or choose another --output_dir")
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


def seed_everything(seed: int):
    os.environ["PYTHONHASHSEED"] = str(seed)  # reaches subprocesses (this process fixed its hash seed at start)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to the peak, reached at step
    warmup_steps - 1, then linear decay towards 0 at max_steps. No step runs at lr 0."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    return cfg.learning_rate * (cfg.max_steps - step) / (cfg.max_steps - cfg.warmup_steps)


class SummedCrossEntropy(torch.autograd.Function):
    """sum_i (logsumexp(z_i) - z_i[y_i]) over fp32 logits z (N, V). Its gradient, softmax(z) - onehot(y), is
    written over z itself: one (N, V) block in all, where F.cross_entropy also keeps the log-probabilities and
    makes two gradient blocks, each a full pass over the vocabulary."""

    @staticmethod
    def forward(ctx, z, y):
        lse = torch.logsumexp(z, dim=-1)  # (N,)
        ctx.save_for_backward(z, y, lse)
        return (lse - z.gather(1, y[:, None]).squeeze(1)).sum()

    @staticmethod
    def backward(ctx, grad):
        z, y, lse = ctx.saved_tensors  # z is ours alone: lm_head's output, which nothing else keeps
        p = z.sub_(lse[:, None]).exp_()  # softmax(z), in place
        p[torch.arange(len(y), device=y.device), y] -= 1
        return p.mul_(grad), None


def _chunk_loss(lm_head, h, y):
    return SummedCrossEntropy.apply(lm_head(h).float(), y)


def compute_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the target positions of `batch`, and their number.

    lm_head runs only where the next token is a target, in chunks of CE_CHUNK positions. With several chunks,
    each one's fp32 logits are recomputed in backward rather than kept, so at most one (CE_CHUNK, vocab) fp32
    block exists at a time; a single chunk is kept, which peaks no higher and saves the recompute."""
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    is_target = labels != IGNORE
    hidden = model.hidden(batch["input_ids"], batch["attention_mask"])[:, :-1][is_target]  # (N, D)
    targets = labels[is_target]  # (N,)
    chunks = list(zip(hidden.split(CE_CHUNK), targets.split(CE_CHUNK)))
    if len(chunks) > 1 and torch.is_grad_enabled():
        return sum(checkpoint(_chunk_loss, model.lm_head, h, y, use_reentrant=False) for h, y in chunks), len(targets)
    return sum(_chunk_loss(model.lm_head, h, y) for h, y in chunks), len(targets)


def accumulate_gradients(model, micro_batches, autocast, scaler) -> tuple[float, int]:
    """Backward over one optimizer step's micro-batches; returns the step's mean token loss and token count."""
    n_targets = sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro_batches)
    if n_targets == 0:
        raise ValueError("a training step has no target tokens: every label is masked")
    total = 0.0
    for mb in micro_batches:
        with autocast:
            loss_sum, _ = compute_loss(model, mb)
        scaler.scale(loss_sum / n_targets).backward()  # normalised by the whole step's targets
        total += loss_sum.item()
    return total / n_targets, n_targets


@torch.no_grad()
def evaluate(model, examples, batch_size, autocast, pad_id, device) -> float:
    """Mean token loss over `examples`, in batches of similar length."""
    model.eval()
    order = sorted(examples, key=lambda ex: len(ex["input_ids"]))
    total, n = 0.0, 0
    for i in tqdm(range(0, len(order), batch_size), desc="validation", leave=False):
        batch = {k: v.to(device) for k, v in collate(order[i:i + batch_size], pad_id).items()}
        with autocast:
            loss_sum, n_batch = compute_loss(model, batch)
        total, n = total + float(loss_sum), n + n_batch
    model.train()
    return total / n


def make_optimizer(params, cfg: TrainConfig, device: torch.device):
    name = cfg.optim if cfg.optim != "auto" else ("adamw_8bit" if device.type == "cuda" else "adamw")
    if name == "adamw_8bit":
        import bitsandbytes as bnb  # 8-bit Adam states: a quarter of the optimizer memory
        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def checkpoints(output_dir) -> dict[int, Path]:
    """step -> checkpoint folder, oldest first."""
    return {int(p.name[11:]): p for p in sorted(Path(output_dir).glob("checkpoint-[0-9]*"))}


def best_step(saved: dict[int, Path], val_losses: dict[int, float]) -> int:
    """The saved step with the lowest validation loss; the newest when none was validated."""
    scored = [s for s in saved if s in val_losses]
    return min(scored, key=val_losses.get) if scored else max(saved)


def replace_folder(tmp: Path, final: Path):
    """Put a fully written `tmp` in place of `final` by renames, so a reader never sees a partial folder."""
    if final.exists():
        discard(final)
    os.replace(tmp, final)


def discard(folder: Path):
    trash = folder.with_name(".del-" + folder.name)  # renamed first: never listed half-deleted
    os.replace(folder, trash)
    shutil.rmtree(trash)


def save_checkpoint(model, optimizer, scaler, state: dict, cfg: TrainConfig) -> Path:
    final = Path(cfg.output_dir) / f"checkpoint-{state['step']:06d}"
    tmp = final.with_name(".tmp-" + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    lora.save_adapter(model, tmp, cfg.model)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "state": state, "rng": rng},
               tmp / "training_state.pt")
    (tmp / "experiment_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    replace_folder(tmp, final)
    prune_checkpoints(cfg.output_dir, state["val_losses"], cfg.save_total_limit)
    return final


def prune_checkpoints(output_dir, val_losses: dict[int, float], limit: int):
    """Keep the newest `limit` checkpoints, and the best one by validation loss whatever its age."""
    saved = checkpoints(output_dir)
    keep = best_step(saved, val_losses)
    for step in list(saved)[:-limit]:
        if step != keep:
            discard(saved[step])


def load_training_state(folder: Path, optimizer, scaler) -> dict:
    saved = torch.load(folder / "training_state.pt", weights_only=False)  # our own file; RNG states are tuples
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    random.setstate(saved["rng"]["python"])
    np.random.set_state(saved["rng"]["numpy"])
    torch.set_rng_state(saved["rng"]["torch"])
    if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return saved["state"]


def resume_folder(cfg: TrainConfig) -> Path | None:
    if cfg.resume == "latest":
        if not (saved := checkpoints(cfg.output_dir)):
            raise FileNotFoundError(f"--resume latest: no checkpoint-* folder in {cfg.output_dir}")
        return saved[max(saved)]
    if cfg.resume and not (Path(cfg.resume) / "training_state.pt").is_file():
        raise FileNotFoundError(f"--resume {cfg.resume}: not a checkpoint folder (no training_state.pt)")
    return Path(cfg.resume) if cfg.resume else None


def export_best(state: dict, cfg: TrainConfig) -> int:
    """Copy the best checkpoint's adapter to adapter_path, with this run's resolved config (experiment_config.json)."""
    saved = checkpoints(cfg.output_dir)
    step = best_step(saved, state["val_losses"])
    out = Path(cfg.adapter_path)
    tmp = out.with_name(".tmp-" + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(saved[step], tmp, ignore=shutil.ignore_patterns("training_state.pt"))
    (tmp / "experiment_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    replace_folder(tmp, out)
    return step


def main(argv=None) -> dict:
    cfg = parse_config(argv)
    check_config(cfg)
    start_from = resume_folder(cfg)
    resolve_checkpoint(cfg.model)  # a wrong --model fails here, before data and weights load
    seed_everything(cfg.seed)
    device, dtype = resolve_precision(cfg.device, cfg.dtype)
    log(json.dumps(asdict(cfg), indent=2))

    tokenizer = Tokenizer.from_pretrained(cfg.model)
    train_set, val_set = load_splits(cfg.data, tokenizer, cfg.num_samples, cfg.validation_split, cfg.max_seq_length,
                                     cfg.seed, log)

    model = Qwen2.from_pretrained(cfg.model, dtype=dtype, device=device,
                                  quantize=None if cfg.quantize == "none" else cfg.quantize)
    if start_from:  # the checkpoint's own adapter (r, alpha, targets)
        lora.load_adapter(model, start_from)
    else:
        lora.inject(model, cfg.target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    log(lora.trainable_report(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 grads underflow unscaled
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    state = {"step": 0, "position": (0, 0), "train_losses": {}, "val_losses": {}}
    if start_from:
        state = load_training_state(start_from, optimizer, scaler)
        log(f"resumed from {start_from} at step {state['step']}")

    def save():
        log(f"saved {save_checkpoint(model, optimizer, scaler, state, cfg)}")

    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="training", dynamic_ncols=True)
    tokens, train_time, window = 0, 0.0, []
    try:
        for step in range(state["step"], cfg.max_steps):
            t0, lr = time.time(), get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches, position = step_batches(train_set, cfg.batch_size, cfg.gradient_accumulation_steps,
                                                   cfg.seed, state["position"], tokenizer.pad_id)
            tokens += sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
            micro_batches = [{k: v.to(device) for k, v in mb.items()} for mb in micro_batches]
            loss, _ = accumulate_gradients(model, micro_batches, autocast, scaler)
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            if np.isfinite(grad_norm):
                scaler.step(optimizer)
            else:  # fp16 overflow: skip the update; scaler.update() lowers the scale
                log(f"step {step + 1}: non-finite gradient norm, update skipped")
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.update(step=step + 1, position=position)
            state["train_losses"][step + 1] = loss
            window.append(loss)
            train_time += time.time() - t0
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / train_time:.0f}")
            bar.update()
            done = state["step"] == cfg.max_steps
            if state["step"] % cfg.logging_steps == 0 or done:
                log(f"step {state['step']}/{cfg.max_steps} | loss {sum(window) / len(window):.4f} | lr {lr:.3e} | "
                    f"grad norm {grad_norm:.3f} | {tokens / train_time:.0f} tok/s")
                window = []
            if val_set and (state["step"] % cfg.eval_steps == 0 or done):
                val = evaluate(model, val_set, cfg.batch_size, autocast, tokenizer.pad_id, device)
                state["val_losses"][state["step"]] = val
                log(f"step {state['step']}: validation loss {val:.4f}")
            if state["step"] % cfg.save_steps == 0 or done:
                save()
    except KeyboardInterrupt:
        bar.close()
        if state["step"] not in checkpoints(cfg.output_dir) and state["step"] > 0:
            save()  # the last finished step; a half-accumulated step is dropped
        log(f"interrupted after step {state['step']}: continue with --resume latest --output_dir {cfg.output_dir}")
        raise SystemExit(130)
    bar.close()

    step = export_best(state, cfg)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
    log(f"adapter of step {step} (validation loss {state['val_losses'].get(step, float('nan')):.4f}) -> "
        f"{cfg.adapter_path} | {tokens / max(train_time, 1e-9):.0f} tok/s | peak memory {peak:.2f} GB")
    return state


if __name__ == "__main__":
    main()
