"""Step-aware reasoning: the UPEV format, stage ids per token, the stage-weighted loss, the gated verification
adapter (training, generation, save/load) and the metrics.

    python -m pytest tests/test_stages.py -q
"""
import json
from contextlib import nullcontext

import pytest
import torch
from conftest import gsm8k_records, write_jsonl

import data
import generate as gen
import lora
import stages
import train
from data import IGNORE
from load import load_model
from tinyreason import Decoder
from tokenizer import Tokenizer

NATALIA = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}
NATALIA_UPEV = ("<think>\n"
                "UNDERSTAND\n"
                "Asked: How many clips did Natalia sell altogether in April and May?\n"
                "Given: 48\n"
                "PLAN\n"
                "1. 48/2\n"
                "2. 48+24\n"
                "EXECUTE\n"
                "Natalia sold 48/2 = 24 clips in May.\n"
                "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
                "VERIFY\n"
                "48/2 = 24 ✓\n"
                "48+24 = 72 ✓\n"
                "Answer 72 = step 2 ✓\n"
                "</think>\n\n"
                "**Final Answer:** 72")
SCALER = torch.amp.GradScaler("cpu", enabled=False)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def upev_examples(tokenizer):
    records = [stages.upev_record(r) for r in [NATALIA, *gsm8k_records(8)]]
    return [data.build_example(tokenizer, r) for r in records if r["assistant"]][:4]


def lora_model(checkpoint, verify=False):
    """fp32 tiny model whose adapters' B are random, so every adapter weight gets a gradient."""
    torch.manual_seed(0)
    model = lora.inject(Decoder.from_pretrained(checkpoint, dtype=torch.float32, device="cpu"), r=4, alpha=8)
    if verify:
        stages.add_verify_adapter(model, Tokenizer.from_pretrained(checkpoint), r=2, alpha=4)
    for name, p in model.named_parameters():
        if name.endswith(("lora_B.weight", "verify_B.weight")):
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def grads(model, part):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and part in n}


def test_natalia_renders_to_the_four_stages():
    assert stages.upev_record(NATALIA)["assistant"] == NATALIA_UPEV
    assert data.format_example(stages.upev_record(NATALIA)) == (NATALIA["question"], NATALIA_UPEV)


@pytest.mark.parametrize("answer", [
    "She sold 48/2 = 24 clips.\n#### 24",  # no annotations
    "She sold 48/2 = <<48/2=25>>25 clips.\n#### 25",  # an annotation that does not recompute
    "She sold 48/2 = <<48/2=24>>24 clips, and 24 more.\n#### 48",  # no step computed the answer
])
def test_records_that_cannot_be_verified_are_skipped_and_counted_as_malformed(answer):
    records = [stages.upev_record(r) for r in [NATALIA, {"question": "How many?", "answer": answer}]]
    train_records, _, n_bad = data.prepare_splits(records, 0, 0.0, seed=0)
    assert n_bad == 1 and [r["question"] for r in train_records] == [NATALIA["question"]]


def test_a_record_with_the_four_stages_as_fields_is_rendered_as_given():
    record = {"question": "q", "answer": "#### 1,000", "understand": "u", "plan": "p", "execute": "e ", "verify": "v"}
    assert stages.upev_record(record)["assistant"] == (
        "<think>\nUNDERSTAND\nu\nPLAN\np\nEXECUTE\ne\nVERIFY\nv\n</think>\n\n**Final Answer:** 1000")


def test_a_ready_assistant_turn_is_kept():
    record = {"question": "q", "answer": "#### 1", "assistant": "<think>\nmine\n</think>\n\n**Final Answer:** 1"}
    assert stages.upev_record(record) == record


def stage_ids(tokenizer, batch, examples):
    """Each position's stage in a collated batch, -1 on the prompt and the padding."""
    out = torch.full(batch["input_ids"].shape, -1)
    for row, ex in enumerate(examples):
        n = next(i for i, label in enumerate(ex["labels"]) if label != IGNORE)
        out[row, n:len(ex["input_ids"])] = torch.tensor(stages.token_stages(tokenizer, ex["input_ids"][n:]))
    return out


def test_each_stage_starts_at_the_token_completing_its_tag_and_the_end_counts_in_verify(tokenizer):
    ex = data.build_example(tokenizer, stages.upev_record(NATALIA))
    n = ex["labels"].index(ex["input_ids"][-len(tokenizer.encode(NATALIA_UPEV)) - 1])
    ids = ex["input_ids"][n:]
    assert tokenizer.decode(ids) == NATALIA_UPEV and ex["labels"][:n] == [IGNORE] * n
    st = stages.token_stages(tokenizer, ids + [tokenizer.eot_id])
    ends = [NATALIA_UPEV.index(tag) + len(tag) - 1 for tag in stages.TAGS[1:]]  # the tag line's "\n" is one token
    expected = [NATALIA_UPEV[a:b] for a, b in zip([0, *ends], [*ends, len(NATALIA_UPEV)])]
    for stage, text in enumerate(expected):
        assert tokenizer.decode([t for t, s in zip(ids, st) if s == stage]) == text
    assert st[-1] == stages.VERIFY


def test_stage_weights_weigh_each_target_by_its_stage_and_the_prompt_by_nothing(tokenizer):
    [ex] = stages.weigh_by_stage(tokenizer, [data.build_example(tokenizer, stages.upev_record(NATALIA))],
                                 [0.5, 1.0, 2.0, 4.0])
    targets = [i for i, label in enumerate(ex["labels"]) if label != IGNORE]
    st = stages.token_stages(tokenizer, ex["input_ids"][targets[0]:])
    assert ex["weights"][:targets[0]] == [0.0] * targets[0]
    assert ex["weights"][targets[0]:] == [[0.5, 1.0, 2.0, 4.0][s] for s in st] and set(st) == {0, 1, 2, 3}


def test_a_plain_turn_is_one_stage(tokenizer):
    ex = data.build_example(tokenizer, NATALIA)
    n = next(i for i, label in enumerate(ex["labels"]) if label != IGNORE)
    assert set(stages.token_stages(tokenizer, ex["input_ids"][n:])) == {stages.UNDERSTAND}


def test_uniform_stage_weights_reproduce_plain_sft_exactly(tiny_checkpoint, upev_examples, tokenizer):
    weighted_examples = stages.weigh_by_stage(tokenizer, [dict(ex) for ex in upev_examples], [1.0] * 4)
    results = []
    for examples in (upev_examples, weighted_examples):
        model = lora_model(tiny_checkpoint)
        batches = [data.collate(examples[:2], tokenizer.pad_id), data.collate(examples[2:], tokenizer.pad_id)]
        results.append((train.accumulate_gradients(model, batches, nullcontext(), SCALER), grads(model, "lora_")))
    assert results[0][0] == results[1][0]
    for name, g in results[0][1].items():
        assert torch.equal(g, results[1][1][name]), name


def test_stage_weights_mix_the_per_stage_mean_gradients_by_weight_times_count(tiny_checkpoint, upev_examples,
                                                                              tokenizer):
    """With weights w the step's gradient is Σ_s w_s n_s g_s / Σ_s w_s n_s, g_s the mean gradient over the n_s
    targets of stage s: masking every other stage's labels gives g_s and n_s."""
    batch = data.collate(upev_examples, tokenizer.pad_id)
    st = stage_ids(tokenizer, batch, upev_examples)
    model = lora_model(tiny_checkpoint)
    per_stage = []
    for s in range(4):
        alone = {**batch, "labels": batch["labels"].masked_fill(st != s, IGNORE)}
        model.zero_grad()
        _, n = train.accumulate_gradients(model, [alone], nullcontext(), SCALER)
        per_stage.append((n, grads(model, "lora_")))
    w = [0.5, 1.0, 2.0, 4.0]
    weighted = stages.weigh_by_stage(tokenizer, [dict(ex) for ex in upev_examples], w)
    model.zero_grad()
    train.accumulate_gradients(model, [data.collate(weighted, tokenizer.pad_id)], nullcontext(), SCALER)
    total = sum(w[s] * n for s, (n, _) in enumerate(per_stage))
    for name, g in grads(model, "lora_").items():
        expected = sum(w[s] * n * g_s[name] for s, (n, g_s) in enumerate(per_stage)) / total
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-7, msg=name)
        assert not torch.allclose(g, sum(n * g_s[name] for n, g_s in per_stage) / sum(n for n, _ in per_stage))


def test_stage_weights_need_the_upev_format():
    with pytest.raises(ValueError, match="need --format upev"):
        train.check_config(train.TrainConfig(stage_weights="1,1,1,2", output_dir="/nonexistent"))


def test_verify_adapter_gets_exactly_zero_gradient_from_tokens_before_verify(tiny_checkpoint, upev_examples,
                                                                            tokenizer):
    batch = data.collate(upev_examples, tokenizer.pad_id)
    assert not batch["attention_mask"].all()  # unequal lengths: padded rows
    model = lora_model(tiny_checkpoint, verify=True)
    st = stage_ids(tokenizer, batch, upev_examples)
    before = {**batch, "labels": batch["labels"].masked_fill(st == stages.VERIFY, IGNORE)}
    train.accumulate_gradients(model, [before], nullcontext(), SCALER)
    assert all((g == 0).all() for g in grads(model, "verify_").values())
    assert all(g.abs().sum() > 0 for g in grads(model, "lora_").values())
    model.zero_grad()
    train.accumulate_gradients(model, [batch], nullcontext(), SCALER)
    assert all(g.abs().sum() > 0 for g in grads(model, "verify_").values())


def test_verify_adapter_changes_the_output_exactly_from_the_verify_tag_on(tiny_checkpoint, upev_examples, tokenizer):
    batch = data.collate(upev_examples, tokenizer.pad_id)
    model = lora_model(tiny_checkpoint, verify=True).eval()
    with torch.no_grad():
        gated = model(batch["input_ids"])
        for m in model.verify.layers.values():
            m.verify_B.weight.zero_()
        plain = model(batch["input_ids"])
    changed = (gated - plain).abs().amax(-1) > 1e-6  # (B, T)
    real = batch["attention_mask"].bool()
    assert torch.equal(changed[real], (stage_ids(tokenizer, batch, upev_examples) == stages.VERIFY)[real])


def test_generation_turns_the_gate_on_per_row_at_the_token_that_completes_its_verify_tag(tiny_checkpoint, tokenizer,
                                                                                        monkeypatch):
    model = lora_model(tiny_checkpoint, verify=True).eval()
    scripts = [tokenizer.encode(text) for text in ("ab\nVERIFY\n1 2 3 4 5 6 7 8", "abc de fg hi\nVERIFY\n1 2 3 4")]
    n = min(map(len, scripts))
    gates = []  # the gate of each forward: the prompts', then each new token's
    model.register_forward_hook(lambda m, args, y: gates.append(model.verify.on.clone()))
    monkeypatch.setattr(gen, "sample", lambda *a: torch.tensor([s[len(gates) - 1] for s in scripts]))  # the script
    out, _ = gen.generate(model, tokenizer, [[1, 2, 3], [4, 5]], n)
    assert out == [s[:n] for s in scripts] and not gates[0].any()
    on = [[bool(g[row, 0]) for g in gates[1:]] for row in range(2)]
    for row, ids in enumerate(out):  # as in training, but the last token, which no forward reads
        assert on[row] == [s == stages.VERIFY for s in stages.token_stages(tokenizer, ids)][:n - 1]
    assert True in on[0] and True in on[1] and on[0].index(True) != on[1].index(True)


def test_both_adapters_save_side_by_side_and_load_back(tiny_checkpoint, tmp_path, upev_examples, tokenizer):
    model = lora_model(tiny_checkpoint, verify=True).eval()
    stages.save_adapters(model, tmp_path, "tiny")
    config = json.loads((tmp_path / "verify" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["tinyreason_gate"]) == (2, 4, stages.GATE_RULE)
    from safetensors.torch import load_file
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(lora.lora_state_dict(model))
    loaded, _ = load_model(tiny_checkpoint, tmp_path, "none", torch.float32, "cpu")
    stages.load_verify(loaded, tokenizer, tmp_path)
    batch = data.collate(upev_examples, tokenizer.pad_id)
    with torch.no_grad():
        torch.testing.assert_close(model(batch["input_ids"]), loaded(batch["input_ids"]), rtol=0, atol=1e-6)


def test_a_tiny_upev_run_with_weights_and_the_verify_adapter_writes_both_adapters(tiny_checkpoint, tmp_path,
                                                                                   tokenizer):
    path = tmp_path / "gsm8k.jsonl"
    write_jsonl(path, gsm8k_records(16))
    train.main(["--model", str(tiny_checkpoint), "--data", str(path), "--output_dir", str(tmp_path / "out"),
                "--adapter_path", str(tmp_path / "adapter"), "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2",
                "--batch_size", "2", "--gradient_accumulation_steps", "1", "--validation_split", "0.25",
                "--quantize", "none", "--format", "upev", "--stage_weights", "1,1,2,2", "--verify_adapter",
                "--verify_r", "2"])
    model, _ = load_model(tiny_checkpoint, tmp_path / "adapter", "none", torch.float32, "cpu")
    stages.load_verify(model, tokenizer, tmp_path / "adapter")
    assert model.verify.r == 2 and any(m.verify_B.weight.abs().sum() > 0 for m in model.verify.layers.values())


UPEV_OUTPUT = ("<think>\nUNDERSTAND\nAsked: How many?\nGiven: 48\nPLAN\n1. 48/2\n2. 48 + 24\n3. 72 x 2\n"
               "EXECUTE\nShe sold 48/2 = 25 clips.\nThen 48 + 24 = 72.\nVERIFY\n{verify}\n</think>\n\n"
               "**Final Answer:** {answer}")


def test_a_plain_output_is_not_upev():
    assert stages.metrics("<think>\n2+2 = 4\n</think>\n\n**Final Answer:** 4") == {"upev": False}


def test_plan_faithfulness_counts_the_planned_operations_execute_carries_out():
    row = stages.metrics(UPEV_OUTPUT.format(verify="48/2 = 24 ✓", answer="72"))
    assert row["upev"] and row["plan"] == [2, 3]


@pytest.mark.parametrize("verify, flagged", [("48/2 = 24 ✗\n48+24 = 72 ✓", True), ("48/2 = 25 ✓", False),
                                             ("all good ✓", False)])
def test_verify_flags_a_false_execute_statement_when_it_states_another_result(verify, flagged):
    row = stages.metrics(UPEV_OUTPUT.format(verify=verify, answer="72"))
    assert (row["execute_false"], row["flagged"]) == (1, flagged)


def test_summary_reports_flagged_outputs_and_how_many_of_those_were_answered_correctly():
    rows = [stages.metrics(UPEV_OUTPUT.format(verify=v, answer=a)) | {"correct": c} for v, a, c in
            [("48/2 = 24", "72", True), ("48/2 = 24", "73", False), ("48/2 = 25", "73", False)]]
    rows.append(stages.metrics("<think>\n1+1 = 2\n</think>\n\n**Final Answer:** 2") | {"correct": True})
    assert stages.summary(rows) == [
        "UPEV format: 0.7500 (3/4)", "plan faithfulness: 0.6667 (6/9)",
        "self-verification: 0.6667 (2/3) of outputs with a false EXECUTE statement flagged one in VERIFY; "
        "0.5000 (1/2) of those answered correctly"]


def test_peft_loads_the_first_adapter_as_our_gate_off_and_both_as_our_gate_on_everywhere(tiny_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2ForCausalLM
    model = lora_model(tiny_checkpoint, verify=True).eval()
    stages.save_adapters(model, tmp_path, str(tiny_checkpoint))
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))

    def ours(gate):
        with pytest.MonkeyPatch.context() as mp, torch.no_grad():
            mp.setattr(stages, "verifying", lambda tokenizer, row, new: [gate] * new)
            return model.lm_head(model(ids))
    peft = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(tiny_checkpoint).float(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, ours(False), rtol=1e-4, atol=1e-5)
        peft.load_adapter(tmp_path / "verify", adapter_name="verify")
        peft.base_model.set_adapter(["default", "verify"])  # PEFT has no per-token gate: on everywhere
        torch.testing.assert_close(peft(ids).logits, ours(True), rtol=1e-4, atol=1e-5)
