"""calculator.py: the safe evaluator, and generation that writes the tool's result for the model."""
import time

import pytest
import torch

import generate as gen
from calculator import evaluate, pieces, tool_output
from generate import generate
from tinyreason import Decoder
from tokenizer import Tokenizer


@pytest.mark.parametrize("expression, value", [
    ("48/2", "24"), ("48+24", "72"), ("3-8", "-5"), ("1.5*3", "4.5"), ("0.1+0.2", "0.3"), (".25*344", "86"),
    ("2*(3+(4-1))*2", "24"), ("-(2+3)", "-5"), ("50%*80", "40"), ("10/4", "2.5"), ("5/4", "1.25"), ("10/3", "3.33"),
    ("2/3", "0.67"), ("1000*1000", "1000000"), (" 2 * 3 ", "6"),
    ("1/0", None), ("5/(2-2)", None), ("9**9**9", None), ("2^3", None), ("x*2", None), ("1e999", None),
    ("$5*2", None), ("", None), ("(2", None), ("2+", None), ("1" * 1000, None), ("9" * 16, None),
    ("(" * 30 + "1" + ")" * 30, None), ("__import__('os')", None),
])
def test_evaluator_reads_arithmetic_exactly_and_nothing_else(expression, value):
    assert evaluate(expression) == value


def test_hostile_expressions_cost_microseconds():
    hostile = ["9**9**9", "9" * 10_000, "(" * 10_000, "1" + "*999999999999999" * 5, "-" * 1000 + "1", "1/" * 40 + "3"]
    start = time.perf_counter()
    assert [evaluate(e) for e in hostile] == [None] * len(hostile)
    assert time.perf_counter() - start < 0.05


def test_only_text_ending_in_an_open_call_gets_the_tool_output():
    assert tool_output("Natalia sold 48/2 = <<48/2=") == "24>>"
    assert tool_output("so 48/2 =") is None  # no call
    assert tool_output("<<48/2=24>> so 3 =") is None  # the call is closed
    assert tool_output("<<48/x=") is None  # a call the tool cannot answer: the model goes on alone


def test_pieces_mark_what_the_tool_wrote():
    assert pieces("3 = <<1+2=3>>3, 8 = <<2*4=8>>8.") == [
        ("3 = <<1+2=", False), ("3>>", True), ("3, 8 = <<2*4=", False), ("8>>", True), ("8.", False)]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32), Tokenizer.from_pretrained(tiny_checkpoint)


def scripted(monkeypatch, tok, texts):
    """Row i's sampler emits texts[i] first, then the model's greedy tokens (rows must all stay live)."""
    scripts, step, real = [tok.encode(t) for t in texts], [0], gen.sample

    def sample(logits, *args):
        greedy, s = real(logits, 0.0, 1.0).tolist(), step[0]
        step[0] += 1
        return torch.tensor([script[s] if s < len(script) else g for script, g in zip(scripts, greedy)])
    monkeypatch.setattr(gen, "sample", sample)


def prompts(tok, n):
    return [tok.apply_chat([{"role": "user", "content": f"question {i}"}]) for i in range(n)]


def test_the_tool_writes_the_result_and_the_model_continues_after_it(tiny, monkeypatch):
    model, tok = tiny
    prompt = prompts(tok, 1)
    scripted(monkeypatch, tok, ["<<2+3="])
    [out], [sampled] = generate(model, tok, prompt, 20, stop_ids=[-1], calculator=True)
    call, result = tok.encode("<<2+3="), tok.encode("5>>")
    assert out[:len(call) + len(result)] == call + result
    assert [i for i, s in enumerate(sampled) if not s] == list(range(len(call), len(call) + len(result)))
    monkeypatch.undo()  # the continuation is the model's own, as if it had read `<<2+3=5>>` in its prompt
    rest = generate(model, tok, [prompt[0] + call + result], 20 - len(call) - len(result), stop_ids=[-1])[0][0]
    assert out[len(call) + len(result):] == rest


def test_without_the_calculator_the_model_samples_every_token(tiny, monkeypatch):
    model, tok = tiny
    scripted(monkeypatch, tok, ["<<2+3="])
    [out], [sampled] = generate(model, tok, prompts(tok, 1), 12, stop_ids=[-1])
    assert tok.decode(out[:9]) != "<<2+3=5>>" and all(sampled) and len(sampled) == len(out)


def test_rows_calling_the_tool_at_different_steps_each_get_their_own_result(tiny, monkeypatch):
    model, tok = tiny
    texts = ["<<2+3=", "so 7 = <<10/4=", "no call at all"]
    scripted(monkeypatch, tok, texts)
    batched, sampled = generate(model, tok, prompts(tok, 3), 24, stop_ids=[-1], calculator=True)
    forced = [[i for i, s in enumerate(row) if not s] for row in sampled]
    assert [tok.decode(row).startswith(t) for row, t in zip(batched, ["<<2+3=5>>", "so 7 = <<10/4=2.5>>"])] == [True] * 2
    assert [len(f) for f in forced] == [len(tok.encode("5>>")), len(tok.encode("2.5>>")), 0]
    assert forced[0][0] < forced[1][0]  # row 1 called later
    for i, text in enumerate(texts):  # each row as if it were alone
        scripted(monkeypatch, tok, [text])
        assert generate(model, tok, [prompts(tok, 3)[i]], 24, stop_ids=[-1], calculator=True)[0][0] == batched[i]
