"""loop.py: the schedule, the checks both loops share, the metrics file, the loop itself (evaluations, checkpoints,
the exported best, Ctrl-C at a step boundary) on a toy model, and plot.py's curves.

    python -m pytest tests/test_loop.py -q
"""
import json
import os
import signal
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora
import loop
import plot


def cfg(tmp_path, report_to="none"):
    return SimpleNamespace(output_dir=str(tmp_path), report_to=report_to)


def steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_schedule_warms_up_then_decays_linearly_to_zero():
    cfg = loop.LoopConfig(learning_rate=1e-3, warmup_steps=10, max_steps=110)
    lrs = [loop.get_lr(s, cfg) for s in range(cfg.max_steps)]
    assert lrs[0] == pytest.approx(1e-4)  # step 0 already trains
    assert lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)  # the peak at the end of warmup
    assert lrs[-1] == pytest.approx(1e-3 / 100)  # one decay step before 0
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10])) and all(a > b for a, b in zip(lrs[10:], lrs[11:]))


def test_metrics_are_one_line_per_call_and_a_resume_drops_the_lines_past_its_checkpoint(tmp_path):
    metrics = loop.Metrics(cfg(tmp_path))
    for step in (1, 2, 3, 4):
        metrics.log(step, loss=1.0 / step, lr=1e-3)
    metrics.log(4, val_loss=0.5)
    assert steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 4]
    resumed = loop.Metrics(cfg(tmp_path), resumed_step=2)  # the checkpoint was at step 2: 3 and 4 are redone
    resumed.log(3, loss=0.3)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and lines[2]["loss"] == 0.3 and "time" in lines[2]


def test_report_to_a_missing_package_is_a_clear_error_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(loop.importlib.util, "find_spec", lambda name: None)
    assert loop.config_problems(loop.LoopConfig(report_to="wandb", output_dir=str(tmp_path))) == [
        "--report_to wandb: the wandb package is not installed (pip install wandb), or use --report_to none"]
    assert loop.config_problems(loop.LoopConfig(output_dir=str(tmp_path))) == []


def test_a_fresh_run_into_an_output_dir_with_checkpoints_is_refused(tmp_path):
    (tmp_path / "checkpoint-000002").mkdir()
    assert "already holds checkpoints: continue them with --resume" in \
        loop.config_problems(loop.LoopConfig(output_dir=str(tmp_path)))[0]
    assert loop.config_problems(loop.LoopConfig(output_dir=str(tmp_path), resume="latest")) == []


class Toy(nn.Module):
    config = SimpleNamespace(projections=("q_proj",))

    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(4, 4)


def run_toy(tmp_path, val_losses, interrupt_at=None, **fields):
    """loop.run over a LoRA on one linear layer: each step one AdamW update; the validation loss of step s is
    val_losses[s]."""
    torch.manual_seed(0)
    model = Toy()
    if fields.get("resume"):  # as the scripts do: the checkpoint's own adapter
        lora.load_adapter(model, fields["resume"])
    else:
        lora.inject(model, ("q_proj",), r=2, alpha=4)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scaler = torch.optim.AdamW(params, lr=1e-2), torch.amp.GradScaler("cpu", enabled=False)
    cfg = loop.LoopConfig(model="toy", max_steps=5, eval_steps=2, save_steps=2, save_total_limit=1, device="cpu",
                          output_dir=str(tmp_path), adapter_path=str(tmp_path / "adapter"), **fields)
    state = {"step": 0, "loss": {}, "val_loss": {}}

    def train_step(step):
        loss = model.q_proj(torch.ones(1, 4)).square().mean()
        loss.backward()
        loop.optimizer_step(optimizer, scaler, params, 1.0, loop.get_lr(step, cfg))
        if step + 1 == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C inside the step
        return {"loss": loss.item()}, None

    return loop.run(cfg, "toy.py", model, optimizer, scaler, state, train_step,
                    lambda: ({"val_loss": val_losses[state["step"]]}, "validation"), score="val_loss")


def test_the_loop_evaluates_and_saves_on_schedule_and_at_the_end_and_exports_the_best(tmp_path):
    state = run_toy(tmp_path, {0: 0.05, 2: 0.5, 4: 0.1, 5: 0.3})
    assert sorted(state["loss"]) == [1, 2, 3, 4, 5] and state["val_loss"] == {2: 0.5, 4: 0.1, 5: 0.3}
    assert steps(tmp_path / "metrics.jsonl") == [0, 1, 2, 2, 3, 4, 4, 5, 5]  # step 0: the start, before training
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-000004", "checkpoint-000005"]
    exported, best = (load_file(folder / "adapter_model.safetensors")
                      for folder in (tmp_path / "adapter", tmp_path / "checkpoint-000004"))
    assert exported.keys() == best.keys() and all(torch.equal(exported[k], best[k]) for k in best)
    assert (tmp_path / "adapter" / "experiment_config.json").is_file()


def test_ctrl_c_saves_the_step_it_was_inside_and_a_resume_ends_where_an_uninterrupted_run_does(tmp_path):
    scores = {0: 0.9, 2: 0.5, 4: 0.1, 5: 0.3}
    straight = run_toy(tmp_path / "straight", scores)
    with pytest.raises(SystemExit) as stop:
        run_toy(tmp_path / "stopped", scores, interrupt_at=3)
    assert stop.value.code == 130
    assert sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-*")) == ["checkpoint-000002",
                                                                                  "checkpoint-000003"]
    resumed = run_toy(tmp_path / "stopped", scores, resume=str(tmp_path / "stopped" / "checkpoint-000003"))
    assert resumed["loss"] == straight["loss"] and resumed["val_loss"] == straight["val_loss"]
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "stopped" / adapter).read_bytes() == (tmp_path / "straight" / adapter).read_bytes()


@pytest.mark.parametrize("rows", [
    [{"step": s, "loss": 2 / s, "lr": 1e-4 * s} for s in range(1, 6)] + [{"step": 5, "val_loss": 0.9}],
    [{"step": s, "reward": 0.1 * s, "correct": 0.1 * s, "format": 0.5, "reasoning": 0.0, "len_mean": 100 - s,
      "len_max": 200, "frac_zero_std": 0.3, "truncated": 0.1} for s in range(1, 6)] + [{"step": 5, "accuracy": 0.4}],
], ids=["sft", "rl"])
def test_plot_writes_a_png_of_sft_and_rl_metrics(tmp_path, rows):
    pytest.importorskip("matplotlib")
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot.main([str(path)])
    png = (tmp_path / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_the_plotted_mean_of_a_step_is_over_it_and_the_steps_before_it_within_the_window():
    assert plot.trailing_mean([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]


def test_a_torn_last_metrics_line_is_dropped_with_a_note_and_a_torn_middle_one_is_named(tmp_path, monkeypatch):
    notes = []
    monkeypatch.setattr(loop, "log", notes.append)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    loop.Metrics(cfg(tmp_path), resumed_step=2)
    assert steps(tmp_path / "metrics.jsonl") == [1, 2] and "dropped its last line" in notes[0]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not JSON"):
        loop.Metrics(cfg(tmp_path), resumed_step=2)


@pytest.mark.parametrize("flag, value", [("learning_rate", float("inf")), ("max_grad_norm", float("nan")),
                                         ("lora_alpha", float("inf"))])
def test_non_finite_numbers_are_refused_before_anything_runs(tmp_path, flag, value):
    problems = loop.config_problems(loop.LoopConfig(output_dir=str(tmp_path), **{flag: value}))
    assert f"--{flag} must be a finite number (got {value})" in problems


def test_leftovers_of_killed_saves_and_exports_are_cleaned_when_a_run_starts(tmp_path):
    for name in (".tmp-checkpoint-000002", ".del-checkpoint-000004", ".tmp-adapter", ".del-adapter"):
        (tmp_path / name).mkdir()
    run_toy(tmp_path, {0: 0.9, 2: 0.5, 4: 0.1, 5: 0.3})
    assert not list(tmp_path.glob(".tmp-*")) + list(tmp_path.glob(".del-*"))


def test_a_run_whose_gradients_stay_non_finite_stops_and_names_its_last_checkpoint(tmp_path):
    model = Toy()
    lora.inject(model, ("q_proj",), r=2, alpha=4)
    cfg = loop.LoopConfig(max_steps=100, save_steps=4, device="cpu", output_dir=str(tmp_path),
                          adapter_path=str(tmp_path / "adapter"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    steps_run = []

    def diverged(step):
        steps_run.append(step)
        return {"grad_norm": float("nan")}, None

    with pytest.raises(ValueError, match=rf"steps 1-{loop.MAX_SKIPPED} all had non-finite gradients: the run diverged; "
                                         rf"the last checkpoint is {tmp_path}/checkpoint-0000{loop.MAX_SKIPPED - 4}"):
        loop.run(cfg, "toy.py", model, optimizer, torch.amp.GradScaler("cpu", enabled=False), {"step": 0, "loss": {}},
                 diverged, score="loss")
    assert len(steps_run) == loop.MAX_SKIPPED and not (tmp_path / ".lock").exists()
