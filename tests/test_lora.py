"""LoRA adapters: a fresh one is a no-op, only A and B train, merging is exact, and adapters travel both ways
between us and PEFT; a merged export loads in transformers.

    python -m pytest tests/test_lora.py -q
"""
import json
import re
import subprocess
import sys
import time
import warnings

import pytest
import torch
from conftest import ROOT

import lora
from load import load_base
from quant import NF4Linear
from tinyreason import ARCHITECTURES, Config, Decoder


def load(checkpoint, quantize="none"):
    return load_base(checkpoint, dtype=torch.float32, device="cpu", quantize=quantize)


def tokens(model, seed=0):
    return torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    """Under autocast in the base dtype, as training runs: fp32 A and B on a 16-bit base."""
    dtype = model.lm_head.weight.dtype
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        return model.lm_head(model(ids))


def with_trained_adapter(model, r=4, alpha=8, seed=0, **kw):
    """An injected adapter whose B is no longer zero, as after some training."""
    lora.inject(model, r=r, alpha=alpha, **kw)
    torch.manual_seed(seed)
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    return model


def count(report):
    trainable, total = re.match(r"trainable params: ([\d,]+) / ([\d,]+) ", report).groups()
    return int(trainable.replace(",", "")), int(total.replace(",", ""))


def closed_formula(c: Config, r):
    """r * (d_in + d_out) summed over the seven projections of every block."""
    h, i = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_block = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
    return r * per_block * c.num_hidden_layers


def test_fresh_adapter_leaves_logits_unchanged(tiny_checkpoint):
    model = load(tiny_checkpoint)
    ids = tokens(model)
    before = logits(model, ids)
    assert torch.equal(logits(lora.inject(model, r=4, alpha=8), ids), before)


def test_inject_wraps_every_target_and_freezes_everything_else(tiny_checkpoint):
    model = lora.inject(load(tiny_checkpoint), r=4, alpha=8)
    assert len(lora.lora_modules(model)) == 7 * model.config.num_hidden_layers
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.lora_[AB]\.weight$", name) for name in trainable)
    assert len(trainable) == 2 * 7 * model.config.num_hidden_layers


def test_lora_weights_train_in_fp32_and_autocast_keeps_the_base_dtype(tiny_checkpoint):
    model = Decoder.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16, device="cpu")
    layer = lora.inject(model, r=4, alpha=8).model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 3, layer.base.in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_an_adapter_loaded_for_inference_takes_the_model_dtype(tiny_checkpoint, tmp_path):
    lora.save_adapter(with_trained_adapter(load(tiny_checkpoint)), tmp_path / "adapter")
    model = lora.load_adapter(Decoder.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16), tmp_path / "adapter",
                              torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.bfloat16
    assert layer(torch.randn(2, 3, layer.base.in_features, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_trainable_count_is_r_times_din_plus_dout_over_wrapped_layers(tiny_checkpoint, quantize):
    base_total = count(lora.trainable_report(load(tiny_checkpoint)))[1]
    model = lora.inject(load(tiny_checkpoint, quantize), r=4, alpha=8)
    trainable, total = count(lora.trainable_report(model))
    expected = sum(4 * (m.base.in_features + m.base.out_features) for m in lora.lora_modules(model).values())
    assert trainable == expected == closed_formula(model.config, r=4)
    assert total == base_total + trainable  # NF4 weights count as their logical (out, in), not packed bytes


def test_qwen25_1p5b_at_r16_trains_18_5m_parameters_not_1_3m():
    # Qwen2.5-1.5B's shapes, built on the meta device: no memory, no download.
    config = Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, head_dim=128, rotary_dim=128, tie_word_embeddings=True,
                    **ARCHITECTURES["qwen2"])
    with torch.device("meta"):
        model = lora.inject(Decoder(config), r=16, alpha=32)
    report = lora.trainable_report(model)
    trainable, total = count(report)
    assert trainable == closed_formula(config, r=16) == 18_464_768
    assert f"({100 * trainable / total:.2f}%)" in report == "trainable params: 18,464,768 / 1,562,179,072 (1.18%)"


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_one_optimizer_step_changes_only_a_and_b(tiny_checkpoint, quantize):
    model = with_trained_adapter(load(tiny_checkpoint, quantize)).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    scales = {n: m.weight.quant_state.absmax.clone() for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tokens(model)
    torch.nn.functional.cross_entropy(model.lm_head(model(ids)).flatten(0, 1), ids.flatten()).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n  # bit-identical, packed NF4 bytes included
        else:
            assert not torch.equal(p, lora_before[n]), n
    for n, m in model.named_modules():
        if n in scales:
            assert torch.equal(m.weight.quant_state.absmax, scales[n]), n


def test_gradient_checkpointing_gives_adapters_the_same_grads(tiny_checkpoint):
    grads = []
    for checkpointing in (False, True):
        model = with_trained_adapter(load(tiny_checkpoint)).train()
        model.gradient_checkpointing = checkpointing  # frozen base + checkpointing: peft #1142
        ids = tokens(model)
        torch.nn.functional.cross_entropy(model.lm_head(model(ids)).flatten(0, 1), ids.flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert all(g is not None for g in grads[1].values())
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_merged_logits_equal_adapter_logits(tiny_checkpoint):
    model = with_trained_adapter(load(tiny_checkpoint))
    ids = tokens(model)
    with_adapter = logits(model, ids)
    merged = lora.merge(model)
    assert not lora.lora_modules(merged) and type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert not torch.equal(with_adapter, logits(load(tiny_checkpoint), ids))  # the adapter does change the output
    torch.testing.assert_close(logits(merged, ids), with_adapter, atol=1e-5, rtol=1e-5)


def test_merge_dequantizes_an_nf4_base_to_16_bit(tiny_checkpoint):
    model = with_trained_adapter(load_base(tiny_checkpoint, dtype=torch.bfloat16, device="cpu",
                                                 quantize="nf4"))
    ids = tokens(model)
    with_adapter = logits(model, ids).float()
    merged = lora.merge(model)
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(logits(merged, ids).float(), with_adapter, atol=0.1, rtol=0.05)  # bf16 rounding


def test_save_load_round_trip_is_exact(tiny_checkpoint, tmp_path):
    model = with_trained_adapter(load(tiny_checkpoint))
    lora.save_adapter(model, tmp_path, str(tiny_checkpoint))
    loaded = lora.load_adapter(load(tiny_checkpoint), tmp_path)
    saved, back = lora.lora_state_dict(model), lora.lora_state_dict(loaded)
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    ids = tokens(model)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_adapter_is_saved_with_peft_names_and_config(tiny_checkpoint, tmp_path):
    lora.save_adapter(lora.inject(load(tiny_checkpoint), targets=("q_proj", "v_proj"), r=4, alpha=8), tmp_path, "base")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
    from peft import LoraConfig
    config = LoraConfig.from_pretrained(tmp_path)
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (4, 8, {"q_proj", "v_proj"})
    assert config.peft_type == "LORA" and config.task_type == "CAUSAL_LM" and config.base_model_name_or_path == "base"


def hf_model(checkpoint):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


EVERY_ARCHITECTURE = ["tiny_checkpoint", "tiny_llama_checkpoint", "tiny_phi_checkpoint"]


@pytest.mark.parametrize("fixture", EVERY_ARCHITECTURE)
def test_peft_loads_our_adapter_and_gives_our_logits(request, fixture, tmp_path):
    from peft import PeftModel
    tiny_checkpoint = request.getfixturevalue(fixture)
    model = with_trained_adapter(load(tiny_checkpoint))
    lora.save_adapter(model, tmp_path, str(tiny_checkpoint))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(hf_model(tiny_checkpoint), tmp_path).eval()
    assert not [str(w.message) for w in caught if "peft" in w.filename]  # our config is complete for PEFT
    ids = tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fixture", EVERY_ARCHITECTURE)
def test_adapter_made_by_peft_loads_into_ours_with_peft_logits(request, fixture, tmp_path):
    from peft import LoraConfig, get_peft_model
    tiny_checkpoint = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", load(tiny_checkpoint).config.projections[-1]]  # down_proj, or Phi's fc2
    config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM",
                        init_lora_weights=False)  # random B, so the adapter changes the output
    peft_model = get_peft_model(hf_model(tiny_checkpoint), config).eval()
    peft_model.save_pretrained(tmp_path)
    model = lora.load_adapter(load(tiny_checkpoint), tmp_path)
    assert len(lora.lora_modules(model)) == 3 * model.config.num_hidden_layers
    ids = tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), peft_model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fixture", [*EVERY_ARCHITECTURE, "tiny_tied_checkpoint"])
def test_merged_export_loads_in_transformers_with_adapter_logits(request, fixture, tmp_path):
    checkpoint = request.getfixturevalue(fixture)
    model = with_trained_adapter(load(checkpoint))
    lora.save_adapter(model, tmp_path / "adapter", str(checkpoint))
    lora.export_merged(checkpoint, tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        f.name for f in (tmp_path / "merged").iterdir()}
    ids = tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tmp_path / "merged")(ids).logits, logits(model, ids), atol=1e-4, rtol=1e-4)


def test_merge_command_writes_a_checkpoint_folder(tiny_checkpoint, tmp_path):
    lora.save_adapter(with_trained_adapter(load(tiny_checkpoint)), tmp_path / "adapter", str(tiny_checkpoint))
    subprocess.run([sys.executable, str(ROOT / "lora.py"), "merge", "--model", str(tiny_checkpoint),
                    "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")], check=True, cwd=ROOT)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert load(tmp_path / "merged").config == load(tiny_checkpoint).config


def saved_adapter(checkpoint, folder, **config_changes):
    lora.save_adapter(with_trained_adapter(load(checkpoint)), folder, str(checkpoint))
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return folder


def test_missing_adapter_config_is_a_clear_error(tiny_checkpoint, tmp_path):
    (saved_adapter(tiny_checkpoint, tmp_path) / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path))}: no adapter_config.json"):
        lora.load_adapter(load(tiny_checkpoint), tmp_path)


def test_rank_in_config_that_does_not_fit_the_tensors_names_the_tensor(tiny_checkpoint, tmp_path):
    saved_adapter(tiny_checkpoint, tmp_path, r=8)
    with pytest.raises(ValueError, match=r"tensor base_model\.model\.model\.layers\.0\.\S+\.lora_A\.weight "
                                         r"is \(4, (\d+)\) in the adapter but \(8, \1\) in the model"):
        lora.load_adapter(load(tiny_checkpoint), tmp_path)


def test_target_module_not_in_the_model_is_a_clear_error(tiny_checkpoint, tmp_path):
    saved_adapter(tiny_checkpoint, tmp_path, target_modules=["q_proj", "c_attn"])
    with pytest.raises(ValueError, match=r"target modules \['c_attn'\] not found"):
        lora.load_adapter(load(tiny_checkpoint), tmp_path)


def test_tensor_of_a_module_the_config_does_not_target_names_the_tensor(tiny_checkpoint, tmp_path):
    saved_adapter(tiny_checkpoint, tmp_path, target_modules=["q_proj", "k_proj"])
    with pytest.raises(ValueError, match=r"tensor base_model\.model\.model\.layers\.0\.mlp\.down_proj\.lora_A\.weight "
                                         r"is \(4, 128\) in the adapter but absent in the model"):
        lora.load_adapter(load(tiny_checkpoint), tmp_path)


def test_adapter_for_a_model_of_another_size_names_the_tensor(tiny_checkpoint, tokenizer_dir, tmp_path):
    from conftest import make_checkpoint
    wider = make_checkpoint(tmp_path / "wider", tokenizer_dir, tie=False, hidden_size=128)
    saved_adapter(wider, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"tensor \S+\.lora_[AB]\.weight is \(\d+, \d+\) in the adapter "
                                         r"but \(\d+, \d+\) in the model"):
        lora.load_adapter(load(tiny_checkpoint), tmp_path / "adapter")


def test_dora_adapter_is_refused_not_silently_misread(tiny_checkpoint, tmp_path):
    saved_adapter(tiny_checkpoint, tmp_path, use_dora=True)
    with pytest.raises(ValueError, match="unsupported options \\['use_dora'\\]"):
        lora.load_adapter(load(tiny_checkpoint), tmp_path)


def test_merge_never_writes_over_its_inputs_or_a_folder_it_did_not_make(tiny_checkpoint, tmp_path):
    lora.save_adapter(with_trained_adapter(load(tiny_checkpoint)), tmp_path / "adapter", str(tiny_checkpoint))
    before = (tiny_checkpoint / "model.safetensors").read_bytes()
    for out, message in [(tiny_checkpoint, "is, holds or lies inside --model"),
                         (tmp_path / "adapter", "is, holds or lies inside --adapter")]:
        run = subprocess.run([sys.executable, str(ROOT / "lora.py"), "merge", "--model", str(tiny_checkpoint),
                              "--adapter", str(tmp_path / "adapter"), "--out", str(out)], capture_output=True, text=True)
        assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr
    assert (tiny_checkpoint / "model.safetensors").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an earlier merge"):
        lora.export_merged(tiny_checkpoint, tmp_path / "adapter", tmp_path / "other")
    lora.export_merged(tiny_checkpoint, tmp_path / "adapter", tmp_path / "merged")
    lora.export_merged(tiny_checkpoint, tmp_path / "adapter", tmp_path / "merged")  # an earlier merge is replaced


@pytest.mark.parametrize("changes, message", [
    (dict(r=0), "r is 0, expected a positive integer"),
    (dict(r=4.0), "r is 4.0, expected a positive integer"),
    (dict(r="4"), "r is '4', expected a positive integer"),
    (dict(r=None), "missing r"),
    (dict(lora_alpha=float("inf")), "lora_alpha is inf, expected a finite number"),
    (dict(lora_alpha=float("nan")), "lora_alpha is nan, expected a finite number"),
    (dict(lora_alpha="16"), "lora_alpha is '16', expected a finite number"),
    (dict(lora_dropout=1.5), "lora_dropout is 1.5, expected a number in [0, 1]"),
    (dict(target_modules=["q_proj", 1]), "not a plain LoRA adapter"),
])
def test_an_adapter_config_field_of_a_wrong_type_or_range_is_refused_by_name(tiny_checkpoint, tmp_path, changes,
                                                                             message):
    saved_adapter(tiny_checkpoint, tmp_path, **changes)
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'adapter_config.json'))}: {re.escape(message)}"):
        lora.load_adapter(load(tiny_checkpoint), tmp_path)


def test_an_adapter_config_that_is_not_a_json_object_is_refused_by_name(tmp_path):
    (tmp_path / "adapter_config.json").write_text('["LORA"]')
    with pytest.raises(ValueError, match="adapter_config.json: not a JSON object"):
        lora.read_adapter_config(tmp_path)


def test_a_huge_rank_fails_from_the_adapter_header_before_anything_is_allocated(tiny_checkpoint, tmp_path):
    saved_adapter(tiny_checkpoint, tmp_path, r=10 ** 9)  # its A and B alone would be 256 GB a layer
    model = load(tiny_checkpoint)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"is \(4, (\d+)\) in the adapter but \(1000000000, \1\) in the model"):
        lora.load_adapter(model, tmp_path)
    assert time.perf_counter() - start < 1 and not lora.lora_modules(model)  # nothing injected


def test_an_adapter_file_the_format_forbids_is_refused_before_injecting(tiny_checkpoint, tmp_path):
    saved_adapter(tiny_checkpoint, tmp_path)
    with open(tmp_path / "adapter_model.safetensors", "ab") as f:
        f.write(b"trailing")
    model = load(tiny_checkpoint)
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a safetensors file: .* trailing bytes"):
        lora.load_adapter(model, tmp_path)
    assert not lora.lora_modules(model)


def test_an_adapter_with_non_finite_values_is_refused_for_eval_merge_and_training(tiny_checkpoint, tmp_path):
    model = with_trained_adapter(load(tiny_checkpoint))
    torch.nn.init.constant_(next(iter(lora.lora_modules(model).values())).lora_B.weight, float("inf"))
    lora.save_adapter(model, tmp_path, str(tiny_checkpoint))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: tensor \S+lora_B\.weight holds non-finite values"):
        lora.load_adapter(load(tiny_checkpoint), tmp_path)
