"""torchrun data parallelism on CPU (gloo): 2 processes x accumulation k equal 1 process x accumulation 2k, and a
2-process run resumes exactly.

    python -m pytest tests/test_distributed.py -q
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, gsm8k_records, write_jsonl
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, n, *flags):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / script), *flags] if n > 1 else \
          [sys.executable, str(ROOT / script), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "gsm8k.jsonl"
    write_jsonl(path, gsm8k_records(32))
    return path


def sft_flags(checkpoint, data_file, out, accumulation, *extra):
    return ["--model", str(checkpoint), "--data", str(data_file), "--output_dir", str(out), "--adapter_path",
            str(out / "adapter"), "--num_samples", "32", "--validation_split", "0.25", "--lora_r", "4", "--lora_alpha",
            "8", "--batch_size", "2", "--gradient_accumulation_steps", str(accumulation), "--max_steps", "4",
            "--warmup_steps", "1", "--learning_rate", "5e-3", "--eval_steps", "2", "--save_steps", "2",
            "--dtype", "fp32", "--device", "cpu", "--quantize", "none", *extra]


def metrics(out, key):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_two_processes_equal_one_with_doubled_accumulation(tiny_checkpoint, gsm8k_file, tmp_path):
    launch("train.py", 1, *sft_flags(tiny_checkpoint, gsm8k_file, tmp_path / "one", 4))
    launch("train.py", 2, *sft_flags(tiny_checkpoint, gsm8k_file, tmp_path / "two", 2))
    for key in ("loss", "val_loss"):
        assert metrics(tmp_path / "two", key) == pytest.approx(metrics(tmp_path / "one", key), rel=1e-5)
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)


def test_a_two_process_run_resumes_exactly(tiny_checkpoint, gsm8k_file, tmp_path):
    flags = sft_flags(tiny_checkpoint, gsm8k_file, tmp_path, 2, "--lora_dropout", "0.1")  # RNG of both processes
    launch("train.py", 2, *flags)
    straight = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "checkpoint-000004")
    shutil.rmtree(tmp_path / "adapter")
    launch("train.py", 2, "--resume", "--output_dir", str(tmp_path))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == straight
    assert metrics(tmp_path, "step") == sorted(metrics(tmp_path, "step"))  # no step twice after the resume


def test_rl_splits_its_questions_over_two_processes(tiny_checkpoint, gsm8k_file, tmp_path):
    launch("rl.py", 2, "--model", str(tiny_checkpoint), "--adapter", "none", "--data", str(gsm8k_file),
           "--output_dir", str(tmp_path), "--adapter_path", str(tmp_path / "adapter"), "--quantize", "none",
           "--dtype", "fp32", "--device", "cpu", "--lora_r", "4", "--prompts_per_step", "2", "--group_size", "2",
           "--max_new_tokens", "4", "--max_steps", "2", "--eval_samples", "2", "--eval_steps", "2", "--save_steps", "2")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 2] and "accuracy" in rows[0] and "accuracy" in rows[-1]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
