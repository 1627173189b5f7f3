"""Every entry point ends a user's mistake in one line that names the file, flag or tensor, with a non-zero exit and
no traceback: hostile checkpoints and adapters, broken data, bad flags, an output over an input, a held lock, torn
files, non-finite values. Each script's own `__main__` block runs here (runpy), so what is tested is what a user sees.

    python -m pytest tests/test_hostile.py -q
"""
import json
import os
import runpy
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, gsm8k_records, write_jsonl
from safetensors.torch import load_file, save_file

import data
import lora
import rl
import stages
import train
from tinyreason import Decoder
from tokenizer import Tokenizer

CPU = ["--quantize", "none", "--dtype", "fp32", "--device", "cpu"]


def refusal(capsys, script: str, *argv) -> str:
    """What `python script argv` ends with: its __main__ block must exit non-zero in one line without a traceback
    (any other exception escaping would be one). argparse's usage line comes before its one error line."""
    old = sys.argv
    sys.argv = [script, *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.argv = old
    message = stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err.strip().split("\n")[-1]
    assert stop.value.code not in (0, None) and "Traceback" not in message
    first, *listed = message.split("\n")
    assert all(line.startswith("  ") for line in listed) and (first.endswith(": invalid configuration:") or not listed)
    return message


def hostile(src, dst, name: str, damage):
    """The one builder of hostile files: a copy of the folder `src` in which damage(path) breaks the file `name`."""
    shutil.copytree(src, dst)
    damage(dst / name)
    return dst


def rewrite_header(edit):
    def damage(path):  # a valid file again, whose header says something else
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        edit(header)
        new = json.dumps(header).encode()
        path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    return damage


def transpose(header):
    header["model.embed_tokens.weight"]["shape"].reverse()


def set_fields(**changes):
    return lambda path: path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def write(text):
    return lambda path: path.write_text(text)


def link_out(path):
    """The file moved beside the folder, a symlink to it in its place."""
    outside = path.parent.parent / f"outside-{path.name}"
    path.rename(outside)
    path.symlink_to(outside)


def poison(path):
    tensors = {k: v.clone() for k, v in load_file(path).items()}
    tensors[min(tensors)][0, 0] = float("nan")
    save_file(tensors, path)


def tear_line(n):
    def damage(path):
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:n - 1]) + lines[n - 1][:len(lines[n - 1]) // 2] + "\n" + "".join(lines[n:]))
    return damage


@pytest.fixture(scope="module")
def gsm(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "gsm.jsonl"
    write_jsonl(path, gsm8k_records(8))
    return path


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_checkpoint):
    """A valid adapter of the tiny checkpoint with a verification adapter beside it (verify/)."""
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    model = lora.inject(Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32), r=4, alpha=8)
    stages.save_adapters(stages.add_verify_adapter(model, Tokenizer.from_pretrained(tiny_checkpoint), 4, 8), folder,
                         str(tiny_checkpoint))
    return folder


def command(script, model, adapter, data, out):
    """A short, valid run of each entry point, on the CPU."""
    return {
        "train.py": ["--model", model, "--data", data, "--output_dir", out, "--adapter_path", out / "adapter",
                     "--max_steps", 1, "--num_samples", 8, "--batch_size", 1, "--gradient_accumulation_steps", 1,
                     "--lora_r", 4, *CPU],
        "rl.py": ["--model", model, "--adapter", adapter, "--data", data, "--output_dir", out, "--adapter_path",
                  out / "adapter", "--max_steps", 1, "--prompts_per_step", 2, "--group_size", 2, "--eval_samples", 0,
                  "--max_new_tokens", 4, "--lora_r", 4, *CPU],
        "eval.py": ["--model", model, "--adapter", adapter, "--data", data, "--out", out / "preds.jsonl", "--limit", 2,
                    "--max_new_tokens", 4, *CPU],
        "chat.py": ["--model", model, "--adapter", adapter, "--prompt", "What is 1 + 1?", "--max_new_tokens", 4, *CPU],
        "distill.py": ["--teacher", model, "--adapter", adapter, "--data", data, "--out", out / "traces.jsonl",
                       "--num_questions", 2, "--samples_per_question", 2, "--max_new_tokens", 4, *CPU],
        "lora.py": ["merge", "--model", model, "--adapter", adapter, "--out", out / "merged"],
    }[script]


ENTRY_POINTS = ["train.py", "rl.py", "eval.py", "chat.py", "distill.py", "lora.py"]
MODEL_FILES = {  # family: (file of the checkpoint, its damage, what the line says)
    "header": ("model.safetensors", lambda p: p.write_bytes((2 ** 40).to_bytes(8, "little") + p.read_bytes()[8:]),
               "model.safetensors: not a safetensors file: its header length 1,099,511,627,776 is over the format's"),
    "offsets": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes() + bytes(8)),
                "model.safetensors: not a safetensors file: its tensors end at byte"),
    "shapes": ("model.safetensors", rewrite_header(transpose), "tensor model.embed_tokens.weight has shape"),
    "config": ("config.json", set_fields(num_hidden_layers=10 ** 6), "config.json implies"),
    "index paths": ("model.safetensors.index.json", write('{"weight_map": {"lm_head.weight": "../model.safetensors"}}'),
                    "'../model.safetensors' is not a file of this folder"),
    "tokenizer": ("tokenizer.json", write("garbage"), "tokenizer.json: not a tokenizer file the tokenizers library"),
    "tokenizer config": ("tokenizer_config.json", set_fields(chat_template=5),
                         "tokenizer_config.json: chat_template, eos_token and pad_token must be text"),
    "a tokenizer link out of its folder": ("tokenizer.json", link_out, "'tokenizer.json' is not a file of this folder"),
}
COPIED_UNREAD_BY_MERGE = {"tokenizer", "tokenizer config"}  # merge refuses only their links out of the folder




@pytest.mark.parametrize("script, family", [(s, f) for s in ENTRY_POINTS for f in MODEL_FILES
                                            if s != "lora.py" or f not in COPIED_UNREAD_BY_MERGE])
def test_a_hostile_checkpoint_is_refused_in_one_line_naming_its_file(capsys, tmp_path, tiny_checkpoint, adapter, gsm,
                                                                     script, family):
    name, damage, message = MODEL_FILES[family]
    model = hostile(tiny_checkpoint, tmp_path / "model", name, damage)
    argv = command(script, model, adapter if script == "lora.py" else "none", gsm, tmp_path / "out")
    assert message in refusal(capsys, script, *argv)


FIRST = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"  # the first of the adapter's names, sorted
ADAPTER_FILES = {  # family: (file of the adapter folder, its damage, what the line says of the adapter `folder`)
    "huge r": ("adapter_config.json", set_fields(r=10 ** 5),
               f"{{folder}}/adapter_model.safetensors: tensor {FIRST} is (4, 128) in the adapter but (100000, 128)"),
    "a link out of its folder": ("adapter_model.safetensors", link_out,
                                 "{folder}: 'adapter_model.safetensors' is not a file of this folder"),
    "NaN": ("adapter_model.safetensors", poison,
            f"{{folder}}/adapter_model.safetensors: tensor {FIRST} holds non-finite values"),
    "config": ("adapter_config.json", set_fields(base_model_name_or_path=5),
               "{folder}/adapter_config.json: base_model_name_or_path is 5, expected a string"),
}


@pytest.mark.parametrize("script", ["rl.py", "eval.py", "chat.py", "distill.py", "lora.py"])
@pytest.mark.parametrize("family", ADAPTER_FILES)
def test_a_hostile_adapter_is_refused_in_one_line_naming_its_file(capsys, tmp_path, tiny_checkpoint, adapter, gsm,
                                                                  script, family):
    name, damage, message = ADAPTER_FILES[family]
    folder = hostile(adapter, tmp_path / "adapter", name, damage)
    argv = command(script, tiny_checkpoint, folder, gsm, tmp_path / "out")
    assert message.format(folder=folder) in refusal(capsys, script, *argv)


@pytest.mark.parametrize("script", ["eval.py", "chat.py"])
@pytest.mark.parametrize("family", ADAPTER_FILES)
def test_a_hostile_verification_adapter_is_refused_before_it_is_added(capsys, tmp_path, tiny_checkpoint, adapter, gsm,
                                                                      script, family, monkeypatch):
    name, damage, message = ADAPTER_FILES[family]
    folder = hostile(adapter, tmp_path / "adapter", f"verify/{name}", damage)
    added = []
    monkeypatch.setattr(stages, "add_verify_adapter", lambda *args: added.append(1))
    argv = command(script, tiny_checkpoint, folder, gsm, tmp_path / "out")
    assert message.format(folder=folder / "verify") in refusal(capsys, script, *argv)
    assert not added


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint, gsm):
    """The output_dir of a one-step run of train.py and of rl.py (checkpoint-000001, metrics.jsonl), to resume."""
    folders = {}
    for script, main in (("train.py", train.main), ("rl.py", rl.main)):
        folders[script] = tmp_path_factory.mktemp("run") / "run"
        main([str(a) for a in command(script, tiny_checkpoint, "none", gsm, folders[script])])
    return folders


RESUMED = {  # family: (file of the run's output_dir, its damage, what the line says of the copy `run`)
    "adapter: huge r": ("checkpoint-000001/adapter_config.json", set_fields(r=10 ** 5),
                        f"{{run}}/checkpoint-000001/adapter_model.safetensors: tensor {FIRST} is (4, 128) in the"),
    "adapter: a link out of its folder": ("checkpoint-000001/adapter_model.safetensors", link_out,
                                          "{run}/checkpoint-000001: 'adapter_model.safetensors' is not a file of"),
    "NaN": ("checkpoint-000001/adapter_model.safetensors", poison, f"tensor {FIRST} holds non-finite values"),
    "torn lines": ("metrics.jsonl", lambda p: p.write_text('{"step": 1, "lo\n' + p.read_text()),
                   "{run}/metrics.jsonl: line 1 is not JSON"),
    "a line that is no object": ("metrics.jsonl", write("[1]\n"), "{run}/metrics.jsonl: line 1 is not a JSON object"),
    "a torn training state": ("checkpoint-000001/training_state.pt", lambda p: p.write_bytes(p.read_bytes()[:1000]),
                              "{run}/checkpoint-000001/training_state.pt: not a training state of this run"),
}


@pytest.mark.parametrize("script", ["train.py", "rl.py"])
@pytest.mark.parametrize("family", RESUMED)
def test_a_hostile_checkpoint_to_resume_is_refused_in_one_line(capsys, tmp_path, runs, script, family):
    name, damage, message = RESUMED[family]
    run = hostile(runs[script], tmp_path / "run", name, damage)
    line = refusal(capsys, script, "--resume", "--output_dir", run, "--adapter_path", run / "adapter", "--max_steps", 2)
    assert message.format(run=run) in line


def nest(path):
    path.write_text(path.read_text() + "[" * 100_000 + "]" * 100_000 + "\n")  # deeper than json.loads goes


@pytest.mark.parametrize("script", ["train.py", "rl.py", "eval.py", "distill.py"])
@pytest.mark.parametrize("damage, line", [(tear_line(2), 2), (nest, 9)], ids=["torn", "nested too deep"])
def test_a_data_file_with_a_broken_line_is_named_with_the_line(capsys, tmp_path, tiny_checkpoint, gsm, script, damage,
                                                               line):
    broken = hostile(gsm.parent, tmp_path / "data", gsm.name, damage) / gsm.name
    argv = command(script, tiny_checkpoint, "none", broken, tmp_path / "out")
    assert f"{broken}, line {line}: not valid JSON" in refusal(capsys, script, *argv)


FLAGS = [  # (entry point, a flag with a value no run can use, what the line says)
    ("train.py", ["--learning_rate", "nan"], "--learning_rate must be a finite number (got nan)"),
    ("rl.py", ["--temperature", "nan"], "--temperature must be a finite number (got nan)"),
    ("eval.py", ["--batch_size", "0"], "--batch_size and --max_new_tokens must be at least 1"),
    ("chat.py", ["--temperature", "nan"], "need a finite --temperature >= 0"),
    ("distill.py", ["--temperature", "nan"], "--temperature a finite number > 0"),
    ("lora.py", ["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    *((script, ["--device", "gpu"], "--device gpu: not a device") for script in ENTRY_POINTS[:5]),
]


@pytest.mark.parametrize("script, flags, message", FLAGS, ids=[f"{s} {f[0]}" for s, f, _ in FLAGS])
def test_a_flag_no_run_can_use_is_refused_naming_the_flag(capsys, tmp_path, tiny_checkpoint, adapter, gsm, script,
                                                          flags, message):
    argv = command(script, tiny_checkpoint, adapter if script == "lora.py" else "none", gsm, tmp_path / "out")
    assert message in refusal(capsys, script, *argv, *flags)


CONFIG_FILES = {"train.py": {"max_steps": "1"}, "rl.py": {"max_new_tokens": "4"}, "eval.py": {"limit": [2]},
                "chat.py": {"top_p": "1"}, "distill.py": {"num_questions": 2.0}}


@pytest.mark.parametrize("script", CONFIG_FILES)
def test_a_config_file_field_of_the_wrong_type_is_refused_naming_the_file_and_field(capsys, tmp_path, tiny_checkpoint,
                                                                                   gsm, script):
    (field, value), = CONFIG_FILES[script].items()
    (tmp_path / "run.json").write_text(json.dumps({field: value}))
    argv = command(script, tiny_checkpoint, "none", gsm, tmp_path / "out")
    assert f"{tmp_path / 'run.json'}: {field} {value!r}: expected" in refusal(capsys, script, *argv, "--config",
                                                                        tmp_path / "run.json")


@pytest.mark.parametrize("script", ["rl.py", "eval.py", "chat.py"])
def test_a_run_config_beside_the_adapter_of_the_wrong_type_is_refused_by_name(capsys, tmp_path, tiny_checkpoint,
                                                                              adapter, gsm, script):
    folder = hostile(adapter, tmp_path / "adapter", "experiment_config.json", write('{"quantize": 4}'))
    line = refusal(capsys, script, *command(script, tiny_checkpoint, folder, gsm, tmp_path / "out"))
    assert f"{folder}/experiment_config.json: quantize is 4, expected one of ('nf4', 'none')" in line


@pytest.mark.parametrize("script, flag", [("train.py", "--output_dir"), ("rl.py", "--adapter_path"),
                                          ("distill.py", "--out")])
def test_an_output_over_an_input_is_refused_before_anything_is_written(capsys, tmp_path, tiny_checkpoint, gsm,
                                                                      script, flag):
    model, records = Path(shutil.copytree(tiny_checkpoint, tmp_path / "model")), Path(shutil.copy(gsm, tmp_path))
    output, input_flag = (model / "run", "--model") if flag == "--output_dir" else (records, "--data")
    argv = command(script, model, "none", records, tmp_path / "out")
    assert f"{flag} {output} is, holds or lies inside {input_flag}" in refusal(capsys, script, *argv, flag, output)
    assert records.read_bytes() == gsm.read_bytes() and not (model / "run").exists()


@pytest.mark.parametrize("script", ["train.py", "rl.py"])
def test_an_output_dir_another_run_holds_is_refused_naming_the_holder(capsys, tmp_path, tiny_checkpoint, gsm, script):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    argv = command(script, tiny_checkpoint, "none", gsm, tmp_path / "out")
    assert f"--output_dir {tmp_path / 'out'} is in use by process {os.getpid()}" in refusal(capsys, script, *argv)


def test_a_torn_line_inside_distills_traces_is_named(capsys, tmp_path, tiny_checkpoint, gsm):
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({**r, "assistant": ""}) + "\n" for r in gsm8k_records(3)))
    tear_line(2)(traces)
    argv = command("distill.py", tiny_checkpoint, "none", gsm, tmp_path)
    assert f"{traces}: line 2 is not JSON" in refusal(capsys, "distill.py", *argv)


@pytest.fixture
def no_model_load(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")
    monkeypatch.setattr(Decoder, "from_pretrained", fail)


def test_a_prompt_past_the_models_context_is_refused_with_its_token_count_before_the_model_loads(
        capsys, tmp_path, tiny_checkpoint, gsm, no_model_load):
    question = "1 + 1 " * 100  # fewer bytes than 512 tokens can hold, more tokens than 512
    n = len(data.prompt_ids(Tokenizer.from_pretrained(tiny_checkpoint), question))
    line = refusal(capsys, "chat.py", *command("chat.py", tiny_checkpoint, "none", gsm, tmp_path), "--prompt", question)
    assert f"chat.py: the prompt is {n} tokens, past the model's context of 512 (max_position_embeddings" in line


def test_a_huge_prompt_is_refused_from_its_length_without_being_tokenized(capsys, tmp_path, tiny_checkpoint, gsm,
                                                                          no_model_load, monkeypatch):
    question = "x" * 51_000
    longest = Tokenizer.from_pretrained(tiny_checkpoint).max_token_bytes
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text: pytest.fail("the prompt was tokenized"))
    line = refusal(capsys, "chat.py", *command("chat.py", tiny_checkpoint, "none", gsm, tmp_path), "--prompt", question)
    at_least = -(-len(data.SYSTEM_PROMPT + question) // longest)
    assert f"chat.py: the prompt is at least {at_least:,} tokens, past the model's context of 512" in line


@pytest.mark.parametrize("script, flag", [("train.py", "--output_dir"), ("rl.py", "--adapter_path"), ("eval.py", "--out"),
                                          ("distill.py", "--out"), ("lora.py", "--out")])
def test_an_output_inside_a_file_is_refused_before_the_model_loads(capsys, tmp_path, tiny_checkpoint, adapter, gsm,
                                                                   no_model_load, script, flag):
    (tmp_path / "afile").write_text("mine")
    output = tmp_path / "afile" / "x"
    argv = command(script, tiny_checkpoint, adapter if script == "lora.py" else "none", gsm, tmp_path / "out")
    assert f"{flag} {output}: {tmp_path / 'afile'} is a file, not a folder" in refusal(capsys, script, *argv, flag,
                                                                                        output)
    assert (tmp_path / "afile").read_text() == "mine"


def test_an_output_dir_that_is_a_file_is_refused(capsys, tmp_path, tiny_checkpoint, gsm, no_model_load):
    (tmp_path / "afile").write_text("mine")
    argv = command("train.py", tiny_checkpoint, "none", gsm, tmp_path / "afile")
    assert f"--output_dir {tmp_path / 'afile'} is a file, not a folder" in refusal(capsys, "train.py", *argv)


def test_a_metrics_line_without_a_step_is_refused_on_resume(capsys, tmp_path, runs):
    run = hostile(runs["train.py"], tmp_path / "run", "metrics.jsonl", write('{"loss": 1}\n'))
    line = refusal(capsys, "train.py", "--resume", "--output_dir", run, "--adapter_path", run / "adapter",
                   "--max_steps", 2)
    assert f"{run}/metrics.jsonl: line 1 has no step number" in line


@pytest.mark.parametrize("flag", ["--rescore", "--compare"])
@pytest.mark.parametrize("damage, message", [
    (tear_line(1), "{path}, line 1: not valid JSON"), (write("[1]\n"), "{path} line 1 is not a line eval.py --out wrote"),
    (lambda p: p.write_bytes(b"\xff\n"), "{path}: not UTF-8 text")], ids=["torn", "no object", "not UTF-8"])
def test_a_broken_predictions_file_is_named_by_rescore_and_compare(capsys, tmp_path, flag, damage, message):
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps(dict(question="q", gold="1", output="1", tokens=1, stopped=True, correct=True)) + "\n")
    damage(path)
    argv = [flag, path] + [path] * (flag == "--compare")
    assert message.format(path=path) in refusal(capsys, "eval.py", *argv)


@pytest.mark.parametrize("script", ["eval.py", "distill.py"])
def test_a_question_past_the_models_context_is_refused_naming_it_before_the_model_loads(capsys, tmp_path,
                                                                                       tiny_checkpoint, no_model_load,
                                                                                       script):
    records = gsm8k_records(4)
    records[1]["question"] = "1 + 1 " * 100  # more tokens than the tiny model's 512
    path = tmp_path / "long.jsonl"
    write_jsonl(path, records)
    line = refusal(capsys, script, *command(script, tiny_checkpoint, "none", path, tmp_path / "out"))
    assert "past the model's context of 512 (max_position_embeddings" in line
    assert (f"{path} line 2:" if script == "eval.py" else f"--data {path}, question 1:") in line


def test_rl_drops_a_question_past_the_models_context_and_says_so(tmp_path, tiny_checkpoint, monkeypatch):
    records = gsm8k_records(4)
    records[1]["question"] = "1 + 1 " * 100  # more tokens than the tiny model's 512
    path = tmp_path / "long.jsonl"
    write_jsonl(path, records)
    logged = []

    class Loading(Exception):
        pass

    def load_base(*args):
        raise Loading
    monkeypatch.setattr(rl.loop, "log", logged.append)
    monkeypatch.setattr(rl, "load_base", load_base)
    cfg = rl.parse_config([str(a) for a in command("rl.py", tiny_checkpoint, "none", path, tmp_path / "out")])
    with pytest.raises(Loading):  # the questions are chosen by then
        rl.setup(cfg)
    assert "data: 1 questions dropped, their prompts past the model's context of 512 tokens" in logged
    assert "data: 3 training questions, 0 held out" in " ".join(logged)
