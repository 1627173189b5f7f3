"""checkpoint.py: which checkpoints pruning keeps, which folder --resume names, which folder an export may replace,
what no output may overwrite, one run per folder, and saves that fail whole.

    python -m pytest tests/test_checkpoint.py -q
"""
import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import GSM8K

import checkpoint
import lora
import loop


@pytest.mark.parametrize("limit, kept", [(1, [4, 10]), (2, [4, 10]), (3, [4, 8, 10]), (9, [2, 4, 6, 8, 10])])
def test_pruning_keeps_the_newest_and_the_best_checkpoint_within_the_limit(tmp_path, limit, kept):
    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"checkpoint-{step:06d}").mkdir()
    checkpoint.Checkpoints(tmp_path, limit).prune({2: 3.0, 4: 1.0, 6: 2.0, 8: 2.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"checkpoint-{s:06d}" for s in kept]


def test_the_best_of_a_maximized_score_is_the_highest_and_without_scores_the_newest(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step:06d}").mkdir()
    assert checkpoint.Checkpoints(tmp_path, maximize=True).best({2: 0.5, 4: 0.7, 6: 0.6}) == 4
    assert checkpoint.Checkpoints(tmp_path).best({}) == 6


def test_resume_latest_is_the_newest_checkpoint_and_a_folder_must_hold_a_training_state(tmp_path):
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step:06d}").mkdir()
    assert checkpoint.resume_folder("latest", tmp_path) == tmp_path / "checkpoint-000010"
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        checkpoint.resume_folder(str(tmp_path / "checkpoint-000002"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint-\\* folder"):
        checkpoint.resume_folder("latest", tmp_path / "empty")


@pytest.mark.parametrize("target", ["run", "project", "model"])
def test_an_adapter_path_that_is_not_an_earlier_export_is_refused_before_anything_runs(tmp_path, target):
    """--output_dir proj/run --adapter_path proj would have replaced proj, thesis and all."""
    (tmp_path / "project" / "run" / "checkpoint-000002").mkdir(parents=True)
    (tmp_path / "project" / "thesis.tex").write_text("years of work")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    folder = {"run": tmp_path / "project" / "run", "project": tmp_path / "project", "model": tmp_path / "model"}[target]
    cfg = loop.LoopConfig(data=str(GSM8K), output_dir=str(tmp_path / "new"), adapter_path=str(folder))
    assert any(p.startswith(f"--adapter_path {folder} exists") for p in loop.config_problems(cfg))
    assert (tmp_path / "project" / "thesis.tex").read_text() == "years of work"


def test_an_earlier_export_may_be_replaced(tmp_path):
    export = tmp_path / "adapter"
    export.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", checkpoint.CONFIG_FILE):
        (export / name).write_text("{}")
    cfg = loop.LoopConfig(data=str(GSM8K), output_dir=str(tmp_path / "new"), adapter_path=str(export))
    assert loop.config_problems(cfg) == []


def test_a_stray_folder_named_like_a_checkpoint_is_not_one(tmp_path):
    for name in ("checkpoint-000002", "checkpoint-000004.bak", ".tmp-checkpoint-000006"):
        (tmp_path / name).mkdir()
    assert list(checkpoint.Checkpoints(tmp_path).saved()) == [2]
    assert checkpoint.resume_folder("latest", tmp_path) == tmp_path / "checkpoint-000002"


def test_the_best_checkpoint_is_chosen_among_finite_scores(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step:06d}").mkdir()
    assert checkpoint.Checkpoints(tmp_path).best({2: 0.9, 4: float("nan"), 6: 1.0}) == 2
    assert checkpoint.Checkpoints(tmp_path).best({4: float("nan")}) == 6  # none finite: the newest


@pytest.mark.parametrize("flag, output, input_flag", [
    ("adapter_path", "model", "--model"), ("adapter_path", "model/sub", "--model"),  # is, lies inside
    ("output_dir", "data", "--data"), ("adapter_path", "data/train.jsonl", "--data")])  # holds, is
def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused(tmp_path, flag, output, input_flag):
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(GSM8K.read_text())
    paths = dict(model=str(tmp_path / "model"), data=str(tmp_path / "data" / "train.jsonl"),
                 output_dir=str(tmp_path / "run"), adapter_path=str(tmp_path / "adapter"))
    cfg = loop.LoopConfig(**{**paths, flag: str(tmp_path / output)})
    assert f"--{flag} {tmp_path / output} is, holds or lies inside {input_flag}" in "".join(loop.config_problems(cfg))


def test_a_second_run_on_an_output_dir_is_refused_while_the_first_holds_it(tmp_path):
    with checkpoint.RunLock(tmp_path):
        with pytest.raises(ValueError, match=rf"--output_dir {tmp_path} is in use by process {os.getpid()} on "):
            checkpoint.RunLock(tmp_path).__enter__()
        assert "is in use by process" in loop.config_problems(loop.LoopConfig(output_dir=str(tmp_path)))[0]
    assert not (tmp_path / ".lock").exists()


def test_the_lock_of_a_run_that_died_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with checkpoint.RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_a_full_disk_during_a_save_is_named_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")  # what torch.save says
    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    with pytest.raises(OSError, match="checkpoint-000002 failed: no space left on the device"):
        checkpoint.Checkpoints(tmp_path, save_adapter=lambda model, folder, name: folder.mkdir()).save(
            torch.nn.Module(), torch.optim.SGD([torch.zeros(1, requires_grad=True)]),
            torch.amp.GradScaler("cpu", enabled=False), {"step": 2}, loop.LoopConfig(), {})
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_with_non_finite_weights_is_never_saved(tmp_path):
    model = lora.inject(toy_model(), ("q_proj",), r=2, alpha=4)
    torch.nn.init.constant_(model.q_proj.lora_B.weight, float("nan"))
    with pytest.raises(ValueError, match=r"step 3: the adapter diverged \(base_model\.model\.q_proj\.lora_B\.weight"):
        checkpoint.Checkpoints(tmp_path).save(model, None, None, {"step": 3}, loop.LoopConfig(), {})
    assert list(tmp_path.iterdir()) == []


def toy_model():
    """One linear layer, the model LoRA sees."""
    model = torch.nn.Module()
    model.config, model.q_proj = SimpleNamespace(projections=("q_proj",)), torch.nn.Linear(4, 4)
    return model
