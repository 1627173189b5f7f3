"""distill.py: correct samples kept in the training format, wrong ones dropped by the shared grader, dedup and
--keep_per_question, difficulty counts, resume, and the traces read back by train.py and rl.py.

    python -m pytest tests/test_distill.py -q
"""
import json

import pytest
from conftest import gsm8k_records, write_jsonl

import data
import distill
import rl
from tokenizer import Tokenizer

NATALIA = next(r for r in gsm8k_records(5) if r["answer"].endswith("#### 72"))
RIGHT = "<think>\nShe sold 48/2 = 24 in May.\n48+24 = 72 in all.\n</think>\n\n**Final Answer:** 72"
LONGER = "<think>\nIn May she sold half of 48, so 48/2 = 24.\nIn all 48+24 = 72.\n</think>\n\n**Final Answer:** 72"


def test_correct_samples_are_kept_shortest_first_and_wrong_or_unfinished_ones_dropped():
    samples = [(LONGER, True), (RIGHT.replace("72", "70"), True), (RIGHT, False), (RIGHT, True),
               (RIGHT + "\n", True)]  # the last is RIGHT again once rewritten
    kept, n_correct = distill.select(samples, "72", keep=5)
    assert kept == [RIGHT, LONGER] and n_correct == 3
    assert distill.select(samples, "72", keep=1)[0] == [RIGHT]


def test_a_correct_sample_outside_the_format_is_counted_but_not_kept():
    kept, n_correct = distill.select([("48+24 = 72\n**Final Answer:** 72", True)], "72", keep=1)  # no think block
    assert (kept, n_correct) == ([], 1)


def test_a_trace_record_renders_to_exactly_the_training_turn(tiny_checkpoint):
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    record = {**NATALIA, "assistant": distill.rewrite("  <think>She sold 48/2 = 24 in May.\n48+24 = 72 in all.</think>"
                                                      "\n**Final Answer:**   72  ", "72")}
    assert record["assistant"] == RIGHT
    assert data.format_example(record) == (NATALIA["question"], RIGHT)
    ex = data.build_example(tok, record)
    target = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != data.IGNORE]
    assert tok.decode(target) == RIGHT  # and the <|im_end|> after it, a special token decode leaves out
    assert data.format_example({**NATALIA, "assistant": ""}) is None  # no correct sample: skipped by train.py


def test_a_boxed_teacher_sample_becomes_our_format_with_its_whole_reasoning():
    boxed = "She sold 48/2 = 24 in May, so 48+24 = \\(\\boxed{72}\\) in all."
    two_boxes = "She sold \\boxed{24} in May, so \\boxed{72} in all."
    samples = [(boxed, True), (boxed.replace("72", "70"), True), (two_boxes, True)]
    kept, n_correct = distill.select(samples, "72", keep=2, style="boxed")
    assert n_correct == 2  # the two-box sample is right, but a box would stay in the reasoning
    assert kept == ["<think>\nShe sold 48/2 = 24 in May, so 48+24 = \\(72\\) in all.\n</think>\n\n**Final Answer:** 72"]


@pytest.fixture
def stub_teacher(monkeypatch):
    """The teacher answers every question with RIGHT, LONGER, a wrong answer and an unfinished one."""
    return teach(monkeypatch, [RIGHT, LONGER, RIGHT.replace("72", "9"), RIGHT])


def teach(monkeypatch, texts) -> list:
    """distill.generate answers each question with `texts`, all but the last stopped, its rows ending in reverse
    order; returns the calls' (prompts, batch_size)."""
    calls = []

    def generate(model, tok, prompts, max_new_tokens, temperature, num_samples, generator, batch_size, on_done, compile):
        calls.append((len(prompts), batch_size))
        rows = [tok.encode(t) + ([tok.eot_id] if i < len(texts) - 1 else []) for _ in prompts
                for i, t in enumerate(texts)]
        for row, ids in reversed(list(enumerate(rows))):
            on_done(row, ids)
        return rows, [[True] * len(r) for r in rows]
    monkeypatch.setattr(distill, "generate", generate)
    return calls


def run(checkpoint, data_file, out, *extra):
    distill.main(["--teacher", str(checkpoint), "--data", str(data_file), "--quantize", "none", "--dtype", "fp32",
                  "--device", "cpu", "--out", str(out), "--batch_size", "2", "--keep_per_question", "2", *extra])
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_distill_writes_traces_with_difficulty_and_a_rerun_skips_finished_questions(tiny_checkpoint, tmp_path,
                                                                                   stub_teacher):
    data_file = tmp_path / "q.jsonl"
    write_jsonl(data_file, gsm8k_records(5))
    lines = run(tiny_checkpoint, data_file, tmp_path / "traces.jsonl", "--num_questions", "3")
    natalia = [line for line in lines if line["question"] == NATALIA["question"]]
    assert [line["assistant"] for line in natalia] == [RIGHT, LONGER]
    assert all((line["n_correct"], line["n_samples"]) == (2, 4) for line in natalia)
    others = [line for line in lines if line["question"] != NATALIA["question"]]
    assert len(others) == 2 and all(line["assistant"] == "" and line["n_correct"] == 0 for line in others)
    assert stub_teacher == [(3, 8)]  # 2 questions x 4 samples decode at once

    lines = run(tiny_checkpoint, data_file, tmp_path / "traces.jsonl", "--num_questions", "4")
    assert stub_teacher == [(3, 8), (1, 8)] and len({line["question"] for line in lines}) == 4  # only the new question


def test_an_out_in_a_folder_not_made_yet_is_made_before_the_teacher_samples(tiny_checkpoint, tmp_path, stub_teacher):
    data_file = tmp_path / "q.jsonl"
    data_file.write_text(json.dumps(gsm8k_records(1)[0]) + "\n")
    assert len(run(tiny_checkpoint, data_file, tmp_path / "new" / "traces.jsonl")) == 2


def zone_log(monkeypatch, **fields) -> list[str]:
    """What rl.py's setup logs with --zone 2,5 over `fields`, stopped where the model would load: the questions are
    chosen by then."""
    cfg = rl.RLConfig(zone="2,5", eval_samples=0, prompts_per_step=1, adapter="none", model="x", **fields)
    captured = []

    class Loaded(Exception):
        pass

    def load_base(*args):
        raise Loaded
    monkeypatch.setattr(rl, "load_base", load_base)
    monkeypatch.setattr(rl.Tokenizer, "from_pretrained", lambda path: None)
    monkeypatch.setattr(rl, "context_length", lambda path: None)  # no limit: no question is tokenized
    monkeypatch.setattr(rl, "resolve_checkpoint", lambda path: path)
    monkeypatch.setattr(rl.loop, "log", captured.append)
    with pytest.raises(Loaded):
        rl.setup(cfg)
    return captured


def test_rl_zone_keeps_questions_whose_difficulty_is_in_range(tmp_path, monkeypatch):
    lines = [{**r, "assistant": "", "n_correct": k, "n_samples": 8} for r, k in zip(gsm8k_records(6), (0, 2, 5, 8, 3, 3))]
    lines.append({**lines[1], "assistant": RIGHT})  # a second trace of a question counts once
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert zone_log(monkeypatch, data=str(path))[0].startswith("data: 4 training questions")


def test_distill_on_math_counts_equivalent_boxes_right_and_rl_s_zone_reads_the_counts(tiny_checkpoint, tmp_path,
                                                                                      monkeypatch):
    problems = [{"problem": f"What is {k}/{2 * k}?", "solution": "\\boxed{\\frac{1}{2}}", "answer": "\\frac{1}{2}"}
                for k in range(1, 4)]
    problems[2]["answer"] = "7"  # no sample gets this one right
    data_file = tmp_path / "math.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in problems))
    teach(monkeypatch, ["Halving: $\\boxed{\\dfrac12}$.", "so \\boxed{0.5}", "so \\boxed{2}", "\\boxed{1/2}"])
    lines = run(tiny_checkpoint, data_file, tmp_path / "traces.jsonl", "--task", "math", "--teacher_format", "boxed")
    assert [line["n_correct"] for line in lines if line["answer"] != "7"] == [2, 2, 2, 2]  # the last text was cut
    first = [line for line in lines if line["problem"] == problems[0]["problem"]]
    assert first[0]["assistant"] == "<think>\nso 0.5\n</think>\n\n**Final Answer:** \\boxed{\\frac{1}{2}}"  # shortest
    assert [line["n_correct"] for line in lines if line["answer"] == "7"] == [0]

    assert zone_log(monkeypatch, task="math", data=str(tmp_path / "traces.jsonl"))[-1].startswith(
        "data: 2 training questions")
