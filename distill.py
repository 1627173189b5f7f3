"""Distillation by rejection sampling: a teacher samples solutions, the grader keeps the correct ones, and they become
SFT data in our format: reasoning a model actually wrote, not GSM8K's terse lines.

    python distill.py --teacher Qwen/Qwen2.5-7B-Instruct --samples_per_question 4 --out traces.jsonl
    python train.py --data traces.jsonl --num_samples 0    # SFT on the kept traces
    python rl.py --data traces.jsonl --zone 2,5             # RL on the questions 2 to 5 samples got right
    python distill.py --task math --teacher_format boxed --samples_per_question 8 --out math.jsonl   # the Nexus zone
"""
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

import checkpoint
import config
import data
import grade
import lora
import tasks
from generate import generate, stopped
from load import context_length, load_model, resolve_checkpoint, resolve_precision
from tokenizer import Tokenizer

TEACHER_SYSTEM = ("You are a helpful assistant that solves math problems step-by-step. Think step by step inside "
                  "<think> and </think>, then write **Final Answer:** followed by {}.")  # the task's answer_hint


@dataclass
class DistillConfig:
    teacher: str = "Qwen/Qwen2.5-7B-Instruct"  # hub repo id or local checkpoint folder (Qwen2, Llama or Phi)
    teacher_format: Literal["tinyreason", "boxed"] = "tinyreason"  # the teacher's prompt: ours, or Qwen's math prompt
    adapter: str = "none"  # a LoRA adapter on the teacher, or none
    task: str = "gsm8k"  # gsm8k, math, or path/to/task.py: its questions, gold answers and grader
    data: str = ""  # hub dataset or local .jsonl/.json/.parquet of the task's records; empty: the task's own
    split: str = "train"  # the hub dataset's split
    num_questions: int = 0  # the first N usable questions; <= 0: all
    samples_per_question: int = 4  # sampled solutions per question
    keep_per_question: int = 1  # correct, distinct solutions kept per question, shortest first
    temperature: float = 0.7  # sampling temperature
    max_new_tokens: int = 512  # a sample cut here is not kept
    batch_size: int = 8  # questions sampled at once (x samples_per_question rows); a finished one's slots refill
    quantize: Literal["nf4", "none"] = "nf4"  # teacher weights: nf4 or none (16-bit)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where supported, else fp16 (GPU) or fp32
    device: str = "auto"  # cuda, cpu, ...; auto: cuda when available
    compile: bool = False  # torch.compile the static decode step (CUDA graphs on a GPU); its first steps compile
    seed: int = 3407  # a run samples from (seed, its first question's index)
    out: str = "traces.jsonl"  # one line per question, appended as it ends; a rerun skips those already in it


def rewrite(text: str, gold: str, style: str = "tinyreason", task=tasks.GSM8K()) -> str | None:
    """A sample as the exact assistant turn train.py renders, or None outside the strict format. A boxed sample's
    whole text is the reasoning, its \\boxed{72} unboxed to 72 wherever it sits (Qwen often ends "\\(\\boxed{72}\\)."):
    a small model that cannot yet write our tags still reasons well in the format it knows."""
    if style == "boxed":
        answer = grade.last_boxed(text)
        think = "" if answer is None else text.replace(f"\\boxed{{{answer}}}", answer)
        if any(tag in think for tag in grade.TAGS):  # a second, different box; our own tags
            return None
    else:
        think = shape["think"] if (shape := grade.strict_format(text, style)) else ""
    return f"<think>\n{think.strip()}\n</think>\n\n**Final Answer:** {task.final(gold)}" if think.strip() else None


def select(samples: list[tuple[str, bool]], gold: str, keep: int, style: str = "tinyreason",
           task=tasks.GSM8K()) -> tuple[list[str], int]:
    """Samples (text, stopped) -> up to `keep` correct ones rewritten, distinct, shortest first; how many were right
    (by the task's reward grader: the answer where the style puts it)."""
    correct = [text for text, ended in samples if task.rewards(text, gold, style, ended)["correct"]]
    kept = sorted({t for t in (rewrite(c, gold, style, task) for c in correct) if t}, key=lambda t: (len(t), t))
    return kept[:keep], len(correct)


def main(argv=None):
    cfg = config.parse_config(DistillConfig, argv, description=__doc__)
    if min(cfg.samples_per_question, cfg.keep_per_question, cfg.batch_size) < 1 or not 0 < cfg.temperature < math.inf:
        raise ValueError("--samples_per_question, --keep_per_question and --batch_size must be > 0, --temperature a "
                         "finite number > 0")
    if problem := checkpoint.overlap("--out", cfg.out, {"--data": cfg.data, "--teacher": cfg.teacher}):
        raise ValueError(problem)
    if cfg.adapter != "none":
        lora.read_adapter_config(cfg.adapter)  # a bad adapter fails before the teacher loads
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    task = tasks.load_task(cfg.task)
    records = task.records(cfg.data, cfg.split)
    records = records[:cfg.num_questions] if cfg.num_questions > 0 else records
    out = Path(cfg.out)
    done = {task.question(r) for r in data.read_appended(out)} if out.exists() else set()
    todo = [(i, r) for i, r in enumerate(records) if task.question(r) not in done]
    print(f"distill: {len(records)} questions, {len(done)} already in {out}, {len(todo)} to sample")
    device, dtype = resolve_precision(cfg.device, cfg.dtype)
    folder, system, prompts = resolve_checkpoint(cfg.teacher), TEACHER_SYSTEM.format(task.answer_hint), []
    tokenizer, context = Tokenizer.from_pretrained(folder), context_length(folder)
    for i, r in todo:  # a prompt past the teacher's context is refused before it loads
        try:
            prompts.append(data.prompt_ids(tokenizer, task.question(r), cfg.teacher_format, system, context))
        except ValueError as e:
            raise ValueError(f"--data {cfg.data or cfg.task}, question {i}: {e}") from None
    model, _ = load_model(folder, None if cfg.adapter == "none" else cfg.adapter, cfg.quantize, dtype, device)
    n, kept, tokens, t0 = cfg.samples_per_question, 0, 0, time.time()
    samples = [[] for _ in todo]  # (text, stopped) of each question's ended samples
    bar = tqdm(total=len(todo), desc="distill", unit="question")

    def ended(row, ids):  # a question's line is appended once its last sample ends: a rerun samples the rest again
        nonlocal kept, tokens
        (_, record), got = todo[row // n], samples[row // n]
        got.append((tokenizer.decode(ids), stopped(ids, tokenizer)))
        tokens += len(ids)
        if len(got) == n:
            traces, n_correct = select(got, task.gold(record), cfg.keep_per_question, cfg.teacher_format, task)
            with open(out, "a") as f:
                f.writelines(json.dumps({**record, "assistant": t, "n_correct": n_correct, "n_samples": n}) + "\n"
                             for t in traces or [""])
            kept += len(traces)
            bar.update()
            bar.set_postfix(kept=f"{kept}/{bar.n}", tok_s=f"{tokens / (time.time() - t0):.0f}")
    generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + (todo[0][0] if todo else 0))
    generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, num_samples=n, generator=generator,
             batch_size=cfg.batch_size * n, on_done=ended, compile=cfg.compile)
    bar.close()
    print(f"kept {kept} traces for {len(todo)} questions -> {out}")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # bad flags, files or data, no network: the message alone says what to do
        raise SystemExit(f"distill.py: {e}")
