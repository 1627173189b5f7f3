"""Grading an answer: find its span, normalize it, compare it numerically with the gold. eval.py and rl.py's
correctness reward both call `is_correct(normalize(extract_answer(text)), gold)`, so they can never disagree.

Normalization follows the official GSM8K one (drop thousands separators, compare numbers) and goes further for
free-form model answers: currency, units, number words, fractions, percentages, a trailing ".0".
"""
import math
import re
from fractions import Fraction

import calculator

NUMBER = r"(?:(?<![\w)])-)?(?:\d+(?:\.\d+)?|\.\d+)"  # "-5" but not the "-3" of "16-3"
NUMBER_RE = re.compile(rf"({NUMBER})(?:\s*/\s*({NUMBER}))?")  # an optional "/denominator" makes a simple fraction
THOUSANDS_RE = re.compile(r"(?<=\d)[,\u00a0\u2009\u202f]\s?(?=\d{3}(?!\d))")  # "1,200", "1, 200", thin spaces
SPACED_THOUSANDS_RE = re.compile(r"(?<=\d)(?<!\d{4}) (?=\d{3}(?!\d))")  # "1 200" in an answer span, not "12345 678"
WORD_VALUES = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                           "thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())}
WORD_VALUES |= {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9}
_WORD = "(?:" + "|".join(sorted([*WORD_VALUES, *SCALES, "hundred"], key=len, reverse=True)) + r")\b"
NUMBER_WORDS_RE = re.compile(rf"\b{_WORD}(?:[\s-]+(?:and\s+)?{_WORD})*")  # "twenty-five", "one hundred and five"

STYLES = ("tinyreason", "boxed", "answer_tags")
FORMAT_RE = {"tinyreason": re.compile(r"</think>.*\*\*Final Answer:\*\*", re.S), "boxed": re.compile(r"\\boxed\{"),
             "answer_tags": re.compile(r"</think>.*<answer>.*</answer>", re.S)}
# The strict shape RL rewards: one non-empty think block first, then the answer in the style's place, then nothing.
THINK = r"\s*<think>(?P<think>.*?\S.*?)</think>\s*"  # a non-empty think block first
STRICT_RE = {"tinyreason": re.compile(THINK + r"\*\*Final Answer:\*\*[ \t]*(?P<answer>\S[^\n]*?)\s*", re.S),
             "answer_tags": re.compile(THINK + r"<answer>(?P<answer>.*?\S.*?)</answer>\s*", re.S),
             "boxed": re.compile(r"(?P<think>.*?\S.*?)\\boxed\{(?P<answer>.*)\}[\s.$]*", re.S)}
TAGS = ("<think>", "</think>", "<answer>", "</answer>", "**Final Answer:**", "\\boxed{")
# "48 / 2 = 24", "60 + 120 - 10 = 170": a chain of numbers and operators, then = and a number
STATEMENT_RE = re.compile(rf"(?<![\d.])({NUMBER}(?:\s*[-+*/x×÷]\s*{NUMBER})+)\s*=\s*({NUMBER})")


def is_compliant(text: str, style: str) -> bool:
    """The answer sits where the prompt style asked for it (the loose check eval.py reports)."""
    return bool(FORMAT_RE[style].search(text))


def answer_span(text: str, style: str) -> str | None:
    """The answer where the style puts it, and nowhere else: after **Final Answer:**, in the last \\boxed{}, or
    in the last <answer></answer>. No fallback to the last number (extract_answer's flexible reading)."""
    if style == "boxed":
        return last_boxed(text)
    if style == "answer_tags":
        spans = re.findall(r"<answer>(.*?)</answer>", text, re.S)
        return spans[-1].strip() if spans else None
    return text.rsplit("**Final Answer:**", 1)[1].strip() if "**Final Answer:**" in text else None


def strict_format(text: str, style: str) -> re.Match | None:
    """The whole completion in the style's shape with each tag exactly once; its groups are `think`, `answer`."""
    if any(text.count(tag) > 1 for tag in TAGS):  # a second think block or answer is not the format
        return None
    return STRICT_RE[style].fullmatch(text)


def statements(text: str) -> list[tuple[str, str, bool]]:
    """Each `a op b ... = c` of the text, the whole chain (`60 + 120 - 10 = 170`), as (expression, c, true?): true
    when its exact value is c, or rounds to c at c's own decimals (`10/3 = 3.33`; `10/3 = 3` is false)."""
    out = []
    for expr, c in STATEMENT_RE.findall(THOUSANDS_RE.sub("", text)):
        exact = calculator.value(expr.replace("x", "*").replace("×", "*").replace("÷", "/"))
        decimals = len(c.partition(".")[2])
        out.append((expr, c, exact is not None and (exact == Fraction(c) or decimals > 0 and
                                                    round(exact, decimals) == Fraction(c))))
    return out


def step_validity(text: str) -> tuple[int, int]:
    """(true, all) arithmetic statements in the text."""
    found = statements(text)
    return sum(ok for _, _, ok in found), len(found)


def rewards(text: str, gold: str, style: str, stopped: bool) -> dict[str, float]:
    """RL's reward parts for one completion. A completion cut at the length limit earns nothing: it has no
    answer yet. correct: the strict answer span graded as eval.py grades; format: strict_format; reasoning: the
    fraction of true `a op b = c` statements in the think block, only when the format holds (else 0)."""
    if not stopped:
        return {"correct": 0.0, "format": 0.0, "reasoning": 0.0}
    shape = strict_format(text, style)
    true, total = step_validity(shape["think"]) if shape else (0, 0)
    return {"correct": float(is_correct(normalize(answer_span(text, style)), normalize(gold))),
            "format": float(shape is not None), "reasoning": true / total if total else 0.0}


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
    # A plain space groups thousands only inside an answer span: in reasoning, "step 2 100 more" is two numbers.
    text = SPACED_THOUSANDS_RE.sub("", THOUSANDS_RE.sub("", re.sub(r"[$€£¥₹]", "", text)))
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
