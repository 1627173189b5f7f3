"""The calculator tool. GSM8K's solutions carry their arithmetic as calls, `<<48/2=24>>`: the model writes
`<<48/2=`, the tool computes `24` and writes `24>>`, and the model goes on from there.

    tool_output("Natalia sold 48/2 = <<48/2=")  ->  "24>>"
    evaluate("1.5*(2+3)")                        ->  "7.5"

The expression comes from a model, or from whatever a chat user typed, so it is never given to `eval`: a small
recursive-descent parser reads numbers, + - * /, parentheses, unary minus, decimals and percent, exactly (fractions),
and gives up (None) on anything else, on division by zero and past the size limits. Then the model continues as if
there were no tool.
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


class Unreadable(Exception):
    pass


def tool_output(text: str) -> str | None:
    """What the tool appends to `text` when it ends in an open call `<<EXPR=`: the result and `>>`; else None."""
    match = CALL.search(text)
    value = evaluate(match[1]) if match else None
    return None if value is None else value + ">>"


def evaluate(expr: str) -> str | None:
    """The value of an arithmetic expression written as GSM8K writes it ("24", "0.5", "3.33"), or None when it
    is not one this tool reads, divides by zero or is too large."""
    exact = value(expr)
    return None if exact is None else write(exact)


def value(expr: str) -> Fraction | None:
    """The exact value of an arithmetic expression, or None when it is not one this tool reads."""
    if len(expr) > MAX_CHARS:
        return None
    tokens = TOKEN.findall(expr)
    if "".join(tokens) != re.sub(r"\s+", "", expr):  # letters, `^`, `$`, `=`, ...: not ours to guess
        return None
    try:
        parser = Parser(tokens)
        exact = parser.sum(0)
        return exact if parser.peek() is None else None
    except (Unreadable, ZeroDivisionError):
        return None


class Parser:
    """sum := product (('+' | '-') product)*;  product := unary (('*' | '/') unary)*;
    unary := '-' unary | '+' unary | atom '%'?;  atom := number | '(' sum ')'."""

    def __init__(self, tokens):
        self.tokens, self.i = tokens, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self):
        token = self.peek()
        if token is None:
            raise Unreadable
        self.i += 1
        return token

    def sum(self, depth):
        value = self.product(depth)
        while self.peek() in ("+", "-"):
            value = value + self.product(depth) if self.take() == "+" else value - self.product(depth)
        return value

    def product(self, depth):
        value = self.unary(depth)
        while self.peek() in ("*", "/"):
            value = value * self.unary(depth) if self.take() == "*" else value / self.unary(depth)
        return value

    def unary(self, depth):
        if depth > MAX_DEPTH:
            raise Unreadable
        if self.peek() in ("-", "+"):
            return -self.unary(depth + 1) if self.take() == "-" else self.unary(depth + 1)
        value = self.atom(depth)
        if self.peek() == "%":
            self.take()
            value /= 100
        return value

    def atom(self, depth):
        token = self.take()
        if token == "(":
            value = self.sum(depth + 1)
            if self.take() != ")":
                raise Unreadable
            return value
        if token in ("+", "-", "*", "/", ")", "%") or len(token.replace(".", "")) > MAX_DIGITS:
            raise Unreadable
        return Fraction(token)


def write(value: Fraction) -> str | None:
    """24, -3, 0.5, 1.25: exact, no float noise, no thousands separators; a value with no short finite decimal
    (10/3) rounded as GSM8K writes it, 3.33. None past MAX_DIGITS integer digits."""
    if not any((value * 10 ** k).denominator == 1 for k in range(MAX_DIGITS + 1)):
        value = round(value, DECIMALS)
    places = next(k for k in range(MAX_DIGITS + 1) if (value * 10 ** k).denominator == 1)
    digits = str(abs(value * 10 ** places)).rjust(places + 1, "0")  # the decimal digits, as one integer
    whole, part = digits[:len(digits) - places], digits[len(digits) - places:]
    if len(whole) > MAX_DIGITS:
        return None
    return ("-" if value < 0 else "") + whole + ("." + part if part else "")


def pieces(text: str) -> list[tuple[str, bool]]:
    """A text with finished calls cut into (piece, written by the tool): "3 = <<1+2=3>>3." ->
    [("3 = <<1+2=", False), ("3>>", True), ("3.", False)]. Training tokenizes each piece alone, as generation
    writes them, and trains on the model's pieces only."""
    out, start = [], 0
    for match in DONE.finditer(text):
        out += [(text[start:match.start(1)], False), (match[1], True)]
        start = match.end()
    return out + [(text[start:], False)]
