"""QLoRA fine-tuning of Qwen2.5 on GSM8K chain-of-thought, as one explicit loop (no trainer framework).

    python train.py                                    # the recipe: Qwen2.5-1.5B-Instruct, 2000 samples, 250 steps
    python train.py --model /path/to/qwen2 --data path/to/train.jsonl --max_steps 30
    python train.py --task math                        # MATH's reference solutions; your own task: docs/tasks.md
    python train.py --resume                           # continue the newest checkpoint in --output_dir, as it was
    python train.py --config run.json --max_steps 100  # fields from JSON (e.g. an experiment_config.json); flags win

A step's loss is its summed token losses over the target tokens of all its micro-batches (Σ w·loss / Σ w with
--stage_weights): accumulation 4 x batch 1 equals batch 4. The best checkpoint by validation loss is --adapter_path.
"""
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

import config
import data
import lora
import loop
import stages
import tasks
from data import IGNORE, collate, load_splits, step_batches
from load import dtype_name, load_base, resolve_checkpoint, resolve_precision
from loop import log
from tinyreason import token_logprobs
from tokenizer import Tokenizer

# Changing one of these on --resume would make the resumed run another run: refused.
FIXED_ON_RESUME = ("model", "task", "data", "num_samples", "validation_split", "max_seq_length", "calculator", "format",
                   "stage_weights", "quantize", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
                   "verify_adapter", "verify_r", "verify_alpha", "batch_size", "gradient_accumulation_steps", "seed")


@dataclass
class TrainConfig(loop.LoopConfig):
    num_samples: int = 2000  # records drawn (after dropping malformed ones) for train + validation; <= 0: all
    validation_split: float = 0.1  # fraction of those held out for the validation loss; 0: none
    test_samples: int = 50  # test questions eval.py scores; recorded so the experiment config has it
    max_seq_length: int = 2048  # longer examples are dropped and counted, never cut
    calculator: bool = False  # keep GSM8K's <<48/2=24>> as tool calls; eval.py and chat.py then use the tool
    format: Literal["plain", "upev"] = "plain"  # upev: the think block in UNDERSTAND/PLAN/EXECUTE/VERIFY stages
    stage_weights: str = ""  # e.g. 1,1,1,2: UNDERSTAND,PLAN,EXECUTE,VERIFY (+ answer) loss weights; empty: unweighted
    lora_dropout: float = 0.0  # dropout on the adapter input
    verify_adapter: bool = False  # a second LoRA on the same projections, on from the VERIFY tag on (--format upev)
    verify_r: int = 16  # rank of the verification adapter
    verify_alpha: float = 32  # the verification adapter's update is scaled by verify_alpha / verify_r
    batch_size: int = 2  # examples per micro-batch
    gradient_accumulation_steps: int = 4  # micro-batches per optimizer step, per process


def parse_config(argv=None) -> TrainConfig:
    cfg = config.parse_config(TrainConfig, argv, FIXED_ON_RESUME, __doc__)
    cfg.data = cfg.data or tasks.load_task(cfg.task).source("train")
    return cfg


def check_config(cfg: TrainConfig):
    """Every problem argparse cannot see, in one error before anything loads."""
    problems = loop.config_problems(cfg, ("batch_size", "gradient_accumulation_steps", "max_seq_length", "verify_r"))
    problems += [f"--{k} must be in [0, 1) (got {getattr(cfg, k)})"
                 for k in ("validation_split", "lora_dropout") if not 0 <= getattr(cfg, k) < 1]
    if (cfg.stage_weights or cfg.verify_adapter) and cfg.format != "upev":
        problems.append("--stage_weights and --verify_adapter need --format upev (a plain turn has no stages)")
    if cfg.format == "upev" and cfg.task != "gsm8k":
        problems.append("--format upev is built from GSM8K's annotated solutions: it needs --task gsm8k")
    if cfg.format == "upev" and cfg.calculator:
        problems.append("--format upev writes its steps without calculator calls: drop --calculator")
    if cfg.stage_weights and not ((w := config.numbers(cfg.stage_weights, 4)) and min(w) >= 0 and sum(w) > 0):
        problems.append(f"--stage_weights {cfg.stage_weights!r}: expected four weights >= 0, not all 0, e.g. 1,1,1,1")
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


def compute_loss(model, batch) -> tuple[torch.Tensor, float]:
    """Summed next-token cross-entropy over the target positions of `batch` (lm_head runs only there), and their
    number; with per-token `weights` (stages.weigh_by_stage), Σ w·CE and Σ w."""
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    is_target = labels != IGNORE
    hidden = model(batch["input_ids"])[:, :-1][is_target]  # (N, D); right padding needs no mask
    nll = -token_logprobs(model, hidden, labels[is_target])
    if "weights" not in batch:
        return nll.sum(), int(is_target.sum())
    w = batch["weights"][:, 1:][is_target].to(nll.device)
    return (nll * w).sum(), float(w.sum())


def count_targets(micro_batches) -> float:
    """The step's denominator: its target tokens, or their summed weight."""
    return sum(float(mb["weights"][:, 1:][mb["labels"][:, 1:] != IGNORE].sum()) if "weights" in mb else
               int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro_batches)


def accumulate_gradients(model, micro_batches, autocast, scaler, n_targets=None) -> tuple[float, float]:
    """Backward over micro-batches of one step, each loss divided by the whole step's count (under torchrun,
    n_targets: every process's). Returns these micro-batches' part of the step's mean token loss, and the count."""
    n_targets = n_targets or count_targets(micro_batches)
    if n_targets == 0:
        raise ValueError("a training step has no target tokens: every label is masked")
    total = 0.0
    for mb in micro_batches:
        with autocast:
            loss_sum, _ = compute_loss(model, mb)
        scaler.scale(loss_sum / n_targets).backward()
        total += loss_sum.item()
    return total / n_targets, n_targets


@torch.no_grad()
def evaluate(model, examples, batch_size, autocast, pad_id, device) -> tuple[dict, str]:
    """The mean token loss over `examples`, in batches of similar length, as loop.run's evaluate returns it."""
    model.eval()
    order = sorted(examples, key=lambda ex: len(ex["input_ids"]))[loop.RANK::loop.WORLD]  # this process's share
    total, n = 0.0, 0
    for i in tqdm(range(0, len(order), batch_size), desc="validation", leave=False, disable=loop.RANK != 0):
        batch = {k: v.to(device) for k, v in collate(order[i:i + batch_size], pad_id).items()}
        with autocast:
            loss_sum, n_batch = compute_loss(model, batch)
        total, n = total + float(loss_sum), n + n_batch
    model.train()
    total, n = loop.all_ranks_sum(total, n)
    return {"val_loss": total / n}, f"validation loss {total / n:.4f}"


def main(argv=None) -> dict:
    cfg = parse_config(argv)
    check_config(cfg)
    rank, world = loop.init_distributed()
    path = resolve_checkpoint(cfg.model)  # a wrong --model or --target_modules fails before data loads
    loop.check_target_modules(cfg, path)
    tokenizer = Tokenizer.from_pretrained(path)
    loop.seed_everything(cfg.seed)
    device, dtype = resolve_precision(cfg.device, cfg.dtype)  # resolved into cfg: experiment_config.json says what ran
    cfg.device, cfg.dtype, cfg.optim = device.type, dtype_name(dtype), loop.resolve_optim(cfg.optim, device)
    task = tasks.load_task(cfg.task)

    def render(record, calculator=cfg.calculator):  # the record as a question and the assistant turn to train on
        return stages.upev_record(record) if cfg.format == "upev" else task.sft_record(record, calculator)
    records = task.records(cfg.data, "train", log, keep=lambda r: data.format_example(render(r, False)) is not None)
    train_set, val_set = load_splits([render(r) for r in records], tokenizer, cfg.num_samples, cfg.validation_split,
                                     cfg.max_seq_length, cfg.seed, log, cfg.calculator)
    if (per_step := cfg.batch_size * cfg.gradient_accumulation_steps * world) > len(train_set):
        raise ValueError(f"--batch_size x --gradient_accumulation_steps x processes = {per_step} examples a step, more "
                         f"than the {len(train_set)} training examples")
    if cfg.stage_weights:
        stages.weigh_by_stage(tokenizer, train_set, config.numbers(cfg.stage_weights, 4))
    model = load_base(cfg.model, dtype, device, cfg.quantize)
    if cfg.resume:  # the checkpoint's own adapter (r, alpha, targets)
        lora.load_adapter(model, cfg.resume)
        if cfg.verify_adapter:
            stages.load_verify(model, tokenizer, cfg.resume)
    else:
        lora.inject(model, cfg.target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        if cfg.verify_adapter:
            stages.add_verify_adapter(model, tokenizer, cfg.verify_r, cfg.verify_alpha)
    model, params, optimizer = loop.trainable(model, cfg)
    autocast, scaler = loop.amp(device, dtype)
    state = {"step": 0, "position": (0, 0), "loss": {}, "val_loss": {}}
    tokens, train_time, window = 0, 0.0, []

    def train_step(step):
        """Every process's micro-batches, this process's share forward and backward, one update."""
        nonlocal tokens, train_time
        t0, lr = time.time(), loop.get_lr(step, cfg)
        accum = cfg.gradient_accumulation_steps  # per process: a step is accum * world micro-batches
        micro_batches, state["position"] = step_batches(train_set, cfg.batch_size, accum * world, cfg.seed,
                                                        state["position"], tokenizer.pad_id)
        tokens += sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
        mine = [{k: v.to(device) for k, v in mb.items()} for mb in micro_batches[rank * accum:(rank + 1) * accum]]
        loss, _ = accumulate_gradients(model, mine, autocast, scaler, count_targets(micro_batches))  # all processes'
        loss = loop.all_ranks_sum(loss)[0]
        grad_norm = loop.optimizer_step(optimizer, scaler, params, cfg.max_grad_norm, lr)
        if not np.isfinite(grad_norm):  # fp16 overflow: the scaler skipped the update
            log(f"step {step + 1}: non-finite gradient norm, update skipped")
        train_time += time.time() - t0
        window.append(loss)
        figures = dict(loss=loss, lr=lr, grad_norm=grad_norm, tok_s=tokens / train_time)
        if (step + 1) % cfg.logging_steps and step + 1 < cfg.max_steps:
            return figures, None
        line = (f"step {step + 1}/{cfg.max_steps} | loss {sum(window) / len(window):.4f} | lr {lr:.3e} | "
                f"grad norm {grad_norm:.3f} | {tokens / train_time:.0f} tok/s")
        window.clear()
        return figures, line

    validate = partial(evaluate, model, val_set, cfg.batch_size, autocast, tokenizer.pad_id, device)
    return loop.run(cfg, "train.py", model, optimizer, scaler, state, train_step, validate if val_set else None,
                    score="val_loss", shown=("loss", "lr", "tok_s"),
                    save_adapter=stages.save_adapters if cfg.verify_adapter else lora.save_adapter)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # bad flags, files or data, no network: the message alone says what to do
        raise SystemExit(f"train.py: {e}")
