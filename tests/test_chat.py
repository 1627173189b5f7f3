"""chat.py: byte-exact streaming of multi-byte text, --prompt mode, and the REPL driven through stdin and a
pseudo-terminal (types a question, sees the streamed answer, leaves with exit / Ctrl-D / Ctrl-C).

    python -m pytest tests/test_chat.py -q
"""
import os
import pty
import select
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT

import chat
import data
import generate as gen
from generate import generate
from tinyreason import Decoder
from tokenizer import Tokenizer

QUESTION = "Tom has 3 apples and buys 4 more. How many apples?"
MULTIBYTE = "It’s 5€ for 数学 — ✓ done: 学生 ’€’"
MAX_NEW = 12


def stream(tokenizer, ids):
    decoder = chat.StreamDecoder(tokenizer)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_multibyte_text_splits_across_tokens(tiny_checkpoint):
    """Guards the next test: with byte-level BPE some tokens hold only part of a character."""
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    assert any("\ufffd" in tok.decode([i]) for i in tok.encode(MULTIBYTE))


def test_streamed_pieces_join_to_the_exact_text_and_never_show_half_a_character(tiny_checkpoint):
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    ids = tok.encode(MULTIBYTE)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.real
def test_streaming_is_byte_exact_with_the_real_tokenizer(real_model_dir):
    tok = Tokenizer.from_pretrained(real_model_dir)
    text = MULTIBYTE + " 😀 naïve Ünïcödé 𝔘 日本語のテキスト"
    pieces = stream(tok, tok.encode(text))
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    """The greedy answer to QUESTION, generated here in-process."""
    model, tok = Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32), Tokenizer.from_pretrained(tiny_checkpoint)
    prompt = tok.apply_chat(data.prompt_messages(QUESTION, data.SYSTEM_PROMPT))
    return tok.decode(generate(model, tok, [prompt], MAX_NEW)[0][0])


def test_answer_streams_token_by_token(tiny_checkpoint, expected, monkeypatch):
    model, tok = Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32), Tokenizer.from_pretrained(tiny_checkpoint)
    writes = []
    monkeypatch.setattr(sys, "stdout", SimpleNamespace(write=writes.append, flush=lambda: None))
    args = SimpleNamespace(system=data.SYSTEM_PROMPT, max_new_tokens=MAX_NEW, temperature=0.0, top_p=1.0,
                           calculator=False, compile=False)
    chat.answer(model, tok, data.prompt_ids(tok, QUESTION), args)
    text = "".join(writes)
    assert text.startswith(expected + "\n")
    assert len([w for w in writes if w.strip()]) >= MAX_NEW // 2  # many pieces, not one print at the end


def test_the_calculator_s_tokens_stream_like_the_model_s(tiny_checkpoint, monkeypatch):
    model, tok = Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32), Tokenizer.from_pretrained(tiny_checkpoint)
    call = iter(tok.encode("<<2+3="))
    monkeypatch.setattr(gen, "sample", lambda logits, *a: torch.tensor([next(call, tok.eot_id)]))
    writes = []
    monkeypatch.setattr(sys, "stdout", SimpleNamespace(write=writes.append, flush=lambda: None))
    args = SimpleNamespace(system=data.SYSTEM_PROMPT, max_new_tokens=MAX_NEW, temperature=0.0, top_p=1.0,
                           calculator=True, compile=False)
    chat.answer(model, tok, data.prompt_ids(tok, QUESTION), args)
    assert "".join(writes) == "<<2+3=5>>\n"
    pieces = [w for w in writes if w]  # streamed token by token, the tool's tokens as they were written
    assert pieces[-3:] == [*(tok.decode([t]) for t in tok.encode("5>>")), "\n"] and len(pieces) > 3


def chat_command(checkpoint, *flags):
    return [sys.executable, str(ROOT / "chat.py"), "--model", str(checkpoint), "--adapter", "none", "--quantize",
            "none", "--dtype", "fp32", "--device", "cpu", "--temperature", "0", "--max_new_tokens", str(MAX_NEW),
            *flags]


def test_prompt_flag_answers_once_without_a_repl(tiny_checkpoint, expected):
    run = subprocess.run(chat_command(tiny_checkpoint, "--prompt", QUESTION), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(expected + "\n")
    assert "Problem:" not in run.stdout


def test_repl_from_a_stdin_script_answers_then_exits(tiny_checkpoint, expected):
    run = subprocess.run(chat_command(tiny_checkpoint), input=f"{QUESTION}\n\nexit\nnever read\n",
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert expected in run.stdout
    assert run.stdout.count("Problem: ") == 3  # the question, the empty line, then exit


def test_repl_leaves_cleanly_on_ctrl_d(tiny_checkpoint):
    run = subprocess.run(chat_command(tiny_checkpoint), input=f"{QUESTION}\n", capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr
    assert run.stdout.count("Problem: ") == 2


def test_a_line_that_is_not_utf8_is_refused_and_the_session_goes_on(tiny_checkpoint, expected):
    run = subprocess.run(chat_command(tiny_checkpoint), input=b"\xff\xfe what?\n" + QUESTION.encode() + b"\n",
                         capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert run.returncode == 0 and b"Traceback" not in run.stderr
    assert b"not UTF-8 text" in run.stdout and expected.encode() in run.stdout


def test_a_problem_past_the_models_context_is_refused_and_the_session_goes_on(tiny_checkpoint, expected):
    run = subprocess.run(chat_command(tiny_checkpoint), input=f"{'1 + 1 ' * 100}\n{QUESTION}\n", capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr
    assert "tokens, past the model's context of 512" in run.stdout and expected in run.stdout


def test_a_bad_model_folder_is_one_line_without_a_traceback(tmp_path):
    run = subprocess.run(chat_command(tmp_path, "--prompt", QUESTION), capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "no config.json" in run.stderr and "Traceback" not in run.stderr


def read_until(fd, marker: bytes, seen: bytes, timeout=60) -> bytes:
    end = time.time() + timeout
    while marker not in seen and time.time() < end:
        if select.select([fd], [], [], 1)[0]:
            seen += os.read(fd, 4096)
    assert marker in seen, seen[-500:]
    return seen


def test_repl_in_a_terminal_streams_the_answer_and_exits(tiny_checkpoint, expected):
    main, child = pty.openpty()
    proc = subprocess.Popen(chat_command(tiny_checkpoint), stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    try:
        seen = read_until(main, b"Problem: ", b"")
        os.write(main, QUESTION.encode() + b"\n")
        seen = read_until(main, b"Problem: ", seen.split(b"Problem: ", 1)[1])  # the second prompt
        assert expected.replace("\n", "\r\n").encode() in seen  # the tty maps \n to \r\n
        os.write(main, b"quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(main)


def test_repl_leaves_cleanly_on_ctrl_c(tiny_checkpoint):
    # SIGINT back to its default, so Python installs its KeyboardInterrupt handler even when the test runner
    # itself runs in the background (where the shell starts jobs with SIGINT ignored).
    proc = subprocess.Popen(chat_command(tiny_checkpoint), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        read_until(proc.stdout.fileno(), b"Problem: ", b"")
        time.sleep(1)  # a signal between the prompt's flush and the read() behind input() is noticed only later
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
