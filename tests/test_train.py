"""train.py: the loss and its gradient, accumulation, the config checks, and tiny runs end to end: a falling loss,
the checkpoints kept and exported, exact resume after Ctrl-C, a skipped non-finite step.

    python -m pytest tests/test_train.py -q
"""
import os
import signal
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, gsm8k_records, make_checkpoint, write_jsonl
from safetensors.torch import load_file

import data
import lora
import loop
import tinyreason
import train
from data import IGNORE
from tinyreason import Decoder
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "gsm8k32.jsonl"
    write_jsonl(path, gsm8k_records(32))
    return path


@pytest.fixture(scope="module")
def learnable_checkpoint(tmp_path_factory, tokenizer_dir):
    """Init std 0.1 instead of 0.02: with 0.02 the normed hidden state can move the logits by about 1 at most,
    so a few steps barely change the loss and "the loss went down" would prove little."""
    return make_checkpoint(tmp_path_factory.mktemp("learnable"), tokenizer_dir, tie=False, initializer_range=0.1)


@pytest.fixture(scope="module")
def examples(tiny_checkpoint):
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint)
    return [data.build_example(tokenizer, r) for r in gsm8k_records(4)], tokenizer.pad_id


def lora_model(checkpoint_dir):
    """fp32 tiny model with adapters whose B is random, so every LoRA weight gets a gradient."""
    torch.manual_seed(0)
    model = lora.inject(Decoder.from_pretrained(checkpoint_dir, dtype=torch.float32, device="cpu"), r=4, alpha=8)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    return model.train()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def run_flags(checkpoint, data_file, out, *extra):
    return ["--model", str(checkpoint), "--data", str(data_file), "--output_dir", str(out),
            "--adapter_path", str(out / "adapter"), "--num_samples", "32", "--validation_split", "0.25",
            "--lora_r", "4", "--lora_alpha", "8", "--batch_size", "2", "--gradient_accumulation_steps", "2",
            "--logging_steps", "2", *extra]


def adapter_tensors(folder):
    return load_file(folder / "adapter_model.safetensors")


def test_token_log_probs_at_a_temperature_are_the_log_softmax_of_the_scaled_logits(tiny_checkpoint):
    model = lora_model(tiny_checkpoint)
    hidden = torch.randn(5, model.config.hidden_size)
    y = torch.tensor([0, 3, 10, 3, 7])
    expected = F.log_softmax(model.lm_head(hidden) / 0.7, -1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(tinyreason.token_logprobs(model, hidden, y, 0.7), expected)


@pytest.mark.parametrize("chunk", [7, 4096])  # several chunks (recomputed in backward, last one partial), one chunk
def test_loss_and_gradients_on_target_positions_equal_full_logits_cross_entropy(tiny_checkpoint, examples,
                                                                                monkeypatch, chunk):
    monkeypatch.setattr(tinyreason, "LOGPROB_CHUNK", chunk)
    model = lora_model(tiny_checkpoint)
    batch = data.collate(*examples)
    loss_sum, n = train.compute_loss(model, batch)
    loss_sum.backward()
    ours = grads(model)
    model.zero_grad()
    logits = model.lm_head(model(batch["input_ids"], batch["attention_mask"]))[:, :-1]  # (B, T-1, V)
    labels = batch["labels"][:, 1:]
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    expected.backward()
    assert n == int((labels != IGNORE).sum()) > 0
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-5)
    for name, g in grads(model).items():
        torch.testing.assert_close(ours[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_four_micro_batches_of_one_give_the_gradient_of_one_batch_of_four(tiny_checkpoint, examples):
    exs, pad_id = examples
    assert len({len(ex["input_ids"]) for ex in exs}) > 1  # unequal lengths: per-batch means would differ
    off, scaler = nullcontext(), torch.amp.GradScaler("cpu", enabled=False)
    model = lora_model(tiny_checkpoint)
    loss_4x1, n_4x1 = train.accumulate_gradients(model, [data.collate([ex], pad_id) for ex in exs], off, scaler)
    g_4x1 = grads(model)
    model.zero_grad()
    loss_1x4, n_1x4 = train.accumulate_gradients(model, [data.collate(exs, pad_id)], off, scaler)
    assert n_4x1 == n_1x4 and loss_4x1 == pytest.approx(loss_1x4, rel=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(g_4x1[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_step_without_target_tokens_is_an_error(tiny_checkpoint, examples):
    exs, pad_id = examples
    batch = data.collate(exs[:1], pad_id)
    batch["labels"].fill_(IGNORE)
    with pytest.raises(ValueError, match="no target tokens"):
        train.accumulate_gradients(lora_model(tiny_checkpoint), [batch], nullcontext(),
                                   torch.amp.GradScaler("cpu", enabled=False))


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size must be > 0"),
    (["--validation_split", "1.0"], r"--validation_split must be in \[0, 1\)"),
    (["--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
])
def test_bad_flags_fail_before_any_loading(flags, message):
    with pytest.raises(ValueError, match=message):
        train.main(["--model", "/nonexistent/model", *flags])


@pytest.mark.parametrize("flag, value, choices", [("--optim", "sgd", "'auto', 'adamw', 'adamw_8bit'"),
                                                  ("--format", "upve", "'plain', 'upev'"),
                                                  ("--dtype", "bf32", "'auto', 'bf16', 'fp16', 'fp32'")])
def test_a_value_outside_a_flags_choices_is_an_argparse_error_before_any_loading(capsys, flag, value, choices):
    with pytest.raises(SystemExit):
        train.main(["--model", "/nonexistent/model", flag, value])
    assert f"argument {flag}: invalid choice: '{value}' (choose from {choices})" in capsys.readouterr().err


def test_missing_model_folder_fails_before_loading(gsm8k_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="/nonexistent/model"):
        train.main(run_flags("/nonexistent/model", gsm8k_file, tmp_path))


def test_offline_train_py_prints_its_message_without_a_traceback(gsm8k_file, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "nobody/no-such-model", "--data",
                          str(gsm8k_file)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "could not download nobody/no-such-model" in run.stderr and "Traceback" not in run.stderr


def skip_without_bf16_gpu(device):
    if device == "cuda" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0 (a T4 trains in fp16)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_tiny_run_lowers_the_loss_and_writes_a_loadable_adapter(learnable_checkpoint, gsm8k_file, tmp_path, device):
    skip_without_bf16_gpu(device)
    flags = run_flags(learnable_checkpoint, gsm8k_file, tmp_path, "--max_steps", "12", "--warmup_steps", "2",
                      "--learning_rate", "1e-2", "--eval_steps", "4", "--save_steps", "4", "--save_total_limit", "1",
                      "--device", device)
    state = train.main(flags + ["--dtype", "bf16"])  # the recipe's path: NF4 base, bf16 autocast
    losses = state["loss"]
    assert sum(losses[s] for s in (10, 11, 12)) < sum(losses[s] for s in (1, 2, 3)) - 3 * 0.2
    val = state["val_loss"]
    assert sorted(val) == [4, 8, 12] and val[12] < val[4]
    best = min(val, key=val.get)
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert kept == sorted({f"checkpoint-{best:06d}", "checkpoint-000012"})  # the newest, and the best is kept
    adapter = tmp_path / "adapter"
    # experiment_config.json is the resolved config: feeding it back reproduces the run's settings.
    assert train.parse_config(["--config", str(adapter / "experiment_config.json")]) == \
        train.parse_config(flags + ["--dtype", "bf16", "--optim", loop.resolve_optim("auto", torch.device(device))])
    saved, best_saved = adapter_tensors(adapter), adapter_tensors(tmp_path / f"checkpoint-{best:06d}")
    assert all(t.dtype == torch.float32 for t in saved.values())  # LoRA weights stay fp32 under bf16 autocast
    assert saved.keys() == best_saved.keys() and all(torch.equal(t, best_saved[k]) for k, t in saved.items())
    model = lora.load_adapter(Decoder.from_pretrained(learnable_checkpoint, dtype=torch.float32, device="cpu"), adapter)
    assert all(torch.equal(p, saved[k]) for k, p in lora.lora_state_dict(model).items())


# The RNG and 8-bit states must round-trip too. bitsandbytes keeps 32-bit states for tensors under 4096 values:
# rank 64 makes the adapters' A (64 x 64 and up) and most B 8-bit.
RESUME_RUN = ("--max_steps", "6", "--warmup_steps", "2", "--learning_rate", "5e-3", "--eval_steps", "2",
              "--save_steps", "6", "--dtype", "fp32", "--lora_dropout", "0.1", "--optim", "adamw_8bit",
              "--lora_r", "64")


@pytest.fixture(scope="module")
def straight_run(tiny_checkpoint, gsm8k_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return train.main(run_flags(tiny_checkpoint, gsm8k_file, out, *RESUME_RUN)), out


def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("where", ["mid-accumulation", "after the optimizer update"])
def test_ctrl_c_inside_a_step_resumes_bit_identical_to_an_uninterrupted_run(tiny_checkpoint, gsm8k_file, tmp_path,
                                                                          monkeypatch, straight_run, where):
    straight, straight_dir = straight_run
    calls = []
    if where == "mid-accumulation":  # between the two micro-batches of step 3
        compute_loss = train.compute_loss
        monkeypatch.setattr(train, "compute_loss", lambda *a: (torch.is_grad_enabled() and calls.append(1),
                                                               len(calls) == 5 and ctrl_c(), compute_loss(*a))[-1])
    else:
        interrupt_after_optimizer_step(monkeypatch, 3)
    with pytest.raises(SystemExit):
        train.main(run_flags(tiny_checkpoint, gsm8k_file, tmp_path, *RESUME_RUN))
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-000003"]  # the step it was inside
    monkeypatch.undo()
    resumed = train.main(["--resume", "--output_dir", str(tmp_path)])  # every other setting from the checkpoint

    assert resumed["loss"] == straight["loss"] and resumed["val_loss"] == straight["val_loss"]
    a, b = adapter_tensors(straight_dir / "adapter"), adapter_tensors(tmp_path / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_change_that_makes_another_run_and_allows_more_steps(tiny_checkpoint, gsm8k_file,
                                                                             straight_run, capsys):
    _, out = straight_run
    with pytest.raises(SystemExit):
        train.parse_config(["--resume", "--output_dir", str(out), "--seed", "1", "--batch_size", "4"])
    assert "--batch_size 2 -> 4, --seed 3407 -> 1" in capsys.readouterr().err
    cfg = train.parse_config(["--resume", "--output_dir", str(out), "--max_steps", "9"])
    assert (cfg.max_steps, cfg.model, cfg.lora_dropout, cfg.resume) == (
        9, str(tiny_checkpoint), 0.1, str(out / "checkpoint-000006"))


def test_checkpoint_state_loads_without_running_pickled_code(straight_run):
    _, out = straight_run
    state = torch.load(out / "checkpoint-000006" / "training_state.pt", weights_only=True)
    assert state["state"]["step"] == 6 and [set(r) for r in state["rng"]] == [{"python", "numpy", "torch", "cuda"}]
    assert uint8_optimizer_states(state)


def uint8_optimizer_states(training_state):
    states = [s.get("__bnb_optimizer_quant_state__", s) for s in training_state["optimizer"]["state"].values()]
    return [t for s in states for t in s.values() if torch.is_tensor(t) and t.dtype == torch.uint8]


def interrupt_after_optimizer_step(monkeypatch, n):
    optimizer_step, calls = loop.optimizer_step, []
    monkeypatch.setattr(loop, "optimizer_step", lambda *a: (optimizer_step(*a), calls.append(1),
                                                            len(calls) == n and ctrl_c())[0])


@pytest.mark.cuda
def test_8bit_adamw_run_on_cuda_stopped_and_resumed_ends_where_an_uninterrupted_one_does(tiny_checkpoint, gsm8k_file,
                                                                                       tmp_path, monkeypatch):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    flags = (*RESUME_RUN, "--device", "cuda")
    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels' backward may add in any order: like with like
        straight = train.main(run_flags(tiny_checkpoint, gsm8k_file, tmp_path / "straight", *flags))
        interrupt_after_optimizer_step(monkeypatch, 3)
        with pytest.raises(SystemExit):
            train.main(run_flags(tiny_checkpoint, gsm8k_file, tmp_path / "resumed", *flags))
        monkeypatch.undo()
        saved = tmp_path / "resumed" / "checkpoint-000003"
        assert uint8_optimizer_states(torch.load(saved / "training_state.pt", weights_only=True))
        resumed = train.main(["--resume", "--output_dir", str(tmp_path / "resumed")])
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-5)
    a, b = adapter_tensors(tmp_path / "straight" / "adapter"), adapter_tensors(tmp_path / "resumed" / "adapter")
    assert a.keys() == b.keys() and all(b[k].device.type == "cpu" for k in b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], msg=k)


@pytest.mark.parametrize("device, dtype", [("cpu", "fp32"), pytest.param("cuda", "fp16", marks=pytest.mark.cuda)])
def test_step_with_non_finite_gradients_is_skipped_not_applied(tiny_checkpoint, gsm8k_file, tmp_path, monkeypatch,
                                                              capsys, device, dtype):
    compute_loss = train.compute_loss
    calls = []

    def inf_on_first_micro_batch(model, batch):
        loss, n = compute_loss(model, batch)
        calls.append(n)
        return (loss * float("inf") if len(calls) == 1 else loss), n
    monkeypatch.setattr(train, "compute_loss", inf_on_first_micro_batch)
    train.main(run_flags(tiny_checkpoint, gsm8k_file, tmp_path, "--max_steps", "2", "--warmup_steps", "1",
                         "--device", device, "--dtype", dtype, "--validation_split", "0", "--save_steps", "2"))
    assert "step 1: non-finite gradient norm, update skipped" in capsys.readouterr().out
    saved = adapter_tensors(tmp_path / "adapter")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in saved.items())  # step 2 did train


def test_a_step_larger_than_the_training_set_is_refused_before_the_model_loads(tiny_checkpoint, gsm8k_file, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setattr(train, "load_base", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match="= 20000000 examples a step, more than the 24 training examples"):
        train.main(run_flags(tiny_checkpoint, gsm8k_file, tmp_path, "--gradient_accumulation_steps", "10000000"))
