"""The recipes: each file of recipes/ is a config of the script its README row names and of no other, every key a
field of that script with a value of the field's type that passes the script's checks, and each runs a step.

    python -m pytest tests/test_recipes.py -q
"""
import json
import re
import typing
from dataclasses import fields

import pytest
from conftest import GSM8K, ROOT

import rl
import train

RECIPES = sorted((ROOT / "recipes").glob("*.json"))
SCRIPTS = {"train.py": train, "rl.py": rl}
CONFIGS = {"train.py": train.TrainConfig, "rl.py": rl.RLConfig}


def named_script(recipe) -> str:
    """The script of the README row of `recipe`: `python <script> --config recipes/<name>`."""
    rows = re.findall(r"`python (\S+) --config recipes/" + re.escape(recipe.name) + "`",
                      (ROOT / "recipes" / "README.md").read_text())
    assert len(rows) == 1, f"recipes/README.md should name the script of {recipe.name} once"
    return rows[0]


def parses(script: str, recipe) -> bool:
    try:
        SCRIPTS[script].parse_config(["--config", str(recipe)])
    except SystemExit:  # argparse's error: a key the script does not have
        return False
    return True


def of_its_type(value, kind) -> bool:
    if typing.get_origin(kind) is typing.Literal:
        return value in typing.get_args(kind)
    if kind == tuple[str, ...]:
        return type(value) is list and all(type(v) is str for v in value)
    return type(value) is kind or kind is float and type(value) is int  # JSON writes 32.0 as 32


def test_there_is_a_recipe_for_each_of_the_four_cards():
    assert [r.name for r in RECIPES] == ["infused-phi2.json", "nanoreason-step-aware.json", "nexus-lpro.json",
                                         "tiny-reason.json"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.stem)
def test_a_recipe_is_a_config_of_the_script_its_readme_row_names_and_of_no_other(recipe, capsys):
    script = named_script(recipe)
    assert parses(script, recipe) and not any(parses(other, recipe) for other in SCRIPTS if other != script)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.stem)
def test_every_key_is_a_field_of_its_script_with_a_value_of_its_type_that_passes_the_checks(recipe):
    script = named_script(recipe)
    values, kinds = json.loads(recipe.read_text()), {f.name: f.type for f in fields(CONFIGS[script])}
    assert not (wrong := [k for k, v in values.items() if k not in kinds or not of_its_type(v, kinds[k])]), wrong
    cfg = SCRIPTS[script].parse_config(["--config", str(recipe)])
    SCRIPTS[script].check_config(cfg)  # raises on a value out of range
    assert {k: getattr(cfg, k) for k in values} == {k: tuple(v) if type(v) is list else v for k, v in values.items()}


TINY_RUN = {  # what a step on a tiny checkpoint changes beyond --model and --data: the size, where it writes
    "train.py": ["--num_samples", "16", "--max_steps", "1", "--gradient_accumulation_steps", "1",
                 "--max_seq_length", "512", "--eval_steps", "1", "--save_steps", "1"],
    "rl.py": ["--max_steps", "1", "--prompts_per_step", "2", "--max_new_tokens", "8", "--eval_samples", "2",
              "--eval_steps", "1", "--save_steps", "1"],
}
TINY_MODEL = {"infused-phi2": "tiny_phi_checkpoint"}  # phi-2's own projections; the others are Qwen2


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: r.stem)
def test_a_recipe_runs_a_step_of_its_script_on_a_tiny_checkpoint(recipe, request, tmp_path):
    script, checkpoint = named_script(recipe), request.getfixturevalue(TINY_MODEL.get(recipe.stem, "tiny_checkpoint"))
    data = ROOT / "tests" / "data" / "math_train_sample.jsonl" if recipe.stem == "nexus-lpro" else GSM8K
    state = SCRIPTS[script].main(["--config", str(recipe), "--model", str(checkpoint), "--data", str(data),
                                  *TINY_RUN[script],
                                  "--output_dir", str(tmp_path / "run"), "--adapter_path", str(tmp_path / "adapter")])
    assert state["step"] == 1 and (tmp_path / "adapter" / "adapter_model.safetensors").exists()
