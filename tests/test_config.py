"""config.py: a config dataclass as flags, its field comments as --help, Literal fields as choices, --config JSON
files, and comma-separated numbers.

    python -m pytest tests/test_config.py -q
"""
import json
import typing
from dataclasses import dataclass, fields
from typing import Literal

import pytest

import config
import distill
import grade
import rl
import train
from load import DTYPES, QUANTIZE


@dataclass
class Toy:
    steps: int = 10  # optimizer steps
    mode: Literal["fast", "exact"] = "fast"  # how each step runs
    tags: tuple[str, ...] = ("a", "b")  # labels of the run
    note: str = "#1"  # a "#" in a default is no comment
    check: bool = True  # verify each step
    output_dir: str = "out"
    resume: str = ""


def parse(*argv):
    return config.parse_config(Toy, list(argv))


def test_flags_set_fields_and_a_bool_has_a_no_flag():
    assert parse("--steps", "3", "--tags", "x", "y", "--no-check") == Toy(steps=3, tags=("x", "y"), check=False)


def test_a_fields_trailing_comment_is_its_help_with_the_default(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS optimizer steps (default: 10)" in help_text
    assert "labels of the run (default: a b)" in help_text
    assert "a \"#\" in a default is no comment (default: #1)" in help_text


def test_a_literal_field_refuses_other_values_naming_the_flag_and_its_choices(capsys):
    with pytest.raises(SystemExit):
        parse("--mode", "slow")
    assert "argument --mode: invalid choice: 'slow' (choose from 'fast', 'exact')" in capsys.readouterr().err


def test_explicit_flags_override_the_json_config(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"steps": 7, "mode": "exact", "tags": ["q", "v"]}))
    assert parse("--config", str(path), "--steps", "5") == Toy(steps=5, mode="exact", tags=("q", "v"))


@pytest.mark.parametrize("content, message", [
    ({"step": 7}, "unknown fields ['step']"),
    ({"mode": "slow"}, "mode 'slow': expected one of ('fast', 'exact')"),
])
def test_a_json_config_with_an_unknown_field_or_value_is_refused(tmp_path, capsys, content, message):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(content))
    with pytest.raises(SystemExit):
        parse("--config", str(path))
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("cls", [train.TrainConfig, rl.RLConfig, distill.DistillConfig])
def test_every_flag_of_the_scripts_has_a_help_text(cls):
    comments = config.field_comments(cls)
    assert [f.name for f in fields(cls) if not comments.get(f.name)] == []


def choices(cls) -> dict[str, tuple]:
    return {f.name: typing.get_args(f.type) for f in fields(cls) if typing.get_origin(f.type) is typing.Literal}


def test_the_choices_of_the_scripts_flags_are_the_values_the_code_knows():
    for cls in (train.TrainConfig, rl.RLConfig, distill.DistillConfig):
        assert choices(cls)["quantize"] == QUANTIZE and choices(cls)["dtype"] == ("auto", *DTYPES)
    assert choices(rl.RLConfig)["algo"] == tuple(rl.PRESETS) and choices(rl.RLConfig)["format"] == grade.STYLES
    assert set(choices(distill.DistillConfig)["teacher_format"]) <= set(grade.STYLES)


def test_comma_separated_numbers_are_read_only_when_there_are_as_many_as_asked():
    assert config.numbers("1.0,0.1,0", 3) == [1.0, 0.1, 0.0]
    assert config.numbers("1.0,0.1", 3) is None and config.numbers("1.0,x,0", 3) is None
