"""tasks.py: GSM8K's task is today's grading and rendering exactly; MATH reads the last \\boxed{} and agrees with
math-verify, judges every gold answer equal to itself, skips and names malformed records; a task of your own in one
file trains SFT, then RL, then is evaluated.

    python -m pytest tests/test_tasks.py -q
    TINYREASON_MATH_TRAIN=../shared/math/train.jsonl python -m pytest tests/test_tasks.py -q   # all 7,500 golds too
"""
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, gsm8k_records

import data
import eval as ev
import grade
import rl
import tasks
import train
from tokenizer import Tokenizer

MATH_SAMPLE = ROOT / "tests" / "data" / "math_train_sample.jsonl"
MULTIPLICATION = str(ROOT / "examples" / "multiplication.py")
gsm8k, math = tasks.load_task("gsm8k"), tasks.load_task("math")


def math_records():
    return [json.loads(line) for line in MATH_SAMPLE.read_text().splitlines()]


def test_built_in_tasks_load_by_name_and_a_task_of_your_own_by_its_file(tmp_path):
    assert isinstance(gsm8k, tasks.GSM8K) and isinstance(math, tasks.MATH)
    assert isinstance(tasks.load_task(MULTIPLICATION), tasks.Task)
    mine = tmp_path / "mine.py"
    mine.write_text("import tasks\nclass Upper(tasks.Task):\n    def normalize(self, a):\n"
                    "        return (a or '').strip().upper()\n")
    assert tasks.load_task(f"{mine}:Upper").judge("abc", "ABC")  # a class is instantiated


@pytest.mark.parametrize("spec, message", [("gsm9k", "expected one of gsm8k, math"), ("nowhere.py", "no such file"),
                                           ("tasks:GSM", "GSM should be a tasks.Task"),
                                           (f"{MULTIPLICATION}:problem", "problem should be a tasks.Task")])
def test_an_unknown_task_or_a_name_that_is_no_task_is_refused(spec, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        tasks.load_task(spec)


def test_the_scripts_import_no_math_verify_until_a_math_answer_is_judged():
    code = ("import sys, eval, rl, train, distill, tasks\nassert 'math_verify' not in sys.modules\n"
            "tasks.load_task('math').judge('1', '1')\nassert 'math_verify' in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# ---- GSM8K: today's behaviour, through the task

def test_gsm8k_task_gives_the_gold_and_training_turn_of_the_gsm8k_functions():
    for record in gsm8k_records(300):
        assert gsm8k.gold(record) == data.gold_answer(record)
        for calculator in (False, True):
            example = data.format_example(record, calculator)
            assert gsm8k.solution(record, calculator) == (example[1] if example else None)


@pytest.mark.parametrize("output", [
    "<think>\n48/2 = 24\n</think>\n\n**Final Answer:** 72", "<think>\nx\n</think>\n\n**Final Answer:** $72.00",
    "\\boxed{72}", "so the answer is\n#### 72", "We get 12, then 72 apples.", "<answer>70</answer>", "I do not know."])
@pytest.mark.parametrize("style", grade.STYLES)
def test_gsm8k_task_judges_and_rewards_as_grade_py_does(output, style):
    assert gsm8k.judge(gsm8k.extract(output), "72") == \
        grade.is_correct(grade.normalize(grade.extract_answer(output)), grade.normalize("72"))
    for stopped in (True, False):
        assert gsm8k.rewards(output, "72", style, stopped) == grade.rewards(output, "72", style, stopped)


# ---- MATH: the answer in the last box, judged by math-verify

@pytest.mark.parametrize("output, gold, right", [
    ("so the probability is $\\boxed{\\dfrac{3}{4}}$.", "\\frac{3}{4}", True),
    ("The answer is \\boxed{3/4}", "\\frac{3}{4}", True),
    ("\\boxed{0.75}", "\\frac{3}{4}", True),
    ("Hence \\boxed{x=3}.", "3", True),
    ("\\boxed{ 3 }", "3", True),
    ("\\boxed{\\left( 1, -2 \\right)}", "(1,-2)", True),
    ("\\boxed{[0, 3)}", "x \\in [0, 3)", True),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True),
    ("\\boxed{8+4i}", "4i+8", True),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", True),
    ("\\boxed{2/3}", "\\frac{3}{4}", False),
    ("\\boxed{(1,2)}", "(1,-2)", False),
    ("\\boxed{[0, 3]}", "[0, 3)", False),
    ("\\boxed{\\text{(B)}}", "\\text{(C)}", False),
    ("\\boxed{6.28}", "2\\pi", False),
    ("\\boxed{3} or \\boxed{4}", "3", False),  # the last box is the answer
    ("\\boxed{x^2+1}", "x^2-1", False),
])
def test_math_judgement_agrees_with_math_verify_on_equivalent_and_wrong_spellings(output, gold, right):
    from math_verify import parse, verify
    assert math.judge(math.extract(output), gold) is right
    assert verify(parse(f"${gold}$"), parse(output)) is right  # math-verify reading the whole output itself


def test_every_gold_answer_of_the_sample_is_judged_equal_to_itself_in_its_box():
    records = math_records()
    assert all(math.judge(math.extract(f"so $\\boxed{{{r['answer']}}}$."), r["answer"]) for r in records)


@pytest.mark.skipif(not os.environ.get("TINYREASON_MATH_TRAIN"), reason="set TINYREASON_MATH_TRAIN to MATH's "
                    "train.jsonl (all 7,500 records; about 25 s)")
def test_every_gold_answer_of_math_train_is_judged_equal_to_itself_in_its_box():
    records = math.records(os.environ["TINYREASON_MATH_TRAIN"], "train")
    wrong = [r["answer"] for r in records if not math.judge(math.extract(f"\\boxed{{{r['answer']}}}"), r["answer"])]
    assert len(records) > 7400 and wrong == []


@pytest.mark.parametrize("output, answer", [
    ("\\boxed{1} then \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # the last box, nested braces
    ("<think>\nx\n</think>\n\n**Final Answer:** \\frac{1}{2}", "\\frac{1}{2}"),  # no box: our format's span
    ("The answer is 5.", None),  # no last number: a MATH answer is rarely one
])
def test_math_reads_the_last_box_flexibly(output, answer):
    assert math.extract(output) == answer


@pytest.mark.parametrize("text, style, correct, fmt", [
    ("<think>\nx\n</think>\n\n**Final Answer:** \\boxed{\\frac{6}{8}}", "tinyreason", 1, 1),
    ("<think>\nx\n</think>\n\n**Final Answer:** 0.75", "tinyreason", 0, 0),  # no box in the answer's place
    ("<think>\n\\boxed{0.75}\n</think>\n\n**Final Answer:** so", "tinyreason", 0, 0),
    ("Halving, $\\boxed{\\dfrac34}$.", "boxed", 1, 1),
    ("\\boxed{1} no, $\\boxed{0.75}$", "boxed", 1, 0),  # a second box is not the format
    ("<think>x</think>\n<answer>\\boxed{3/4}</answer>", "answer_tags", 1, 1),
])
def test_math_rewards_read_the_box_where_the_style_puts_it_and_the_format_needs_it(text, style, correct, fmt):
    assert math.rewards(text, "\\frac{3}{4}", style, True) == {"correct": correct, "format": fmt, "reasoning": 0.0}
    assert math.rewards(text, "\\frac{3}{4}", style, False)["correct"] == 0  # cut at the limit: nothing


def test_a_comparison_that_runs_past_the_timeout_is_wrong_not_a_crash(monkeypatch):
    import math_verify.grader
    monkeypatch.setattr(tasks.MATH, "timeout", 1)
    monkeypatch.setattr(math_verify.grader, "sympy_expr_eq", lambda *a, **kw: time.sleep(3) or True)
    t0 = time.time()
    assert math.judge("\\frac{3}{4}", "0.75") is False
    assert time.time() - t0 < 2.5


def test_malformed_math_records_are_skipped_counted_and_named_by_file_and_line(tmp_path):
    good = math_records()[0]
    lines = [good, {**good, "answer": None}, good, {**good, "answer": ""}, {"problem": " ", "answer": "1"}]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    logged = []
    assert math.records(str(path), "train", logged.append) == [good, good]
    assert logged == [f"data: 3 of 5 records of {path} skipped as malformed (line 2, line 4, line 5): a record needs "
                      "a 'problem' and a non-empty 'answer'"]


def test_math_training_turn_is_the_solution_unboxed_then_the_boxed_gold(tiny_checkpoint):
    record = {"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "answer": "\\frac{3}{4}",
              "solution": "We add: $\\frac{2}{4}+\\frac{1}{4}=\\boxed{\\frac{3}{4}}$."}
    turn = "<think>\nWe add: $\\frac{2}{4}+\\frac{1}{4}=\\frac{3}{4}$.\n</think>\n\n**Final Answer:** \\boxed{\\frac{3}{4}}"
    assert math.solution(record) == turn
    assert math.rewards(turn, record["answer"], "tinyreason", True)["correct"] == 1  # what SFT teaches, RL rewards
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    ex = data.build_example(tok, math.sft_record(record))
    assert tok.decode([t for t in ex["labels"] if t != data.IGNORE]) == turn
    assert math.solution({**record, "solution": "We add them: 3/4."}) is None  # no box: no final answer to train


def test_hub_training_records_take_their_answer_from_the_last_box(monkeypatch):
    row = {"problem": "1+1?", "solution": "So $\\boxed{2}$.", "level": "Level 1", "type": "Algebra"}
    monkeypatch.setattr(data, "read_records", lambda source, split, config, fields=None: [("record 0", row)])
    (where, record), *_ = math.load(tasks.HENDRYCKS, "train")
    assert where == "algebra record 0" and len(_) == len(tasks.SUBJECTS) - 1
    assert record == {"problem": "1+1?", "solution": row["solution"], "answer": "2", "subject": "Algebra", "level": "1"}


# ---- a task of your own

def test_the_example_task_s_solution_is_three_true_statements_and_its_judge_reads_one_number():
    record = tasks.load_task(MULTIPLICATION).records("", "train")[0]
    steps = record["solution"]
    assert grade.step_validity(steps) == (3, 3) and steps.endswith(f"= {record['answer']}")
    task = tasks.load_task(MULTIPLICATION)
    assert task.judge("1,234.", "1234") and not task.judge("12 or 1234", "1234")
    assert task.records("", "test")[0] != record  # the splits are drawn apart


def test_a_task_of_your_own_trains_sft_then_rl_then_is_evaluated(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    common = ["--model", str(tiny_checkpoint), "--task", MULTIPLICATION, "--quantize", "none", "--dtype", "fp32",
              "--lora_r", "4", "--lora_alpha", "8", "--logging_steps", "1000", "--eval_steps", "1000"]
    sft = train.main([*common, "--output_dir", str(tmp_path / "sft"), "--adapter_path", str(tmp_path / "sft_adapter"),
                      "--num_samples", "16", "--batch_size", "2", "--gradient_accumulation_steps", "1",
                      "--max_steps", "3", "--save_steps", "3"])
    assert sorted(sft["loss"]) == [1, 2, 3]
    rl_state = rl.main([*common[2:], "--adapter", str(tmp_path / "sft_adapter"), "--output_dir", str(tmp_path / "rl"),
                        "--adapter_path", str(tmp_path / "rl_adapter"), "--prompts_per_step", "2", "--group_size",
                        "2", "--max_new_tokens", "8", "--eval_samples", "2", "--max_steps", "2", "--save_steps", "2"])
    assert sorted(rl_state["reward"]) == [1, 2] and list(rl_state["accuracy"]) == [2]
    out = tmp_path / "preds.jsonl"
    monkeypatch.setattr(sys, "argv", ["eval.py", "--adapter", str(tmp_path / "rl_adapter"), "--limit", "3",
                                      "--max_new_tokens", "4", "--out", str(out), "--device", "cpu"])
    ev.main()  # the adapter's task, from its experiment_config.json
    assert f"task {MULTIPLICATION}" in capsys.readouterr().out
    test_problems = tasks.load_task(MULTIPLICATION).records("", "test")[:3]
    assert [json.loads(line)["gold"] for line in out.read_text().splitlines()] == [r["answer"] for r in test_problems]
