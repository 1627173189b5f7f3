"""bench.py's RL mode end to end on the tiny model (rl.py's GRPO step against TRL's, one warm-up + one timed step)
and the hardware limit it reports next to the generation figures.

    python -m pytest tests/test_bench.py -q
"""
import re
import subprocess
import sys

import pytest
import torch
from conftest import GSM8K, ROOT

RL_KEYS = ("rl_step_s", "rl_new_tokens", "rl_gen_tok_s", "rl_update_tok_s", "rl_peak_gb")


@pytest.mark.slow  # about 20 s on 2 CPU cores: two workers load the model, TRL's trainer builds
def test_rl_mode_runs_both_sides_on_the_same_prompts_and_reports_parseable_keys(tiny_checkpoint):
    pytest.importorskip("trl")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--model", str(tiny_checkpoint), "--data", str(GSM8K), "--steps", "0",
         "--rounds", "0", "--rl_steps", "1", "--rl_prompts", "2", "--rl_group", "2", "--rl_tokens", "8",
         "--rl_micro_batch", "2", "--dtype", "fp32"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    keys = {k: float(v) for k, v in (pair.split("=") for pair in out.stdout.strip().splitlines()[-1].split())}
    for key in RL_KEYS:
        assert keys[key] > 0 and keys[f"peer_{key}"] > 0, (key, keys)
    assert keys["rl_ratio"] == pytest.approx(keys["peer_rl_step_s"] / keys["rl_step_s"], rel=0.01)
    assert keys["rl_new_tokens"] <= 2 * 2 * 8 and keys["peer_rl_new_tokens"] <= 2 * 2 * 8
    # each item's prompt tokens (forwarded in the update, minus the completions) are the same on both sides
    replies = re.findall(r"bench: rl_(ours|peer) (warm-up|run 1): new_tokens (\d+), .*update_tokens (\d+),", out.stdout)
    prompt = {(side, item): int(update) - int(new) for side, item, new, update in replies}
    assert len(prompt) == 4 and all(prompt["ours", item] == prompt["peer", item] for item in ("warm-up", "run 1"))


def test_the_decoding_limit_reads_every_weight_but_the_embedding_rows(tiny_checkpoint, tiny_tied_checkpoint):
    sys.path.insert(0, str(ROOT / "tools"))
    from bench import BenchConfig, hardware_limit
    from tinyreason import Decoder
    for checkpoint in (tiny_checkpoint, tiny_tied_checkpoint):
        model = Decoder.from_pretrained(checkpoint)
        n = sum(p.numel() for p in model.parameters())
        n -= 0 if model.config.tie_word_embeddings else model.model.embed_tokens.weight.numel()
        hw = hardware_limit(BenchConfig(model=str(checkpoint), gen_batch=4), torch.device("cpu"), torch.bfloat16)
        assert hw["step_gb"] == n * 2 / 1e9
        bandwidth_bound = 4 * hw["read_gb_s"] / hw["step_gb"]
        compute_bound = hw["gemm_tflops"] * 1e12 / (2 * n)
        assert hw["limit_tok_s"] == pytest.approx(min(bandwidth_bound, compute_bound))


@pytest.mark.slow  # two workers load the tiny model, three times
def test_baseline_runs_another_checkout_s_own_side_in_place_of_the_peer(tiny_checkpoint):
    """--baseline DIR: here the same checkout on both sides, so both generate exactly the same tokens, in a sweep of
    two batch sizes and a whole eval of 3 prompts 2 at a time."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--model", str(tiny_checkpoint), "--data", str(GSM8K),
         "--steps", "0", "--rounds", "1", "--gen_sweep", "1,2", "--gen_batch", "2", "--gen_tokens", "8",
         "--eval_problems", "3", "--dtype", "fp32", "--baseline", str(ROOT)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"\| +TinyReason \| +baseline \|", out.stdout)
    for mode in ("gen", "eval"):
        replies = re.findall(rf"bench: {mode}_(ours|peer) run 1: tokens (\d+),", out.stdout)
        assert len(replies) == 2 * (mode == "gen") + 2 and len({tokens for _, tokens in replies[-2:]}) == 1
    assert [row.split("|")[1].strip() for row in re.findall(r"^\| \d+ \|.*", out.stdout, re.M)] == ["1", "2"]
