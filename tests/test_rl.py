"""rl.py: advantages, normalizers and the loss (clip, KL) computed by hand on tiny tensors; the log-prob path against
full logits; rewards table-driven; the reward rising under every preset on a tiny model; exact resume.

    python -m pytest tests/test_rl.py -q
"""
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import gsm8k_records, make_checkpoint, write_jsonl
from safetensors.torch import load_file

import grade
import lora
import rl
import tinyreason
from generate import generate
from tinyreason import Decoder
from tokenizer import Tokenizer

THINK = "<think>\n48/2 = 24\n48+24 = 72\n</think>\n\n**Final Answer:** "


def test_group_z_score_of_one_correct_in_four_is_plus_1_5_and_minus_0_5():
    adv, zero_std = rl.advantages(torch.tensor([[1.0, 0, 0, 0]]), torch.ones(1, 4), "group")
    torch.testing.assert_close(adv, torch.tensor([[1.5, -0.5, -0.5, -0.5]]), atol=1e-3, rtol=0)
    assert not zero_std.any()


def test_mean_only_advantage_is_the_centred_reward():
    adv, _ = rl.advantages(torch.tensor([[1.0, 0, 0, 0]]), torch.ones(1, 4), "none")
    torch.testing.assert_close(adv, torch.tensor([[0.75, -0.25, -0.25, -0.25]]))


def test_batch_scaled_advantage_divides_by_the_std_of_the_whole_batch():
    r = torch.tensor([[1.0, 0], [1.0, 1.0]])  # batch std (n-1) of (1, 0, 1, 1) = 0.5
    adv, zero_std = rl.advantages(r, torch.ones(2, 2), "batch")
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5], [0.0, 0.0]]) / (0.5 + 1e-4))
    assert zero_std.tolist() == [False, True]


def test_a_group_with_equal_rewards_has_zero_advantage_and_is_flagged():
    adv, zero_std = rl.advantages(torch.tensor([[1.0, 1, 1, 1], [0.0, 1, 0, 0]]), torch.ones(2, 4), "group")
    assert zero_std.tolist() == [True, False] and adv[0].abs().max() == 0


def test_lpro_length_term_lowers_the_advantage_of_longer_completions_and_vanishes_at_lambda_0():
    r, lengths = torch.tensor([[1.0, 1, 0, 0]]), torch.tensor([[10, 30, 10, 30]])
    plain, _ = rl.advantages(r, lengths, "group")
    adv, _ = rl.advantages(r, lengths, "group", length_penalty=0.1)
    z_len = (lengths - 20) / (lengths.float().std() + 1e-4)  # (-0.866, +0.866, ...)
    torch.testing.assert_close(adv, plain - 0.1 * z_len)
    assert adv[0, 0] > adv[0, 1] and adv[0, 2] > adv[0, 3]
    torch.testing.assert_close(rl.advantages(r, lengths, "group", length_penalty=0.0)[0], plain)


def loss_gradient(ratio: float, adv: float, eps_high: float) -> float:
    """d loss / d ℓ of one token whose ratio to the rollout policy is `ratio`."""
    logp = torch.tensor(math.log(ratio), requires_grad=True)
    loss, _ = rl.policy_loss(logp, torch.tensor(0.0), None, torch.tensor(adv), torch.tensor(1.0),
                             tiny_cfg(eps_high=eps_high))
    loss.backward()
    return float(logp.grad)


def test_the_clip_gives_exactly_zero_gradient_where_it_acts():
    assert loss_gradient(1.3, 1.0, 0.2) == 0.0  # ρ > 1 + ε_high with A > 0
    assert loss_gradient(0.7, -1.0, 0.2) == 0.0  # ρ < 1 - ε_low with A < 0
    assert loss_gradient(1.3, -1.0, 0.2) == pytest.approx(1.3)  # the pessimistic side is never clipped


def test_clip_higher_lets_a_ratio_of_1_25_through_where_0_2_does_not():
    assert loss_gradient(1.25, 1.0, 0.2) == 0.0
    assert loss_gradient(1.25, 1.0, 0.28) == pytest.approx(-1.25)


@pytest.mark.parametrize("agg, expected", [("token", [1 / 8] * 2), ("seq", [1 / 4, 1 / 12]), ("const", [1 / 20] * 2)])
def test_normalizers_of_two_sequences_of_lengths_2_and_6(agg, expected):
    w = rl.token_weights(torch.tensor([2, 6, 5]), torch.tensor([True, True, False]), agg, max_new_tokens=10)
    torch.testing.assert_close(w, torch.tensor([*expected, 0.0]))


def kl(logp, ref_logp):
    """The loss's β·k3 term per token at β = 1, A = 0 and ρ = 1."""
    return torch.stack([rl.policy_loss(l, l, r, torch.tensor(0.0), torch.tensor(1.0), tiny_cfg(beta=1.0))[0]
                        for l, r in zip(logp, ref_logp)])


def test_the_kl_term_is_nonnegative_and_zero_where_policy_equals_reference():
    logp, ref = torch.randn(100), torch.randn(100)
    assert (kl(logp, ref) >= 0).all() and kl(logp, logp).abs().max() == 0


@pytest.mark.parametrize("text, gold, stopped, correct, fmt", [
    (THINK + "72", "72", True, 1, 1),
    (THINK + "70", "72", True, 0, 1),
    (THINK + "$1,200", "1200", True, 1, 1),
    (THINK + "72" + THINK + "72", "72", True, 1, 0),  # a second think block is not the format
    (THINK + "72\nI also like 80.", "72", True, 1, 0),  # text after the answer
    (THINK + "72", "72", False, 0, 0),  # cut at the length limit: no reward
    ("<think>\n72 is tempting but 80 is wrong\n</think>\n\n**Final Answer:** 80", "72", True, 0, 1),  # the span only
    ("The answer is 72.", "72", True, 0, 0),  # the right number, but not where the format puts it
    ("<think>\n</think>\n\n**Final Answer:** 72", "72", True, 1, 0),  # an empty think block
])
def test_rewards(text, gold, stopped, correct, fmt):
    r = grade.rewards(text, gold, "tinyreason", stopped)
    assert (r["correct"], r["format"]) == (correct, fmt)


def test_reasoning_reward_is_the_fraction_of_true_statements_and_needs_the_format():
    assert grade.rewards(THINK.replace("= 72", "= 70") + "72", "72", "tinyreason", True)["reasoning"] == 0.5
    assert grade.rewards(THINK + "72 and more", "72", "tinyreason", True)["reasoning"] == 1.0
    assert grade.rewards(THINK + "72\nmore", "72", "tinyreason", True)["reasoning"] == 0.0


@pytest.mark.parametrize("text, expected", [
    ("60 + 120 - 10 = 170", (1, 1)),  # a chain is read whole, not as its last `120 - 10 = 170`
    ("10/3 = 3.33, 10/3 = 3, 7/2 = 3.5", (2, 3)),  # rounding only to the written decimals
    ("1,200 + 300 = 1,500 and 2 x 3 = 7", (1, 2)),
    ("1/0 = 5 and 5 apples", (0, 1)),
])
def test_step_validity_checks_each_written_statement_exactly(text, expected):
    assert grade.step_validity(text) == expected


def test_answer_tag_and_boxed_styles_read_their_own_span():
    assert grade.rewards("<think>2+3 = 5</think>\n<answer>5</answer>", "5", "answer_tags", True) == \
        {"correct": 1.0, "format": 1.0, "reasoning": 1.0}
    assert grade.rewards("2+3 = 5, so \\boxed{5}.", "5", "boxed", True)["correct"] == 1.0
    assert grade.rewards("<answer>5</answer> 5", "5", "answer_tags", True)["format"] == 0.0


@pytest.mark.parametrize("ending, fmt", [
    ("\\boxed{5}.", 1), ("$\\boxed{5}$.", 1), ("\\(\\boxed{5}\\).", 1), ("\\[\n\\boxed{5}\n\\]", 1),
    ("\\(\\boxed{5}\\) dollars.", 0),  # words after the answer
])
def test_a_box_closed_by_its_math_delimiters_is_still_the_boxed_format(ending, fmt):
    assert grade.rewards("2+3 = 5, so " + ending, "5", "boxed", True)["format"] == fmt


@pytest.fixture(scope="module")
def model_and_tok(tiny_checkpoint):
    torch.manual_seed(0)
    model = lora.inject(Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32), r=4, alpha=8)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    return model.train(), Tokenizer.from_pretrained(tiny_checkpoint)


def rows(tok, n=3):
    prompts = [tok.apply_chat([{"role": "user", "content": r["question"][:60]}]) for r in gsm8k_records(n)]
    completions = [tok.encode(t) + [tok.eot_id] for t in ("<think>\n1+1 = 2", "x", "**Final Answer:** 7")][:n]
    return prompts, completions


@pytest.mark.parametrize("chunk", [5, 4096])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_equal_log_softmax_of_full_logits(model_and_tok, monkeypatch, chunk, temperature):
    monkeypatch.setattr(tinyreason, "LOGPROB_CHUNK", chunk)
    model, tok = model_and_tok
    prompts, completions = rows(tok)
    ours = rl.completion_logprobs(model, prompts, completions, temperature, "cpu")
    expected = []
    for p, c in zip(prompts, completions):  # each row alone, unpadded, full-vocabulary logits
        logits = model.lm_head(model(torch.tensor([p + c])))[0, len(p) - 1:-1] / temperature
        expected.append(F.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None]).squeeze(1))
    torch.testing.assert_close(ours, torch.cat(expected), rtol=1e-5, atol=1e-5)
    assert len(ours) == sum(map(len, completions))  # the stop token is a target; nothing after it is


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def update(model, batch, cfg, monkeypatch):
    """policy_update's statistics, and the gradients of its (last) optimizer step, which changes nothing (lr 0)."""
    params, grads, optimizer_step = [p for p in model.parameters() if p.requires_grad], {}, rl.loop.optimizer_step
    monkeypatch.setattr(rl.loop, "optimizer_step", lambda *a: (grads.update(lora_grads(model)), optimizer_step(*a))[1])
    stats = rl.policy_update(model, torch.optim.SGD(params, lr=0.0), torch.amp.GradScaler("cpu", enabled=False), params,
                             batch, cfg, "cpu", torch.autocast("cpu", enabled=False), 0.0)
    monkeypatch.undo()
    return grads, stats


def sampled_everywhere(completions):
    return [[True] * len(c) for c in completions]


def tiny_cfg(**kw):
    return rl.RLConfig(**{**dict(temperature=1.0, eps_high=0.2, beta=0.0, ppo_epochs=1, micro_batch_size=8), **kw})


def test_one_epoch_gradient_is_the_advantage_weighted_log_likelihood_gradient(model_and_tok, monkeypatch):
    model, tok = model_and_tok
    prompts, completions = rows(tok)
    adv, w = torch.tensor([1.0, -0.5, 0.25]), torch.tensor([0.1, 0.2, 0.3])
    ours, stats = update(model, dict(prompts=prompts, completions=completions, sampled=sampled_everywhere(completions),
                                     adv=adv, weight=w), tiny_cfg(), monkeypatch)
    model.zero_grad()
    lengths = torch.tensor([len(c) for c in completions])
    logp = rl.completion_logprobs(model, prompts, completions, 1.0, "cpu")
    (-(logp * (adv * w).repeat_interleave(lengths)).sum()).backward()  # Σ (A_i/D)·CE
    for name, g in lora_grads(model).items():
        torch.testing.assert_close(ours[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert stats["ratio"] == pytest.approx(1.0) and stats["clip_low"] == stats["clip_high"] == 0
    model.zero_grad()


def test_tokens_the_calculator_wrote_are_no_targets(model_and_tok, monkeypatch):
    model, tok = model_and_tok
    prompts, completions = rows(tok)
    adv, w = torch.tensor([1.0, -0.5, 0.25]), torch.tensor([0.1, 0.2, 0.3])
    sampled = sampled_everywhere(completions)
    sampled[0][1] = sampled[0][2] = sampled[2][0] = False  # the tool wrote these
    ours, _ = update(model, dict(prompts=prompts, completions=completions, adv=adv, weight=w, sampled=sampled),
                     tiny_cfg(), monkeypatch)
    model.zero_grad()
    logp = rl.completion_logprobs(model, prompts, completions, 1.0, "cpu").split([len(c) for c in completions])
    own = [torch.cat([logp[0][:1], logp[0][3:]]), logp[1], logp[2][1:]]  # the sampled tokens' log-probs only
    (-sum((l * a * wi).sum() for l, a, wi in zip(own, adv, w))).backward()
    for name, g in lora_grads(model).items():
        torch.testing.assert_close(ours[name], g, rtol=1e-5, atol=1e-7, msg=name)
    model.zero_grad()


def test_micro_batches_of_one_give_the_gradient_of_one_batch(model_and_tok, monkeypatch):
    model, tok = model_and_tok
    prompts, completions = rows(tok)
    batch = dict(prompts=prompts, completions=completions, sampled=sampled_everywhere(completions),
                 adv=torch.tensor([1.0, -0.5, 0.25]),
                 weight=rl.token_weights(torch.tensor([len(c) for c in completions]), torch.ones(3, dtype=torch.bool),
                                         "seq", 16))
    one, _ = update(model, batch, tiny_cfg(micro_batch_size=3), monkeypatch)
    model.zero_grad()
    three, _ = update(model, batch, tiny_cfg(micro_batch_size=1), monkeypatch)
    model.zero_grad()
    for name, g in one.items():
        torch.testing.assert_close(three[name], g, rtol=1e-5, atol=1e-8, msg=name)


def test_the_reference_pass_runs_the_starting_adapter_and_leaves_the_current_one_in_place(model_and_tok):
    model, tok = model_and_tok
    prompts, completions = rows(tok)
    batch, cfg = dict(prompts=prompts, completions=completions), tiny_cfg()
    start = {k: p.detach().clone() for k, p in lora.lora_state_dict(model).items()}
    before = rl.completion_logprobs(model, prompts, completions, 1.0, "cpu").detach()
    with torch.no_grad():
        for p in lora.lora_state_dict(model).values():
            p.add_(0.05)  # the policy moves
    moved = rl.completion_logprobs(model, prompts, completions, 1.0, "cpu").detach()
    ref = torch.cat(rl.frozen_logprobs(model, batch, cfg, "cpu", torch.autocast("cpu", enabled=False), start))
    torch.testing.assert_close(ref, before)
    torch.testing.assert_close(rl.completion_logprobs(model, prompts, completions, 1.0, "cpu").detach(), moved)
    assert kl(before, ref).abs().max() == 0 and kl(moved, ref).mean() > 0
    with torch.no_grad():
        for k, p in lora.lora_state_dict(model).items():
            p.copy_(start[k])


def test_samples_of_a_prompt_share_its_prefill_and_match_generating_it_alone(model_and_tok):
    model, tok = model_and_tok
    prompts, _ = rows(tok, 2)
    shared = generate(model.eval(), tok, prompts, 6, num_samples=3)[0]
    alone = generate(model, tok, [p for p in prompts for _ in range(3)], 6)[0]
    model.train()
    assert shared == alone


def test_seeded_sampling_repeats_and_stopped_rows_end_with_their_stop_token(model_and_tok):
    model, tok = model_and_tok
    prompts, _ = rows(tok, 2)
    runs = [generate(model.eval(), tok, prompts, 40, temperature=1.0, num_samples=4,
                     stop_ids=[tok.eot_id, tok.encode("e")[0]], generator=torch.Generator().manual_seed(7))[0]
            for _ in range(2)]
    model.train()
    assert runs[0] == runs[1]
    stopped = [c for c in runs[0] if len(c) < 40]
    assert stopped and all(c[-1] in (tok.eot_id, tok.encode("e")[0]) for c in stopped)


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("rl") / "gsm8k.jsonl"
    write_jsonl(path, gsm8k_records(24))
    return path


@pytest.fixture(scope="module")
def learnable_checkpoint(tmp_path_factory, tokenizer_dir):
    """Init std 0.2: the normed hidden state can then move the logits of half the vocabulary against the other half
    far enough for the toy reward to approach 1, which the default 0.02 cannot."""
    return make_checkpoint(tmp_path_factory.mktemp("rl_model"), tokenizer_dir, tie=False, initializer_range=0.2)


def even_fraction(texts, completions, golds, stopped, cfg):
    """A toy reward the tiny random model can learn: the fraction of even token ids."""
    r = torch.tensor([sum(t % 2 == 0 for t in c) / max(len(c), 1) for c in completions])
    return {"reward": r, "correct": r, "format": torch.zeros_like(r), "reasoning": torch.zeros_like(r)}


def run(checkpoint, data_file, out, *extra):
    return rl.main(["--model", str(checkpoint), "--adapter", "none", "--data", str(data_file), "--output_dir", str(out),
                    "--adapter_path", str(out / "adapter"), "--quantize", "none", "--dtype", "fp32", "--lora_r", "4",
                    "--lora_alpha", "8", "--prompts_per_step", "4", "--group_size", "8", "--max_new_tokens", "8",
                    "--eval_samples", "4", "--eval_steps", "1000", "--logging_steps", "1000",
                    "--learning_rate", "3e-2", *extra])


@pytest.mark.parametrize("algo", list(rl.PRESETS))
def test_a_few_steps_of_every_preset_raise_a_toy_reward(learnable_checkpoint, questions, tmp_path, monkeypatch, algo):
    monkeypatch.setattr(rl, "compute_rewards", even_fraction)
    state = run(learnable_checkpoint, questions, tmp_path, "--algo", algo, "--max_steps", "24", "--save_steps", "24",
                "--group_size", "8")  # infused's preset would sample 3
    r = [state["reward"][s] for s in sorted(state["reward"])]
    assert sum(r[-4:]) / 4 > sum(r[:4]) / 4 + 0.15, r


def test_a_very_large_beta_keeps_the_policy_at_the_reference(learnable_checkpoint, questions, tmp_path, monkeypatch):
    monkeypatch.setattr(rl, "compute_rewards", even_fraction)
    free = run(learnable_checkpoint, questions, tmp_path / "free", "--max_steps", "12", "--save_steps", "12",
               "--beta", "0")
    held = run(learnable_checkpoint, questions, tmp_path / "held", "--max_steps", "12", "--save_steps", "12",
               "--beta", "1000", "--learning_rate", "1e-3")
    b = [t for k, t in load_file(tmp_path / "held" / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    b_free = [t for k, t in load_file(tmp_path / "free" / "adapter" / "adapter_model.safetensors").items()
              if "lora_B" in k]
    assert sum(t.abs().sum() for t in b) < 0.1 * sum(t.abs().sum() for t in b_free)
    assert sum(free["reward"][s] for s in (10, 11, 12)) > sum(held["reward"][s] for s in (10, 11, 12))


def test_a_run_stopped_by_ctrl_c_after_two_steps_resumes_to_the_same_third_step(learnable_checkpoint, questions,
                                                                                tmp_path, monkeypatch):
    monkeypatch.setattr(rl, "compute_rewards", even_fraction)
    flags = ("--max_steps", "3", "--save_steps", "3", "--algo", "lpro", "--beta", "0.1")  # old and reference passes
    straight = run(learnable_checkpoint, questions, tmp_path / "a", *flags)
    calls = []

    def ctrl_c_in_step_2(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return even_fraction(*args)
    monkeypatch.setattr(rl, "compute_rewards", ctrl_c_in_step_2)
    with pytest.raises(SystemExit):
        run(learnable_checkpoint, questions, tmp_path / "b", *flags)
    monkeypatch.setattr(rl, "compute_rewards", even_fraction)
    resumed = rl.main(["--resume", "--output_dir", str(tmp_path / "b")])
    assert resumed["reward"] == straight["reward"]
    a = (tmp_path / "a" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_bad_flags_fail_before_any_loading(questions):
    with pytest.raises(ValueError, match="--reward_weights '1,0': expected three numbers"):
        rl.main(["--adapter", "none", "--model", "/nonexistent", "--data", str(questions), "--reward_weights", "1,0"])
    with pytest.raises(ValueError, match="--temperature 0 samples one completion G times"):
        rl.main(["--adapter", "none", "--model", "/nonexistent", "--data", str(questions), "--temperature", "0"])


@pytest.mark.parametrize("flag, value", [("--loss_agg", "mean"), ("--algo", "ppo"), ("--format", "xml")])
def test_a_value_outside_a_flags_choices_is_an_argparse_error_before_any_loading(capsys, flag, value):
    with pytest.raises(SystemExit):
        rl.main([flag, value])
    assert f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err


def test_lpro_takes_the_nexus_card_s_settings():
    cfg = rl.parse_config(["--algo", "lpro", "--task", "math"])
    assert (cfg.group_size, cfg.length_penalty, cfg.eps_low, cfg.eps_high, cfg.loss_agg, cfg.ppo_epochs) == \
        (4, 0.1, 0.2, 0.28, "token", 4)
    assert cfg.reward_weights == "1.0,0.1,0.0" and cfg.data == "EleutherAI/hendrycks_math"  # the 0.1 format bonus


def test_lpro_on_math_rewards_the_equivalent_box_and_the_format_bonus(learnable_checkpoint, tmp_path, monkeypatch):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps({"problem": f"What is {k}/{2 * k}?", "solution": "\\boxed{\\frac{1}{2}}",
                                        "answer": "\\frac{1}{2}"}) + "\n" for k in range(1, 9)))
    tok = Tokenizer.from_pretrained(learnable_checkpoint)
    texts = ["so \\boxed{0.5}", "so \\boxed{2}", "\\boxed{1/2} or \\boxed{1/2}", "no box: 1/2"]  # G = 4

    def generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, num_samples=1, **kw):
        rows = [tok.encode(texts[j % 4]) + [tok.eot_id] for _ in prompts for j in range(num_samples)]
        return rows, [[True] * len(r) for r in rows]
    monkeypatch.setattr(rl, "generate", generate)
    state = rl.main(["--model", str(learnable_checkpoint), "--adapter", "none", "--task", "math", "--algo", "lpro",
                     "--format", "boxed", "--data", str(path), "--output_dir", str(tmp_path / "run"), "--adapter_path",
                     str(tmp_path / "adapter"), "--quantize", "none", "--dtype", "fp32", "--lora_r", "4",
                     "--prompts_per_step", "2", "--eval_samples", "2", "--max_steps", "2", "--save_steps", "2"])
    # per group: 0.5 right and boxed (1.1), 2 boxed (0.1), two boxes right but not the format (1.0), no box (0)
    assert state["reward"] == {1: pytest.approx(2.2 / 4), 2: pytest.approx(2.2 / 4)}
    assert state["accuracy"] == {2: 1.0}  # greedy: the first text
