"""Grading for eval.py and RL alike: find an answer's span, normalize it, compare it with the gold (docs/eval.md)."""
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
CLOSING = r"(?:[\s.$]|\\\)|\\\])*"  # after the box: spaces, ".", or the $, \) or \] closing its math
THINK = r"\s*<think>(?P<think>.*?\S.*?)</think>\s*"  # strict: one non-empty think block first
STRICT_RE = {"tinyreason": re.compile(THINK + r"\*\*Final Answer:\*\*[ \t]*(?P<answer>\S[^\n]*?)\s*", re.S),
             "answer_tags": re.compile(THINK + r"<answer>(?P<answer>.*?\S.*?)</answer>\s*", re.S),
             "boxed": re.compile(r"(?P<think>.*?\S.*?)\\boxed\{(?P<answer>.*)\}" + CLOSING, re.S)}
TAGS = ("<think>", "</think>", "<answer>", "</answer>", "**Final Answer:**", "\\boxed{")
STATEMENT_RE = re.compile(rf"(?<![\d.])({NUMBER}(?:\s*[-+*/x×÷]\s*{NUMBER})+)\s*=\s*({NUMBER})")


def is_compliant(text: str, style: str) -> bool:
    """The answer sits where the prompt style asked for it (the loose check eval.py reports)."""
    return bool(FORMAT_RE[style].search(text))


def answer_span(text: str, style: str) -> str | None:
    """The answer where the style puts it and nowhere else, unlike extract_answer: no fallback to the last number."""
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
    """Each `a op b ... = c` chain of the text as (expression, c, true?): true when the exact value is c, or rounds
    to c at c's own decimals (`10/3 = 3.33`; `10/3 = 3` is false)."""
    out = []
    for expr, c in STATEMENT_RE.findall(THOUSANDS_RE.sub("", text)):
        exact = calculator.value(expr.replace("x", "*").replace("×", "*").replace("÷", "/"))
        decimals = len(c.partition(".")[2])
        out.append((expr, c, exact is not None and (round(exact, decimals) if decimals else exact) == Fraction(c)))
    return out


def step_validity(text: str) -> tuple[int, int]:
    """(true, all) arithmetic statements in the text."""
    found = statements(text)
    return sum(ok for _, _, ok in found), len(found)


def rewards(text: str, gold: str, style: str, stopped: bool, read=answer_span, judge=None) -> dict[str, float]:
    """RL's reward parts; a completion cut at the length limit has no answer yet and earns nothing. A task brings
    its own `read(text, style)` of the answer and `judge(answer, gold)`; by default GSM8K's numeric comparison."""
    if not stopped:
        return {"correct": 0.0, "format": 0.0, "reasoning": 0.0}
    shape = strict_format(text, style)
    true, total = step_validity(shape["think"]) if shape else (0, 0)
    answer = read(text, style)
    correct = judge(answer, gold) if judge else is_correct(normalize(answer), normalize(gold))
    return {"correct": float(correct), "format": float(shape is not None), "reasoning": true / total if total else 0.0}


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, nested braces included ("\\boxed{\\frac{3}{4}}")."""
    _, found, rest = text.rpartition("\\boxed{")
    if not found:
        return None
    depth = 1
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[:i]
    return None


def unbox(text: str) -> str:
    """Text with each \\boxed{...} replaced by its content ("so $\\boxed{72}$." -> "so $72$.")."""
    head, found, rest = text.rpartition("\\boxed{")
    content = last_boxed(text)
    return text if content is None else unbox(head) + content + rest[len(content) + 1:]


def extract_answer(text: str) -> str | None:
    """The answer span, read flexibly: the delimiter, else the last box, else `#### N`, else the last number."""
    if span := answer_span(text, "tinyreason"):
        return span
    if (span := last_boxed(text)) is not None:
        return span.strip()
    if "####" in text and (span := text.rsplit("####", 1)[1].strip()):
        return span
    numbers = [m.group() for m in NUMBER_RE.finditer(THOUSANDS_RE.sub("", text))]
    return numbers[-1] if numbers else None


def number_words(match: re.Match) -> str:
    """"two thousand five hundred and five" -> "2505": groups below a thousand, each closed by a scale word."""
    total = group = 0
    for word in re.findall(r"[a-z]+", match.group()):
        if word == "hundred":
            group = max(group, 1) * 100
        elif word in SCALES:
            total, group = total + max(group, 1) * SCALES[word], 0
        else:
            group += WORD_VALUES.get(word, 0)  # "and" adds nothing
    return str(total + group)


def normalize(answer: str | None) -> str:
    """An answer's first number ("$1,200.00" -> "1200", "seven" -> "7", "3/4" -> "0.75"), else its lower-cased text."""
    if answer is None:
        return ""
    text = re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", answer.lower().replace("\u2212", "-"))
    # A plain space groups thousands only inside an answer span: in reasoning, "step 2 100 more" is two numbers.
    text = SPACED_THOUSANDS_RE.sub("", THOUSANDS_RE.sub("", re.sub(r"[$€£¥₹]", "", text)))
    # Digits first, so "each one costs 5" reads 5; words only when there are no digits at all ("seven").
    match = NUMBER_RE.search(text) or NUMBER_RE.search(text := NUMBER_WORDS_RE.sub(number_words, text))
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


def mcnemar_p(b: int, c: int) -> float:
    """The exact two-sided McNemar p-value of b pairs only one side got right against c only the other did: how
    likely a split at least this uneven is when each such pair is a fair coin (Binomial(b + c, 1/2))."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n) if n else 1.0
