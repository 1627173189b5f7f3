"""checkpoint.py: which checkpoints pruning keeps, which folder --resume names, which folder an export may replace.

    python -m pytest tests/test_checkpoint.py -q
"""
import pytest
from conftest import GSM8K

import checkpoint
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
