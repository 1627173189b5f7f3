"""Evaluate a TinyReason adapter (or the base model) on GSM8K: greedy batched generation, answer extraction,
numeric comparison, accuracy with its 95% Wilson interval, format compliance, one JSON line per problem.

    python eval.py                         # the last training's adapter; its experiment_config.json sets the rest
    python eval.py --adapter none --model Qwen/Qwen2.5-1.5B-Instruct --prompt_style boxed   # the fair baseline
    python eval.py --data my.jsonl --limit 0 --out preds.jsonl
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

import data
import stages
from calculator import DONE
from generate import generate, stopped
from grade import extract_answer, is_compliant, is_correct, normalize, step_validity, wilson
from config import parse_config
from load import ModelFlags, load_from_flags, resolve_model_flags


@dataclass
class EvalConfig(ModelFlags):
    system: str = data.SYSTEM_PROMPT  # system prompt of the tinyreason style (the training one)
    data: str = "openai/gsm8k"  # hub dataset or local .jsonl/.json/.parquet with question/answer
    split: str = "test"  # the hub dataset's split
    limit: int = None  # problems to score; default: the training's test_samples; 0: all
    batch_size: int = 16  # prompts per generate call
    max_new_tokens: int = 512  # an answer is cut here
    prompt_style: Literal["tinyreason", "boxed"] = "tinyreason"  # the training prompt, or Qwen's math prompt
    out: str = None  # one JSON line per problem; default: preds.jsonl in the adapter folder, or in outputs/
    report: str = None  # also write a short Markdown report to this file


def score(record: dict, ids: list[int], tokenizer, style: str, upev: bool = False) -> dict:
    """One line of --out: the problem, the output, how it was read and judged, its true arithmetic statements and,
    for a UPEV output, the step-aware figures (stages.metrics)."""
    output = tokenizer.decode(ids)
    extracted = extract_answer(output)
    gold, pred = normalize(data.gold_answer(record)), normalize(extracted)
    row = dict(question=record["question"], gold=gold, output=output, extracted=extracted, normalized=pred,
               correct=is_correct(pred, gold), compliant=is_compliant(output, style),
               steps=list(step_validity(output.split("</think>")[0])), tokens=len(ids), stopped=stopped(ids, tokenizer))
    return row | stages.metrics(output) if upev else row


def markdown_report(rows: list[dict], title: str, max_new_tokens: int) -> str:
    """What a person checks first: accuracy, format compliance, lengths, five wrong answers beside the gold."""
    n, k = len(rows), sum(r["correct"] for r in rows)
    lo, hi = wilson(k, n)
    lengths = sorted(r["tokens"] for r in rows)
    lines = [f"# GSM8K evaluation: {title}", "",
             f"- accuracy: **{k / n:.3f}** ({k}/{n}), 95% Wilson interval [{lo:.3f}, {hi:.3f}]",
             f"- format compliance: {sum(r['compliant'] for r in rows) / n:.3f}",
             f"- generated tokens: median {lengths[n // 2]}, 90th percentile {lengths[int(0.9 * (n - 1))]}, "
             f"max {lengths[-1]}; {sum(not r['stopped'] for r in rows)} of {n} cut at --max_new_tokens "
             f"{max_new_tokens}", "", "| question | gold | read as | end of the answer |", "|---|---|---|---|"]
    for r in [r for r in rows if not r["correct"]][:5]:
        question, read, end = (" ".join(str(t).split()).replace("|", "\\|") for t in
                               (r["question"][:160], r["normalized"], r["output"][-200:]))  # one table row each
        lines.append(f"| {question} | {r['gold']} | {read} | {end} |")
    return "\n".join(lines) + "\n"


def main():
    args = parse_config(EvalConfig, description=__doc__)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise SystemExit("--batch_size and --max_new_tokens must be at least 1")

    # Every input is checked before the (slow) model load.
    adapter, cfg = resolve_model_flags(args)
    upev = cfg.get("format") == "upev"  # the step-aware figures, for an adapter trained in that format
    limit = args.limit if args.limit is not None else cfg.get("test_samples", 50)  # 50: the run recorded none
    try:
        records = data.load_records(args.data, split=args.split)[:limit if limit > 0 else None]
    except (OSError, ValueError) as e:
        raise SystemExit(f"--data: {e}")
    for i, record in enumerate(records):
        if not isinstance(record.get("question"), str) or data.gold_answer(record) is None:
            raise SystemExit(f"--data: {args.data} record {i} needs a 'question' and an 'answer' ending in '#### N'")
    if not records:
        raise SystemExit(f"--data: {args.data} ({args.split}) holds no records")
    out = Path(args.out or (adapter or Path("outputs")) / "preds.jsonl")
    net, tokenizer = load_from_flags(args, adapter)
    if adapter is not None:
        stages.load_verify(net, tokenizer, adapter)
    print(f"model {args.model} | adapter {adapter} | {args.quantize} {args.dtype} on {args.device} | "
          f"{args.prompt_style} prompts | {len(records)} problems from {args.data} | "
          f"calculator {'on' if args.calculator else 'off'}")
    prompts = [data.prompt_ids(tokenizer, r["question"], args.prompt_style, args.system) for r in records]

    # Longest prompts first: similar lengths share a batch (less padding), and an out-of-memory shows at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    rows, seconds = [None] * len(prompts), 0.0
    bar = tqdm(range(0, len(order), args.batch_size), desc="eval", unit="batch")
    tokens = tqdm(desc="generated", unit="tok", position=1)  # a long batch shows life, and its speed
    for start in bar:
        batch = order[start: start + args.batch_size]
        t0 = time.perf_counter()
        new_ids, _ = generate(net, tokenizer, [prompts[i] for i in batch], args.max_new_tokens, temperature=0.0,
                              on_token=lambda row, token: tokens.update(), calculator=args.calculator)
        seconds += time.perf_counter() - t0
        for i, ids in zip(batch, new_ids):
            rows[i] = score(records[i], ids, tokenizer, args.prompt_style, upev)
        done = order[: start + len(batch)]
        bar.set_postfix(acc=f"{sum(rows[i]['correct'] for i in done) / len(done):.3f}")
    tokens.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    n, k, n_tokens = len(rows), sum(r["correct"] for r in rows), sum(r["tokens"] for r in rows)
    print("accuracy, 95% Wilson interval: [{:.4f}, {:.4f}]".format(*wilson(k, n)))
    print(f"strict accuracy (answer in the {args.prompt_style} format): "
          f"{stages.ratio(sum(r['correct'] and r['compliant'] for r in rows), n)}")
    print(f"format compliance: {stages.ratio(sum(r['compliant'] for r in rows), n)}")
    print(f"mean generated tokens: {n_tokens / n:.1f}")
    steps = [sum(r["steps"][i] for r in rows) for i in (0, 1)]
    print(f"step validity (true arithmetic statements): {stages.ratio(*steps)}")
    if upev:
        print("\n".join(stages.summary(rows)))
    if args.calculator:
        print(f"calculator calls per answer: {sum(len(DONE.findall(r['output'])) for r in rows) / n:.2f}")
    print(f"generation: {n_tokens / seconds:.1f} tok/s ({n_tokens} tokens in {seconds:.1f}s)")
    print(f"predictions: {out}")
    if args.report:
        Path(args.report).write_text(markdown_report(rows, f"{args.model} + {adapter}, {args.prompt_style} prompts, "
                                                           f"{args.data} ({args.split})", args.max_new_tokens))
        print(f"report: {args.report}")
    print(f"accuracy: {k / n:.4f} ({k}/{n})")


if __name__ == "__main__":
    main()
