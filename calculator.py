"""The calculator tool for GSM8K's `<<48/2=24>>` calls: the model writes `<<48/2=`, the tool `24>>`. Model text
never reaches `eval`: a small exact parser reads + - * /, parentheses, signs, decimals, percent, else gives None.
"""
import re
from fractions import Fraction

MAX_CHARS = 80  # longest expression evaluated
MAX_DEPTH = 16  # nested parentheses and unary signs
MAX_DIGITS = 15  # of a number written in the expression, and of the result's integer part
DECIMALS = 2  # a result that is no finite decimal (10/3) is rounded to this many places, as GSM8K writes 3.33
CALL = re.compile(rf"<<([^<>=]{{1,{MAX_CHARS}}})=$")  # text ending in an open call: `<<48/2=`
DONE = re.compile(r"<<[^<>=]*=([^<>=]*>>)")  # a finished call; the group is what the tool wrote
TOKEN = re.compile(r"\s*(\d+\.?\d*|\.\d+|[-+*/()%])")


def tool_output(text: str) -> str | None:
    """What the tool appends to `text` when it ends in an open call `<<EXPR=`: the result and `>>`; else None."""
    match = CALL.search(text)
    value = evaluate(match[1]) if match else None
    return None if value is None else value + ">>"


def evaluate(expr: str) -> str | None:
    """The value of an expression as GSM8K writes it ("24", "0.5", "3.33"): exact, no float noise; else None."""
    exact = value(expr)
    if exact is None:
        return None
    if (exact * 10 ** MAX_DIGITS).denominator != 1:
        exact = round(exact, DECIMALS)
    places = next(k for k in range(MAX_DIGITS + 1) if (exact * 10 ** k).denominator == 1)
    whole, part = divmod(int(abs(exact) * 10 ** places), 10 ** places)
    if len(str(whole)) > MAX_DIGITS:
        return None
    return ("-" if exact < 0 else "") + str(whole) + (f".{part:0{places}d}" if places else "")


def value(expr: str) -> Fraction | None:
    """The exact value of an arithmetic expression, or None when it is not one this tool reads."""
    if len(expr) > MAX_CHARS:
        return None
    tokens = TOKEN.findall(expr)
    if "".join(tokens) != re.sub(r"\s+", "", expr):  # letters, `^`, `$`, `=`, ...: not ours to guess
        return None
    parser = Parser(tokens)
    try:
        exact = parser.sum(0)
    except (ValueError, IndexError, ZeroDivisionError):  # IndexError: the tokens ran out
        return None
    return None if parser.tokens else exact


class Parser:
    """sum := product (('+' | '-') product)*;  product := unary (('*' | '/') unary)*;
    unary := ('-' | '+') unary | atom '%'?;  atom := number | '(' sum ')'.  `depth` counts parentheses and signs."""

    def __init__(self, tokens):
        self.tokens = tokens[::-1]  # the next token last, for pop()

    def peek(self):
        return self.tokens[-1] if self.tokens else None

    def sum(self, depth):
        value = self.product(depth)
        while self.peek() in ("+", "-"):
            value = value + self.product(depth) if self.tokens.pop() == "+" else value - self.product(depth)
        return value

    def product(self, depth):
        value = self.unary(depth)
        while self.peek() in ("*", "/"):
            value = value * self.unary(depth) if self.tokens.pop() == "*" else value / self.unary(depth)
        return value

    def unary(self, depth):
        if depth > MAX_DEPTH:
            raise ValueError("nested too deep")
        if self.peek() in ("-", "+"):
            return -self.unary(depth + 1) if self.tokens.pop() == "-" else self.unary(depth + 1)
        value = self.atom(depth)
        if self.peek() == "%":
            self.tokens.pop()
            value /= 100
        return value

    def atom(self, depth):
        token = self.tokens.pop()
        if token == "(":
            value = self.sum(depth + 1)
            if self.tokens.pop() != ")":
                raise ValueError("unclosed parenthesis")
            return value
        if len(token.replace(".", "")) > MAX_DIGITS:
            raise ValueError("number too long")
        return Fraction(token)  # an operator here is a ValueError too


def pieces(text: str) -> list[tuple[str, bool]]:
    """Text cut at finished calls into (piece, written by the tool?), for training to tokenize each alone:
    "3 = <<1+2=3>>3." -> [("3 = <<1+2=", False), ("3>>", True), ("3.", False)]."""
    out, start = [], 0
    for match in DONE.finditer(text):
        out += [(text[start:match.start(1)], False), (match[1], True)]
        start = match.end()
    return out + [(text[start:], False)]
