"""loop.py's metrics file and --report_to, and plot.py's curves.

    python -m pytest tests/test_loop.py -q
"""
import json
from types import SimpleNamespace

import pytest

import loop
import plot


def cfg(tmp_path, report_to="none"):
    return SimpleNamespace(output_dir=str(tmp_path), report_to=report_to)


def steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


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


def test_report_to_a_missing_package_is_a_clear_error_before_loading(monkeypatch):
    monkeypatch.setattr(loop.importlib.util, "find_spec", lambda name: None)
    assert loop.check_report_to("wandb") == [
        "--report_to wandb: the wandb package is not installed (pip install wandb), or use --report_to none"]
    assert loop.check_report_to("none") == []
    assert "expected none, tensorboard or wandb" in loop.check_report_to("mlflow")[0]


@pytest.mark.parametrize("rows", [
    [{"step": s, "loss": 2 / s, "lr": 1e-4 * s} for s in range(1, 6)] + [{"step": 5, "val_loss": 0.9}],
    [{"step": s, "reward": 0.1 * s, "correct": 0.1 * s, "format": 0.5, "reasoning": 0.0, "len_mean": 100 - s,
      "len_max": 200, "frac_zero_std": 0.3} for s in range(1, 6)] + [{"step": 5, "accuracy": 0.4}],
], ids=["sft", "rl"])
def test_plot_writes_a_png_of_sft_and_rl_metrics(tmp_path, rows):
    pytest.importorskip("matplotlib")
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot.main([str(path)])
    png = (tmp_path / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
