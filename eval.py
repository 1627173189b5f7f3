"""Evaluate a TinyReason adapter (or the base model) on a task (GSM8K by default): greedy batched generation, the
task's answer reading and judgement, accuracy with its 95% Wilson interval (and by level and subject where the records
have them), format compliance, one JSON line per problem.

    python eval.py                         # the last training's adapter; its experiment_config.json sets the rest
    python eval.py --adapter none --model Qwen/Qwen2.5-1.5B-Instruct --prompt_style boxed   # the fair baseline
    python eval.py --data my.jsonl --limit 0 --out preds.jsonl
    python eval.py --task math --adapter none --prompt_style boxed --limit 0                 # MATH-500
    python eval.py --task math --rescore preds.jsonl       # grade those predictions again, nothing generated
    python eval.py --compare base.jsonl tuned.jsonl        # two runs on the same problems, paired: McNemar's test
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

import data
import stages
import tasks
from calculator import DONE
from checkpoint import overlap
from generate import generate, stopped
from grade import is_compliant, mcnemar_p, step_validity, wilson
from config import parse_config
from load import ModelFlags, context_length, load_from_flags, model_folder, resolve_model_flags
from tokenizer import Tokenizer


@dataclass
class EvalConfig(ModelFlags):
    system: str = data.SYSTEM_PROMPT  # system prompt of the tinyreason style (the training one)
    task: str = None  # gsm8k, math, or path/to/task.py; default: the adapter's task, else gsm8k
    data: str = ""  # hub dataset or local .jsonl/.json/.parquet of the task's records; empty: the task's own
    split: str = "test"  # the hub dataset's split
    limit: int = None  # problems to score; default: the training's test_samples; 0: all
    batch_size: int = 32  # answers generated at once; a finished one's slot takes the next problem
    max_new_tokens: int = 512  # an answer is cut here
    prompt_style: Literal["tinyreason", "boxed", "answer_tags"] = "tinyreason"  # ours, Qwen's math, Infused's tags
    out: str = None  # one JSON line per problem; default: preds.jsonl in the adapter folder, or in outputs/
    report: str = None  # also write a short Markdown report to this file
    rescore: str = None  # an --out file to grade again with --task: nothing is generated, no model loads
    compare: tuple[str, ...] = ()  # two --out files of the same problems: paired counts and the exact McNemar p


def judged(task, question: str, gold: str, output: str, style: str) -> dict:
    """How an output was read and judged, and its true arithmetic statements: what --rescore recomputes."""
    extracted = task.extract(output)
    return dict(question=question, gold=task.normalize(gold), output=output, extracted=extracted,
                normalized=task.normalize(extracted), correct=task.judge(extracted, gold),
                compliant=is_compliant(output, style), steps=list(step_validity(output.split("</think>")[0])))


def score(task, record: dict, ids: list[int], tokenizer, style: str, upev: bool = False) -> dict:
    """One line of --out: the problem, the output, how it was read and judged, the record's `group_by` fields and,
    for a UPEV output, the step-aware figures (stages.metrics)."""
    output = tokenizer.decode(ids)
    row = judged(task, task.question(record), task.gold(record), output, style)
    row |= {k: record[k] for k in task.group_by if k in record} | dict(tokens=len(ids), stopped=stopped(ids, tokenizer))
    return row | stages.metrics(output) if upev else row


def by_group(rows: list[dict], key: str) -> list[str]:
    """Accuracy per value of `key` (level, subject), each with its interval."""
    lines = [f"accuracy by {key}:"]
    for value in sorted({str(r[key]) for r in rows if key in r}):
        k, n = sum(r["correct"] for r in rows if str(r.get(key)) == value), sum(str(r.get(key)) == value for r in rows)
        lines.append(f"  {value}: {k / n:.4f} ({k}/{n}) [{wilson(k, n)[0]:.3f}, {wilson(k, n)[1]:.3f}]")
    return lines if len(lines) > 1 else []


def markdown_report(rows: list[dict], title: str, max_new_tokens: int) -> str:
    """What a person checks first: accuracy, format compliance, lengths, five wrong answers beside the gold."""
    n, k = len(rows), sum(r["correct"] for r in rows)
    lo, hi = wilson(k, n)
    lengths = sorted(r["tokens"] for r in rows)
    lines = [f"# Evaluation: {title}", "",
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


def report(args, task, rows: list[dict], out: Path, title: str, seconds: float = None):
    """Write the --out lines and print the report (and --report's Markdown), the accuracy last."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    n, k, n_tokens = len(rows), sum(r["correct"] for r in rows), sum(r["tokens"] for r in rows)
    print("accuracy, 95% Wilson interval: [{:.4f}, {:.4f}]".format(*wilson(k, n)))
    for key in task.group_by:
        print("\n".join(by_group(rows, key)))
    print(f"strict accuracy (answer in the {args.prompt_style} format): "
          f"{stages.ratio(sum(r['correct'] and r['compliant'] for r in rows), n)}")
    print(f"format compliance: {stages.ratio(sum(r['compliant'] for r in rows), n)}")
    print(f"mean generated tokens: {n_tokens / n:.1f}")
    steps = [sum(r["steps"][i] for r in rows) for i in (0, 1)]
    print(f"step validity (true arithmetic statements): {stages.ratio(*steps)}")
    if "upev" in rows[0]:
        print("\n".join(stages.summary(rows)))
    if args.calculator:
        print(f"calculator calls per answer: {sum(len(DONE.findall(r['output'])) for r in rows) / n:.2f}")
    if seconds is not None:
        print(f"generation: {n_tokens / seconds:.1f} tok/s ({n_tokens} tokens in {seconds:.1f}s)")
    print(f"predictions: {out}")
    if args.report:
        Path(args.report).write_text(markdown_report(rows, title, args.max_new_tokens))
        print(f"report: {args.report}")
    print(f"accuracy: {k / n:.4f} ({k}/{n})")


def load_task(spec: str):
    try:
        return tasks.load_task(spec)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--task: {e}")


def read_out(path: Path, flag: str, needs: set) -> list[dict]:
    """The lines of an earlier --out file, each with the fields `needs`."""
    if not path.is_file():
        raise SystemExit(f"{flag}: no such file {path}")
    try:
        rows = [data.parse_json(line, path, n) for n, line in enumerate(data.utf8(path).splitlines(), 1) if line.strip()]
    except ValueError as e:
        raise SystemExit(f"{flag}: {e}")
    bad = [i for i, r in enumerate(rows, 1) if type(r) is not dict or not needs <= r.keys()]
    if not rows or bad:
        raise SystemExit(f"{flag}: {path} line {bad[0] if bad else 1} is not a line eval.py --out wrote")
    return rows


def rescore(args):
    """The lines of an earlier --out graded again by --task, without generating: the same report and --out lines."""
    task, path = load_task(args.task or "gsm8k"), Path(args.rescore)
    rows = [row | judged(task, row["question"], row["gold"], row["output"], args.prompt_style)
            for row in read_out(path, "--rescore", {"question", "gold", "output", "tokens", "stopped"})]
    print(f"rescoring {len(rows)} predictions of {path} | task {args.task or 'gsm8k'} | {args.prompt_style} format")
    report(args, task, rows, Path(args.out or path.with_suffix(".rescored.jsonl")), f"{path} rescored")


def compare(a: Path, b: Path) -> dict:
    """Two --out files of the same problems, paired: how many both, only A, only B or neither answered right, the
    exact two-sided McNemar p-value of only A against only B, and each side's accuracy with its interval."""
    right = [{r["question"]: bool(r["correct"]) for r in read_out(path, "--compare", {"question", "correct"})}
             for path in (a, b)]
    if right[0].keys() != right[1].keys():
        raise SystemExit(f"--compare: {a} and {b} are not the same problems "
                         f"({len(right[0].keys() ^ right[1].keys())} questions are in one file only)")
    pairs = [(right[0][q], right[1][q]) for q in right[0]]
    counts = {name: pairs.count(pair) for name, pair in (("both right", (True, True)), ("only A", (True, False)),
                                                          ("only B", (False, True)), ("neither", (False, False)))}
    n, p = len(pairs), mcnemar_p(counts["only A"], counts["only B"])
    print(f"{n} problems, paired: " + ", ".join(f"{name} {k}" for name, k in counts.items()))
    for side, path in (("A", a), ("B", b)):
        k = sum(pair[side == "B"] for pair in pairs)
        print(f"{side} {path}: accuracy {k / n:.4f} ({k}/{n}), 95% interval [{wilson(k, n)[0]:.3f}, "
              f"{wilson(k, n)[1]:.3f}]")
    print(f"exact McNemar p = {p:.4g} (two-sided, {counts['only A'] + counts['only B']} problems on which they differ)")
    return counts | {"p": p}


def main():
    args = parse_config(EvalConfig, description=__doc__)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise SystemExit("--batch_size and --max_new_tokens must be at least 1")
    if args.rescore:
        return rescore(args)
    if args.compare:
        if len(args.compare) != 2:
            raise SystemExit(f"--compare takes two --out files, got {len(args.compare)}")
        return compare(*map(Path, args.compare))

    # Every input is checked before the (slow) model load.
    adapter, cfg = resolve_model_flags(args)
    task_name = args.task or cfg.get("task", "gsm8k")  # an adapter is scored on its own task
    task = load_task(task_name)
    upev = cfg.get("format") == "upev"  # the step-aware figures, for an adapter trained in that format
    limit = args.limit if args.limit is not None else cfg.get("test_samples", 50)  # 50: the run recorded none
    try:
        source = args.data or task.source(args.split)
        numbered = task.load(source, args.split)[:limit if limit > 0 else None]
    except (OSError, ValueError) as e:
        raise SystemExit(f"--data: {e}")
    for i, (where, record) in enumerate(numbered):
        if not task.usable(record):  # a score over fewer problems than asked would mislead: refused, not skipped
            raise SystemExit(f"--data: {source} record {i} ({where}) needs {task.needs}")
    if not numbered:
        raise SystemExit(f"--data: {source} ({args.split}) holds no records")
    records = [record for _, record in numbered]
    out = Path(args.out or (adapter or Path("outputs")) / "preds.jsonl")
    if problem := overlap("--out", out, {"--data": source}):
        raise SystemExit(problem)
    folder = model_folder(args)
    tokenizer, context, prompts = Tokenizer.from_pretrained(folder), context_length(folder), []
    for where, record in numbered:
        try:
            prompts.append(data.prompt_ids(tokenizer, task.question(record), args.prompt_style, args.system, context))
        except ValueError as e:  # past the model's context: refused before it loads
            raise SystemExit(f"--data: {source} {where}: {e}")
    net, _ = load_from_flags(args, adapter)
    if adapter is not None:
        stages.load_verify(net, tokenizer, adapter)
    print(f"model {args.model} | adapter {adapter} | {args.quantize} {args.dtype} on {args.device} | "
          f"{args.prompt_style} prompts | task {task_name} | {len(records)} problems from {source} | "
          f"calculator {'on' if args.calculator else 'off'}")

    # Longest prompts first: similar lengths share a prefill (less padding), and an out-of-memory shows at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    rows = [None] * len(prompts)
    bar = tqdm(total=len(order), desc="eval", unit="problem")
    tokens = tqdm(desc="generated", unit="tok", position=1)  # a long answer shows life, and its speed

    def graded(row, ids):  # in the main thread, as each answer ends: math-verify's timeouts need it
        i = order[row]
        rows[i] = score(task, records[i], ids, tokenizer, args.prompt_style, upev)
        bar.update()
        bar.set_postfix(acc=f"{sum(r['correct'] for r in rows if r) / bar.n:.3f}")
    t0 = time.perf_counter()
    generate(net, tokenizer, [prompts[i] for i in order], args.max_new_tokens, temperature=0.0,
             batch_size=args.batch_size, on_token=lambda row, token: tokens.update(), on_done=graded,
             calculator=args.calculator, compile=args.compile)
    seconds = time.perf_counter() - t0
    bar.close(), tokens.close()
    report(args, task, rows, out, f"{args.model} + {adapter}, {args.prompt_style} prompts, {source} ({args.split})",
           seconds)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # bad flags, files or checkpoints: the message alone says what to do
        raise SystemExit(f"eval.py: {e}")
