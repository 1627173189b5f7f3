"""GSM8K formatting, malformed-record handling, completion-only labels and batching.

    python -m pytest tests/test_data.py -q
"""
import json

import pytest
import torch
from conftest import gsm8k_records

import data
from data import IGNORE
from tokenizer import Tokenizer

NATALIA = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer.from_pretrained(tiny_checkpoint)


def test_natalia_record_formats_to_think_block_and_final_answer():
    question, assistant = data.format_example(NATALIA)
    assert question == NATALIA["question"]
    assert assistant == ("<think>\n"
                         "Natalia sold 48/2 = 24 clips in May.\n"
                         "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
                         "</think>\n\n"
                         "**Final Answer:** 72")


def test_answer_commas_are_dropped_in_target_and_gold():
    record = {"question": "How many?", "answer": "It is 1000+80 = <<1000+80=1080>>1,080.\n#### 1,080"}
    assert data.format_example(record)[1].endswith("**Final Answer:** 1080")
    assert data.gold_answer(record) == "1080"


@pytest.mark.parametrize("record", [
    {"question": "q", "answer": "no delimiter 5"},
    {"question": "q", "answer": "<<2+3=5>>\n#### 5"},  # empty steps once annotations go
    {"question": "q", "answer": "two plus three\n#### five"},
    {"question": "q"},
    {"answer": "2+3=5\n#### 5"},
    {"question": "", "answer": "2+3=5\n#### 5"},
])
def test_malformed_record_is_rejected(record):
    assert data.format_example(record) is None


def test_malformed_records_are_counted_and_skipped():
    good = gsm8k_records(20)
    bad = [{"question": "q", "answer": "no delimiter"}, {"question": "q"}, {"question": "q", "answer": "x\n#### ?"}]
    records = good[:10] + bad + good[10:]
    train, val, n_bad = data.prepare_splits(records, num_samples=0, validation_split=0.25, seed=1)
    assert n_bad == 3
    assert sorted(r["question"] for r in train + val) == sorted(r["question"] for r in good)
    assert len(val) == 5
    train, val, n_bad = data.prepare_splits(records, num_samples=8, validation_split=0.25, seed=1)
    assert (len(train), len(val), n_bad) == (6, 2, 3)  # subsampling is not skipping


def test_split_is_deterministic_in_the_seed_and_subsamples():
    records = gsm8k_records(50)
    a = data.prepare_splits(records, num_samples=30, validation_split=0.1, seed=7)
    b = data.prepare_splits(records, num_samples=30, validation_split=0.1, seed=7)
    c = data.prepare_splits(records, num_samples=30, validation_split=0.1, seed=8)
    assert a == b and a != c
    assert (len(a[0]), len(a[1])) == (27, 3)


def test_local_jsonl_json_and_parquet_load_the_same_records(tmp_path):
    records = gsm8k_records(5)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(records))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.parquet"):
        assert data.load_records(str(tmp_path / name)) == records


def test_file_without_question_answer_fields_names_the_file(tmp_path):
    path = tmp_path / "wrong.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    with pytest.raises(ValueError, match="wrong.jsonl.*'question' and 'answer'"):
        data.load_records(str(path))


GOOD_LINE = json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"})


@pytest.mark.parametrize("name, text, message", [
    ("bad.jsonl", f"{GOOD_LINE}\n\n{{'question': 1}}\n", r"bad.jsonl, line 3: not valid JSON"),  # blank lines count
    ("lines.json", f"{GOOD_LINE}\n{GOOD_LINE}\n", r"lines.json, line 2: not valid JSON .*one object per line"),
    ("list.jsonl", f"{GOOD_LINE}\n[1, 2]\n", r"list.jsonl, line 2: expected an object .*got \[1, 2\]"),
    ("strings.json", json.dumps([json.loads(GOOD_LINE), "text"]), r"strings.json, record 1: expected an object"),
    ("object.json", GOOD_LINE, r"object.json: expected a JSON list of records"),
])
def test_a_broken_data_file_is_named_with_its_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        data.load_records(str(tmp_path / name))


def test_missing_local_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_records(str(tmp_path / "nope.jsonl"))


def test_labels_cover_exactly_the_assistant_turn_and_its_im_end(tokenizer):
    question, assistant = data.format_example(NATALIA)
    ex = data.build_example(tokenizer, NATALIA)
    prompt_ids = tokenizer.apply_chat(data.prompt_messages(question), add_generation_prompt=True)
    n_prompt = len(prompt_ids)
    assert ex["input_ids"][:n_prompt] == prompt_ids
    assert ex["labels"][:n_prompt] == [IGNORE] * n_prompt
    targets = ex["labels"][n_prompt:]
    assert IGNORE not in targets and targets == ex["input_ids"][n_prompt:]
    assert tokenizer.decode(targets[:-1]) == assistant
    assert targets[-1] == tokenizer.eot_id
    # The sequence ends at the assistant's <|im_end|>: the template's trailing newline is not kept.
    full = tokenizer.apply_chat(data.prompt_messages(question) + [{"role": "assistant", "content": assistant}],
                                add_generation_prompt=False)
    assert full == ex["input_ids"] + tokenizer.encode("\n")


def test_with_the_calculator_the_model_writes_the_call_and_the_tool_result_is_masked(tokenizer):
    question, assistant = data.format_example(NATALIA, calculator=True)
    assert "Natalia sold 48/2 = <<48/2=24>>24 clips in May." in assistant
    ex = data.build_example(tokenizer, NATALIA, calculator=True)
    n_prompt = len(tokenizer.apply_chat(data.prompt_messages(question)))
    masked = [i for i in range(n_prompt, len(ex["labels"])) if ex["labels"][i] == IGNORE]
    assert [tokenizer.decode([ex["input_ids"][i]]) for i in masked] == [*"24", ">>", *"72", ">>"]
    targets = [t for t in ex["labels"][n_prompt:] if t != IGNORE]
    assert "Natalia sold 48/2 = <<48/2=" in tokenizer.decode(targets)
    assert tokenizer.decode(ex["input_ids"][n_prompt:-1]) == assistant


def test_annotations_keep_the_tool_s_writing_or_go_where_the_tool_would_answer_otherwise():
    record = {"question": "q", "answer": "a <<2*2.25=4.50>>4.50 b <<560//10=56>>56 c <<2+2=5>>5\n#### 5"}
    assert data.format_example(record, calculator=True)[1].startswith("<think>\na <<2*2.25=4.5>>4.50 b 56 c 5\n")


def test_over_length_examples_are_dropped_and_counted(tokenizer):
    records = gsm8k_records(10)
    lengths = [len(data.build_example(tokenizer, r)["input_ids"]) for r in records]
    limit = sorted(lengths)[4]
    kept, n_long = data.build_examples(tokenizer, records, max_seq_length=limit)
    assert n_long == sum(n > limit for n in lengths) > 0
    assert len(kept) == len(records) - n_long and all(len(ex["input_ids"]) <= limit for ex in kept)


def test_a_record_too_long_for_certain_is_dropped_without_being_tokenized(tokenizer, monkeypatch):
    huge = {"question": "How many? " * 100_000, "answer": "1 + 1 = 2\n#### 2"}
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text: encode(text) if len(text) < 10_000 else pytest.fail("tokenized"))
    kept, n_long = data.build_examples(tokenizer, [huge, *gsm8k_records(2)], max_seq_length=512)
    assert n_long == 1 and len(kept) == 2


def test_batches_cover_every_example_once_and_group_similar_lengths():
    lengths = [(i * 37) % 101 + 10 for i in range(200)]
    batches = data.length_grouped_batches(lengths, batch_size=4, seed=3, epoch=0, group=50)
    assert sorted(i for b in batches for i in b) == list(range(200))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 1.05 * sum(lengths)
    assert batches == data.length_grouped_batches(lengths, 4, seed=3, epoch=0, group=50)
    assert batches != data.length_grouped_batches(lengths, 4, seed=3, epoch=1, group=50)


def test_collate_right_pads_with_masked_labels(tokenizer):
    examples = [data.build_example(tokenizer, r) for r in gsm8k_records(3)]
    batch = data.collate(examples, tokenizer.pad_id)
    T = max(len(ex["input_ids"]) for ex in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == ex["input_ids"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (T - n)
        assert (batch["input_ids"][row, n:] == tokenizer.pad_id).all()
        assert (batch["labels"][row, n:] == IGNORE).all()
    assert batch["labels"].dtype == torch.long


def test_step_batches_walk_epochs_in_order_and_resume_from_a_position(tokenizer):
    examples = [data.build_example(tokenizer, r) for r in gsm8k_records(10)]  # 5 batches of 2 per epoch
    position, seen = (0, 0), []
    for _ in range(4):  # 4 steps x 3 micro-batches = 12 batches: epochs 0, 1 and two batches of epoch 2
        micro, position = data.step_batches(examples, 2, 3, seed=5, position=position, pad_id=tokenizer.pad_id)
        seen += [mb["input_ids"] for mb in micro]
    assert position == (2, 2)
    again, _ = data.step_batches(examples, 2, 3, seed=5, position=(1, 4), pad_id=tokenizer.pad_id)
    assert all(torch.equal(a, b) for a, b in zip([mb["input_ids"] for mb in again], seen[9:12]))
    first_epoch = sorted(row[row != tokenizer.pad_id].tolist() for t in seen[:5] for row in t)
    assert first_epoch == sorted(ex["input_ids"] for ex in examples)


def test_a_data_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "q", "answer": "a #### 1"}\n', encoding="utf-16")
    with pytest.raises(ValueError, match=r"train\.jsonl: not UTF-8 text \(byte 0"):
        data.load_records(str(path))


def test_a_torn_last_line_of_an_appended_file_is_cut_from_it_with_a_note(tmp_path):
    path, notes = tmp_path / "traces.jsonl", []
    path.write_text('{"question": "a"}\n{"question": "b"}\n{"quest')
    assert data.read_appended(path, notes.append) == [{"question": "a"}, {"question": "b"}]
    assert path.read_text() == '{"question": "a"}\n{"question": "b"}\n' and "dropped its last line" in notes[0]
