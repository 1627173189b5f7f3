"""Evaluate a TinyReason adapter (or the base model) on GSM8K: greedy batched generation, answer extraction,
numeric comparison, accuracy with its 95% Wilson interval, format compliance, one JSON line per problem.

    python eval.py                         # the last training's adapter; its experiment_config.json sets the rest
    python eval.py --adapter none --model Qwen/Qwen2.5-1.5B-Instruct --prompt_style boxed   # the fair baseline
    python eval.py --data my.jsonl --limit 0 --out preds.jsonl
"""
import argparse
import json
import math
import re
import time

from tqdm import tqdm

import data
from chat import add_model_flags, load_model, resolve_model_flags  # the same weights and defaults as the REPL
from tinyreason import generate

BOXED_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."  # Qwen2.5-Math's prompt
FORMATS = {"tinyreason": re.compile(r"</think>.*\*\*Final Answer:\*\*", re.S), "boxed": re.compile(r"\\boxed\{")}

NUMBER = r"(?:(?<![\w)])-)?(?:\d+(?:\.\d+)?|\.\d+)"  # "-5" but not the "-3" of "16-3"
NUMBER_RE = re.compile(rf"({NUMBER})(?:\s*/\s*({NUMBER}))?")  # an optional "/denominator" makes a simple fraction
THOUSANDS_RE = re.compile(r"(?<=\d)[,\u00a0\u2009\u202f]\s?(?=\d{3}(?!\d))")  # "1,200", "1, 200", thin spaces
WORD_VALUES = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                           "thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())}
WORD_VALUES |= {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_WORD = "(?:" + "|".join(sorted([*WORD_VALUES, *SCALES, "hundred"], key=len, reverse=True)) + r")\b"
NUMBER_WORDS_RE = re.compile(rf"\b{_WORD}(?:[\s-]+(?:and\s+)?{_WORD})*")  # "twenty-five", "one hundred and five"


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, nested braces included ("\\boxed{\\frac{3}{4}}")."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len("\\boxed{"): i]
    return None


def extract_answer(text: str) -> str | None:
    """The answer span of a response: TinyReason's delimiter, else Qwen-math's box, else GSM8K's own `#### N`
    answer line, else the last number. "Flexible": any of them counts; the format check is separate."""
    if "**Final Answer:**" in text and (span := text.rsplit("**Final Answer:**", 1)[1].strip()):
        return span
    if (span := last_boxed(text)) is not None:
        return span.strip()
    if "####" in text and (span := text.rsplit("####", 1)[1].strip()):
        return span
    numbers = [m.group() for m in NUMBER_RE.finditer(THOUSANDS_RE.sub("", text))]
    return numbers[-1] if numbers else None


def words_to_digits(text: str) -> str:
    def value(match):  # "two thousand five hundred and five": groups below a thousand, closed by each scale word
        total = group = 0
        for word in re.findall(r"[a-z]+", match.group()):
            if word == "hundred":
                group = max(group, 1) * 100
            elif word in SCALES:
                total, group = total + max(group, 1) * SCALES[word], 0
            else:
                group += WORD_VALUES.get(word, 0)  # "and" adds nothing
        return str(total + group)
    return NUMBER_WORDS_RE.sub(value, text)


def normalize(answer: str | None) -> str:
    """Canonical form of an answer span: its first number ("$1,200.00" -> "1200", "seven" -> "7", "3/4" -> "0.75",
    "50%" -> "50", "15 meters" -> "15"), or the lower-cased text when it holds no number."""
    if answer is None:
        return ""
    text = re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", answer.lower().replace("\u2212", "-"))
    text = THOUSANDS_RE.sub("", re.sub(r"[$€£¥₹]", "", text))
    # Digits first, so "each one costs 5" reads 5; words only when there are no digits at all ("seven").
    match = NUMBER_RE.search(text) or NUMBER_RE.search(text := words_to_digits(text))
    if match is None:
        return text.strip().rstrip(".")
    value = float(match[1]) / float(match[2]) if match[2] and float(match[2]) != 0 else float(match[1])
    return str(int(value)) if value.is_integer() else f"{value:.12g}"  # a 400-digit run is "inf", not a crash


def is_correct(pred: str, gold: str) -> bool:
    """Numeric comparison when both sides are numbers (float-rounding tolerance), exact text otherwise."""
    try:
        return math.isclose(float(pred), float(gold), rel_tol=0, abs_tol=1e-4)
    except ValueError:
        return pred != "" and pred == gold


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials (sane at 0/n and n/n, unlike p ± z·se)."""
    p, d = k / n, 1 + z * z / n
    center = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, center - half), min(1.0, center + half)


def prompt_ids(tokenizer, question: str, style: str, system: str) -> list[int]:
    if style == "boxed":  # no system turn: the template adds Qwen's default one, as in Qwen's own math evals
        return tokenizer.apply_chat([{"role": "user", "content": question + BOXED_SUFFIX}])
    return tokenizer.apply_chat(data.prompt_messages(question, system))  # exactly the training prompt


def load_eval_records(source: str, split: str, limit: int) -> list[dict]:
    try:
        records = data.load_records(source, split=split)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"--data: {e}")
    records = records[:limit] if limit > 0 else records
    for i, record in enumerate(records):
        if not isinstance(record.get("question"), str) or data.gold_answer(record) is None:
            raise SystemExit(f"--data: {source} record {i} needs a 'question' and an 'answer' ending in '#### N'")
    if not records:
        raise SystemExit(f"--data: {source} ({split}) holds no records")
    return records


def score(record: dict, output: str, style: str) -> dict:
    """One line of --out: what was asked, what came out, how it was read and whether it is right."""
    extracted = extract_answer(output)
    gold, pred = normalize(data.gold_answer(record)), normalize(extracted)
    return dict(question=record["question"], gold=gold, output=output, extracted=extracted, normalized=pred,
                correct=is_correct(pred, gold), compliant=bool(FORMATS[style].search(output)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--data", default="openai/gsm8k", help="hub dataset or local .jsonl with question/answer")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="problems to score (default: the training's test_samples; 0 = all)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--prompt_style", choices=("tinyreason", "boxed"), default="tinyreason")
    p.add_argument("--out", default="preds.jsonl", help="one JSON line per problem")
    args = p.parse_args()
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise SystemExit("--batch_size and --max_new_tokens must be at least 1")

    # Every input is checked before the (slow) model load.
    adapter, cfg = resolve_model_flags(args)
    limit = args.limit if args.limit is not None else cfg["test_samples"]
    records = load_eval_records(args.data, args.split, limit)
    net, tokenizer = load_model(args, adapter)
    print(f"model {args.model} | adapter {adapter} | {args.quantize} {args.dtype} on {args.device} | "
          f"{args.prompt_style} prompts | {len(records)} problems from {args.data}")
    prompts = [prompt_ids(tokenizer, r["question"], args.prompt_style, args.system) for r in records]

    # Longest prompts first: similar lengths share a batch (less padding), and an out-of-memory shows at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    rows, n_tokens, seconds = [None] * len(prompts), 0, 0.0
    bar = tqdm(range(0, len(order), args.batch_size), desc="eval", unit="batch")
    tokens = tqdm(desc="generated", unit="tok", position=1)  # a long batch shows life, and its speed
    for start in bar:
        batch = order[start: start + args.batch_size]
        t0 = time.perf_counter()
        new_ids = generate(net, tokenizer, [prompts[i] for i in batch], args.max_new_tokens, temperature=0.0,
                           on_token=lambda row, token: tokens.update())
        seconds += time.perf_counter() - t0
        for i, ids in zip(batch, new_ids):
            rows[i] = score(records[i], tokenizer.decode(ids), args.prompt_style)
            n_tokens += len(ids)
        done = order[: start + len(batch)]
        bar.set_postfix(acc=f"{sum(rows[i]['correct'] for i in done) / len(done):.3f}")
    tokens.close()

    with open(args.out, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    n, k = len(rows), sum(row["correct"] for row in rows)
    n_strict, n_format = sum(r["correct"] and r["compliant"] for r in rows), sum(r["compliant"] for r in rows)
    lo, hi = wilson(k, n)
    print(f"accuracy, 95% Wilson interval: [{lo:.4f}, {hi:.4f}]")
    print(f"strict accuracy (answer in the {args.prompt_style} format): {n_strict / n:.4f} ({n_strict}/{n})")
    print(f"format compliance: {n_format / n:.4f} ({n_format}/{n})")
    print(f"mean generated tokens: {n_tokens / n:.1f}")
    print(f"generation: {n_tokens / seconds:.1f} tok/s ({n_tokens} tokens in {seconds:.1f}s)")
    print(f"predictions: {args.out}")
    print(f"accuracy: {k / n:.4f} ({k}/{n})")


if __name__ == "__main__":
    main()
