"""cpu.for_inference: NF4 dequantized once and weights packed for oneDNN give what the model gave before.

    python -m pytest tests/test_cpu.py -q
"""
import pytest
import torch
from conftest import gsm8k_records

import cpu
import lora
from generate import generate
from load import load_base, load_model
from quant import NF4Linear
from tokenizer import Tokenizer

pytest.importorskip("bitsandbytes")


def ids_of(model):
    return torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


def trained_nf4(tiny_checkpoint):
    """An NF4 model in training whose adapter is not zero, so a merge has something to add."""
    torch.manual_seed(0)
    model = lora.inject(load_base(tiny_checkpoint, torch.float32, "cpu", "nf4"))
    for m in lora.lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    return model


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_an_nf4_model_for_inference_computes_what_it_computed_before(tiny_checkpoint, dtype, tol):
    model = load_base(tiny_checkpoint, dtype, "cpu", quantize="nf4")
    ids = ids_of(model)
    with torch.no_grad():
        before = model.lm_head(model(ids))
        cpu.for_inference(model)
        after = model.lm_head(model(ids))
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    torch.testing.assert_close(after, before, atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_every_projection_and_the_tied_lm_head_are_packed_but_not_the_embedding(tiny_tied_checkpoint):
    model, _ = load_model(tiny_tied_checkpoint, None, "none", torch.bfloat16, "cpu")
    packed = [name for name, m in model.named_modules() if isinstance(m, cpu.PackedLinear)]
    assert len(packed) == 7 * model.config.num_hidden_layers + 1 and "lm_head" in packed
    assert not model.model.embed_tokens.weight.is_mkldnn


def test_greedy_generation_with_an_adapter_is_unchanged_by_for_inference(tiny_checkpoint, tokenizer_dir, tmp_path):
    """The adapter's base layers are packed inside their LoRALinear; its A and B stay plain."""
    trained = trained_nf4(tiny_checkpoint)
    lora.save_adapter(trained, tmp_path / "adapter")
    fast, tok = load_model(tiny_checkpoint, tmp_path / "adapter", "nf4", torch.float32, "cpu")
    prompts = [tok.apply_chat([{"role": "user", "content": r["question"]}]) for r in gsm8k_records(3)]
    assert generate(fast, tok, prompts, 16)[0] == generate(trained.eval(), tok, prompts, 16)[0]


def test_sampling_weights_give_the_trained_model_s_logits(tiny_checkpoint):
    model = trained_nf4(tiny_checkpoint)
    ids = ids_of(model)
    with torch.no_grad():
        before = model.lm_head(model(ids))
        with cpu.sampling_weights(model):
            assert not any(isinstance(m, (lora.LoRALinear, NF4Linear)) for m in model.modules())
            inside = model.lm_head(model(ids))
    torch.testing.assert_close(inside, before, atol=1e-5, rtol=1e-5)


def test_sampling_weights_give_back_the_trained_modules_and_their_gradients(tiny_checkpoint):
    model = trained_nf4(tiny_checkpoint)
    modules = dict(model.named_modules())
    with torch.no_grad(), cpu.sampling_weights(model):
        model(ids_of(model))
    assert dict(model.named_modules()) == modules
    model(ids_of(model)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_greedy_rollouts_are_the_same_with_sampling_weights(tiny_checkpoint, tokenizer_dir):
    model = trained_nf4(tiny_checkpoint).eval()
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    prompts = [tok.apply_chat([{"role": "user", "content": r["question"]}]) for r in gsm8k_records(3)]
    plain = generate(model, tok, prompts, 16)[0]
    with cpu.sampling_weights(model):
        assert generate(model, tok, prompts, 16)[0] == plain
