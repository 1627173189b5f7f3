"""eval.py: answer extraction and normalization on hand-made outputs, the Wilson interval, and end-to-end runs
on a tiny random checkpoint (base model and with a saved adapter).

    python -m pytest tests/test_eval.py -q
"""
import json
import math
import re
import sys

import pytest
import torch

import config
import data
import eval as ev
import grade
import load
import lora
from conftest import gsm8k_records, write_jsonl
from generate import generate
from tinyreason import Decoder
from tokenizer import Tokenizer


@pytest.mark.parametrize("answer, expected", [
    ("THREE", "3"),                      # case folding, then the word
    ("1, 200", "1200"),                  # comma and space inside a number
    ("42.0", "42"),                      # trailing .0
    ("seven", "7"),
    ("twenty-five", "25"),
    ("one hundred and five", "105"),
    ("two thousand five hundred", "2500"),
    ("$350", "350"),
    ("$1,200.00", "1200"),
    ("1 200", "1200"),                   # a space groups thousands in an answer span
    ("$1 200 000", "1200000"),
    ("12345 678", "12345"),              # but not after four digits
    ("3 apples", "3"),
    ("€1.5", "1.5"),
    ("15 meters", "15"),
    ("3/4", "0.75"),
    ("\\frac{3}{4}", "0.75"),
    ("50%", "50"),
    ("-5", "-5"),
    ("−5", "-5"),                        # Unicode minus
    ("-$5", "-5"),
    ("Each one costs $5", "5"),          # digits win over number words
    ("18 eggs, since 9 * 2 = 18", "18"),  # the first number of the span, not the arithmetic after it
    ("Blue.", "blue"),                   # no number: the lower-cased text
])
def test_normalize_follows_the_recipe_table(answer, expected):
    assert grade.normalize(answer) == expected


@pytest.mark.parametrize("output, expected", [
    ("<think>\n9 * 2 = 18\n</think>\n\n**Final Answer:** 18\n\nCheck: 18 - 9 = 9 and 3 more", "18"),
    ("\\boxed{3} was wrong.\n**Final Answer:** 4", "4"),          # the delimiter beats a box
    ("#### 5, or rather \\boxed{6}", "6"),                         # a box beats ####
    ("\\boxed{1} then \\boxed{\\frac{3}{4}}", "0.75"),            # the last box, nested braces
    ("\\boxed{9}\n**Final Answer:**", "9"),                        # an empty final answer falls through
    ("so the answer is\n#### 1,080\n(since 20 more)", "1080"),     # #### beats the last number
    ("We get 12, then 15 apples.", "15"),                          # else the last number
    ("16-3 = 13", "13"),                                           # a subtraction is not a negative number
    ("the change is -5", "-5"),
    ("total is 1,200", "1200"),
])
def test_extraction_order(output, expected):
    assert grade.normalize(grade.extract_answer(output)) == expected


def test_output_without_an_answer_extracts_nothing_and_is_wrong():
    assert grade.extract_answer("I do not know.") is None
    assert not grade.is_correct(grade.normalize(None), "0")


@pytest.mark.parametrize("pred, gold, correct", [
    ("$1,200.00", "1200", True), ("1200.5", "1200", False), ("0.1", "0.10", True), ("-5", "5", False),
    ("seven", "7", True), ("blue", "blue", True), ("blue", "red", False),
])
def test_answers_compare_numerically(pred, gold, correct):
    assert grade.is_correct(grade.normalize(pred), grade.normalize(gold)) is correct


def test_float_rounding_does_not_make_an_answer_wrong():
    assert grade.is_correct(repr(0.1 + 0.2), "0.3")


@pytest.mark.parametrize("output, compliant", [
    ("<think>\n1 + 1 = 2\n</think>\n\n**Final Answer:** 2", True),
    ("**Final Answer:** 2", False),                                  # no reasoning block
    ("<think>\n1 + 1 = 2\n\n**Final Answer:** 2", False),           # never closed
    ("<think>\n**Final Answer:** 2\n</think>", False),               # answer inside the reasoning
])
def test_format_compliance_needs_a_closed_think_then_the_delimiter(output, compliant):
    assert grade.is_compliant(output, "tinyreason") is compliant


@pytest.mark.parametrize("k, n", [(21, 50), (1, 10), (37, 40), (500, 1319)])
def test_wilson_bounds_are_where_the_score_test_reaches_z(k, n):
    """The Wilson interval inverts the score test: at each bound p0, |k/n - p0| / sqrt(p0 (1 - p0) / n) = z."""
    z, p = 1.959964, k / n
    lo, hi = grade.wilson(k, n)
    assert lo < p < hi
    for p0 in (lo, hi):
        assert abs(p - p0) / math.sqrt(p0 * (1 - p0) / n) == pytest.approx(z, rel=1e-9)


def test_wilson_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    ci = stats.binomtest(21, 50).proportion_ci(confidence_level=0.95, method="wilson")
    assert grade.wilson(21, 50) == pytest.approx((ci.low, ci.high), abs=1e-6)  # about (0.2938, 0.5577)


def test_wilson_stays_inside_0_1_at_the_extremes():
    lo, hi = grade.wilson(0, 10)
    assert lo == 0 and 0 < hi < 0.5
    lo, hi = grade.wilson(10, 10)
    assert 0.5 < lo and hi == pytest.approx(1)


# ---- end to end on the tiny random checkpoint

@pytest.fixture
def gsm_file(tmp_path):
    path = tmp_path / "gsm.jsonl"
    write_jsonl(path, gsm8k_records(5))
    return path


def run_eval(monkeypatch, capsys, *flags):
    monkeypatch.setattr(sys, "argv", ["eval.py", "--quantize", "none", "--dtype", "fp32", "--device", "cpu",
                                      "--max_new_tokens", "6", "--batch_size", "2", *map(str, flags)])
    ev.main()
    return capsys.readouterr().out.strip().splitlines()


def answering(answer):
    """A stand-in for eval's generate: each prompt's answer is answer(prompt), each row ended through on_done."""
    def generate(model, tok, prompts, *args, on_done, **kw):
        rows = [answer(p) for p in prompts]
        for row, ids in enumerate(rows):
            on_done(row, ids)
        return rows, [[True] * len(ids) for ids in rows]
    return generate


def greedy(model, tokenizer, prompt, n=6):
    return tokenizer.decode(generate(model, tokenizer, [prompt], n)[0][0])


def test_eval_reports_and_writes_one_line_per_problem(tiny_checkpoint, gsm_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "preds.jsonl"
    lines = run_eval(monkeypatch, capsys, "--model", tiny_checkpoint, "--adapter", "none", "--data", gsm_file,
                     "--limit", 0, "--out", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question"] for r in rows] == [r["question"] for r in gsm8k_records(5)]
    assert all(r.keys() >= {"question", "gold", "output", "extracted", "normalized", "correct"} for r in rows)
    assert [r["gold"] for r in rows] == [r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
                                         for r in gsm8k_records(5)]
    k = sum(r["correct"] for r in rows)
    assert lines[-1] == f"accuracy: {k / 5:.4f} ({k}/5)"
    assert re.fullmatch(r"accuracy: \d\.\d{4} \(\d+/\d+\)", lines[-1])
    report = "\n".join(lines)
    for label in ("95% Wilson interval", "format compliance", "mean generated tokens", "tok/s"):
        assert label in report


def test_markdown_report_gives_the_interval_lengths_and_wrong_answers_beside_the_gold():
    rows = [dict(question=f"Q{i} | how many?", gold=str(i), output=f"<think>\nx\n</think>\n\n**Final Answer:** {i + i % 2}",
                 normalized=str(i + i % 2), correct=i % 2 == 0, compliant=True, tokens=10 * i, stopped=i < 8) for i in range(1, 9)]
    report = ev.markdown_report(rows, "tiny", max_new_tokens=80)
    assert "accuracy: **0.500** (4/8), 95% Wilson interval [0.215, 0.785]" in report
    assert "median 50, 90th percentile 70, max 80; 1 of 8 cut at --max_new_tokens 80" in report
    wrong = [line for line in report.splitlines() if line.startswith("| Q")]
    assert len(wrong) == 4 and wrong[0].startswith("| Q1 \\| how many? | 1 | 2 |")  # a | in the text stays one cell


@pytest.mark.parametrize("style, answer", [("tinyreason", "<think>\nx\n</think>\n\n**Final Answer:** 72"),
                                           ("answer_tags", "<think>\nx\n</think>\n<answer>72</answer>")])
def test_a_right_answer_in_the_trained_format_is_scored_correct_end_to_end(tiny_checkpoint, tmp_path, monkeypatch,
                                                                            capsys, style, answer):
    natalia = next(r for r in gsm8k_records(5) if r["answer"].endswith("#### 72"))
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(natalia) + "\n")
    ids = Tokenizer.from_pretrained(tiny_checkpoint).encode(answer)
    monkeypatch.setattr(ev, "generate", answering(lambda prompt: ids))
    out = tmp_path / "preds.jsonl"
    lines = run_eval(monkeypatch, capsys, "--model", tiny_checkpoint, "--adapter", "none", "--data", path,
                     "--limit", 0, "--out", out, "--prompt_style", style)
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["output"] == answer and row["normalized"] == row["gold"] == "72"
    assert row["correct"] is True and row["compliant"] is True
    assert lines[-1] == "accuracy: 1.0000 (1/1)"


def test_batched_sorted_eval_keeps_each_output_with_its_problem(tiny_checkpoint, gsm_file, tmp_path, monkeypatch,
                                                                capsys):
    out = tmp_path / "preds.jsonl"
    run_eval(monkeypatch, capsys, "--model", tiny_checkpoint, "--adapter", "none", "--data", gsm_file,
             "--limit", 3, "--out", out, "--prompt_style", "boxed")
    model, tok = Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32), Tokenizer.from_pretrained(tiny_checkpoint)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    for row, record in zip(rows, gsm8k_records(3)):
        prompt = tok.apply_chat([{"role": "user", "content": record["question"] + data.BOXED_SUFFIX}])
        assert row["output"] == greedy(model, tok, prompt)


def test_eval_loads_the_adapter_and_its_experiment_config(tiny_checkpoint, gsm_file, tmp_path, monkeypatch, capsys):
    model = lora.inject(Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32), r=4, alpha=8)
    torch.manual_seed(0)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.5)  # a trained-looking adapter: outputs must change
    adapter = tmp_path / "adapter"
    lora.save_adapter(model, adapter, str(tiny_checkpoint))
    (adapter / "experiment_config.json").write_text(json.dumps({"test_samples": 2}))
    system = "Think, then answer."
    out = tmp_path / "preds.jsonl"
    lines = run_eval(monkeypatch, capsys, "--adapter", adapter, "--data", gsm_file, "--out", out, "--system", system)
    assert lines[-1].endswith("/2)")  # test_samples from the config; the model from adapter_config.json
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    base = Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    for row, record in zip((json.loads(line) for line in out.read_text().splitlines()), gsm8k_records(2)):
        prompt = tok.apply_chat([{"role": "system", "content": system}, {"role": "user", "content": record["question"]}])
        assert row["output"] == greedy(model, tok, prompt)
        assert row["output"] != greedy(base, tok, prompt)


@pytest.mark.parametrize("trained_with, flags, on", [(True, [], True), (True, ["--no-calculator"], False),
                                                     (False, [], False), (False, ["--calculator"], True)])
def test_the_calculator_is_on_for_an_adapter_trained_with_it_unless_a_flag_says(tiny_checkpoint, tmp_path,
                                                                                 trained_with, flags, on):
    adapter = tmp_path / "adapter"
    lora.save_adapter(lora.inject(Decoder.from_pretrained(tiny_checkpoint), r=4), adapter, str(tiny_checkpoint))
    (adapter / "experiment_config.json").write_text(json.dumps({"calculator": trained_with}))
    args = config.parse_config(load.ModelFlags, ["--adapter", str(adapter), *flags])
    load.resolve_model_flags(args)
    assert args.calculator is on


@pytest.fixture
def no_model_load(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(Decoder, "from_pretrained", fail)


def test_missing_adapter_folder_is_reported_before_loading(tmp_path, gsm_file, monkeypatch, capsys, no_model_load):
    with pytest.raises(SystemExit, match="--adapter.*nowhere"):
        run_eval(monkeypatch, capsys, "--adapter", tmp_path / "nowhere", "--data", gsm_file)


def test_adapter_folder_without_config_is_reported(tmp_path, gsm_file, monkeypatch, capsys, no_model_load):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="adapter_config.json"):
        run_eval(monkeypatch, capsys, "--adapter", tmp_path / "adapter", "--data", gsm_file)


def test_data_without_answer_field_is_reported_before_loading(tmp_path, tiny_checkpoint, monkeypatch, capsys,
                                                              no_model_load):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1 + 1?", "answer": "2\n#### 2"}) + "\n" + json.dumps({"question": "2?"}))
    with pytest.raises(SystemExit, match="record 1.*answer"):
        run_eval(monkeypatch, capsys, "--model", tiny_checkpoint, "--adapter", "none", "--data", bad, "--limit", 0)


def test_missing_data_file_is_reported_before_loading(tmp_path, tiny_checkpoint, monkeypatch, capsys, no_model_load):
    with pytest.raises(SystemExit, match="--data.*missing.jsonl"):
        run_eval(monkeypatch, capsys, "--model", tiny_checkpoint, "--adapter", "none", "--data",
                 tmp_path / "missing.jsonl")


def test_an_out_file_that_is_the_data_file_is_refused_before_loading(tiny_checkpoint, gsm_file, monkeypatch, capsys,
                                                                     no_model_load):
    before = gsm_file.read_text()
    with pytest.raises(SystemExit, match="--out .* is, holds or lies inside --data"):
        run_eval(monkeypatch, capsys, "--model", tiny_checkpoint, "--adapter", "none", "--data", gsm_file,
                 "--out", gsm_file)
    assert gsm_file.read_text() == before


def test_missing_model_folder_is_reported(tmp_path, gsm_file, monkeypatch, capsys, no_model_load):
    with pytest.raises(SystemExit, match="--model.*no_model"):
        run_eval(monkeypatch, capsys, "--model", tmp_path / "no_model", "--adapter", "none", "--data", gsm_file)


# ---- --task math and --rescore

def test_rescoring_an_eval_out_file_gives_back_its_lines_and_accuracy(tiny_checkpoint, gsm_file, tmp_path,
                                                                       monkeypatch, capsys):
    out, again = tmp_path / "preds.jsonl", tmp_path / "again.jsonl"
    lines = run_eval(monkeypatch, capsys, "--model", tiny_checkpoint, "--adapter", "none", "--data", gsm_file,
                     "--limit", 0, "--out", out)
    rescored = run_eval(monkeypatch, capsys, "--rescore", out, "--out", again, "--model", "/nowhere")  # no model
    assert again.read_text() == out.read_text()
    assert rescored[-1] == lines[-1] and "tok/s" not in "\n".join(rescored)


MATH_ROWS = [("What is $1+1$?", "2", "so $\\boxed{2}$.", 1, "Algebra"),
             ("Add $8$ and $4i$.", "8+4i", "\\boxed{4i+8}", 2, "Algebra"),
             ("Solve $x+1=4$.", "3", "x = \\boxed{4}", 2, "Prealgebra")]


def test_math_eval_judges_the_last_box_and_reports_accuracy_by_level_and_subject(tiny_checkpoint, tmp_path,
                                                                                 monkeypatch, capsys):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(dict(problem=q, solution=f"\\boxed{{{a}}}", answer=a, level=lv, subject=s))
                            + "\n" for q, a, _, lv, s in MATH_ROWS))
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    outputs = {q: tok.encode(o) + [tok.eot_id] for q, _, o, _, _ in MATH_ROWS}
    monkeypatch.setattr(ev, "generate", answering(lambda p: next(ids for q, ids in outputs.items() if q in tok.decode(p))))
    out = tmp_path / "preds.jsonl"
    lines = run_eval(monkeypatch, capsys, "--model", tiny_checkpoint, "--adapter", "none", "--task", "math",
                     "--data", path, "--limit", 0, "--out", out, "--prompt_style", "boxed")
    assert [json.loads(line)["correct"] for line in out.read_text().splitlines()] == [True, True, False]
    assert lines[-1] == "accuracy: 0.6667 (2/3)"
    report = "\n".join(lines)
    assert "accuracy by level:\n  1: 1.0000 (1/1)" in report and "  2: 0.5000 (1/2)" in report
    assert "accuracy by subject:\n  Algebra: 1.0000 (2/2)" in report and "  Prealgebra: 0.0000 (0/1)" in report


def test_rescoring_with_another_task_regrades_without_generating(tmp_path, monkeypatch, capsys):
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(dict(question=q, gold=a, output=o, level=lv, subject=s, tokens=5,
                                            stopped=True)) + "\n" for q, a, o, lv, s in MATH_ROWS))
    gsm = run_eval(monkeypatch, capsys, "--rescore", path)  # GSM8K reads a first number: 4i+8 as 4
    math = run_eval(monkeypatch, capsys, "--rescore", path, "--task", "math")
    assert gsm[-1] == "accuracy: 0.3333 (1/3)" and math[-1] == "accuracy: 0.6667 (2/3)"
    assert (tmp_path / "preds.rescored.jsonl").is_file() and "accuracy by level:" in "\n".join(math)


def test_a_file_that_eval_did_not_write_is_refused_for_rescoring(tmp_path, monkeypatch, capsys):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "1\n#### 1"}) + "\n")
    with pytest.raises(SystemExit, match="other.jsonl line 1 is not a line eval.py --out wrote"):
        run_eval(monkeypatch, capsys, "--rescore", path)


@pytest.mark.parametrize("b, c", [(29, 13), (0, 0), (5, 0), (3, 3), (1, 9), (40, 38)])
def test_mcnemar_p_is_the_exact_two_sided_binomial_test_of_the_discordant_pairs(b, c):
    from scipy.stats import binomtest
    expected = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    assert grade.mcnemar_p(b, c) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_of_29_against_13_is_0_02():
    assert grade.mcnemar_p(29, 13) == pytest.approx(0.01952, abs=1e-5)  # 2 * P(Binomial(42, 1/2) <= 13)


def out_file(path, right):
    path.write_text("".join(json.dumps(dict(question=f"q{i}", gold="1", output="", correct=r)) + "\n"
                            for i, r in enumerate(right)))
    return path


def test_compare_pairs_two_out_files_by_question(tmp_path, monkeypatch, capsys):
    a = out_file(tmp_path / "a.jsonl", [True, True, False, False, True])
    b = out_file(tmp_path / "b.jsonl", [True, False, True, False, False])
    lines = run_eval(monkeypatch, capsys, "--compare", a, b)
    assert lines[0] == "5 problems, paired: both right 1, only A 2, only B 1, neither 1"
    assert lines[1].startswith(f"A {a}: accuracy 0.6000 (3/5)") and lines[2].startswith(f"B {b}: accuracy 0.4000 (2/5)")
    assert lines[3] == "exact McNemar p = 1 (two-sided, 3 problems on which they differ)"


def test_compare_refuses_files_of_different_problems(tmp_path, monkeypatch, capsys):
    a = out_file(tmp_path / "a.jsonl", [True, True])
    b = out_file(tmp_path / "b.jsonl", [True, True, False])
    with pytest.raises(SystemExit, match="are not the same problems \\(1 questions are in one file only\\)"):
        run_eval(monkeypatch, capsys, "--compare", a, b)
