"""NF4 storage of the frozen base: our NF4 linear computes what bitsandbytes' own 4-bit matmul computes.

    python -m pytest tests/test_quant.py -q
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from load import load_base
from quant import NF4Linear, dequantize, footprint_gb, to_nf4
from tinyreason import Decoder

bnb = pytest.importorskip("bitsandbytes")


def random_linear(d_in=128, d_out=96, bias=True, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_equals_bitsandbytes_matmul_4bit_forward_and_backward(dtype, device):
    q = to_nf4(random_linear(dtype=dtype, device=device))
    x = torch.randn(3, 5, 128, dtype=dtype, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = q(x), bnb.matmul_4bit(x_ref, q.weight.t(), q.weight.quant_state, bias=q.bias)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)


def test_nf4_linear_keeps_no_tensor_for_backward():
    """The dequantized weight is rebuilt in backward, not saved: QLoRA's memory saving."""
    q = to_nf4(random_linear())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(torch.randn(4, 128, requires_grad=True)).sum().backward()
    assert saved == []


def test_nf4_weight_is_packed_two_values_per_byte_with_8bit_scales():
    linear = random_linear()
    q = to_nf4(linear)
    assert q.weight.dtype == torch.uint8 and q.weight.numel() == linear.weight.numel() // 2
    state = q.weight.quant_state
    assert state.quant_type == "nf4" and state.blocksize == 64
    assert state.nested and state.absmax.dtype == torch.uint8  # double quantization of the block scales
    assert not q.weight.requires_grad and not q.bias.requires_grad


def test_dequantized_weight_is_within_half_an_nf4_step_of_the_original():
    linear = random_linear()
    q = to_nf4(linear, double_quant=False)  # exact fp32 block scales: the bound is tight
    w, w_hat = linear.weight.detach().reshape(-1, 64), dequantize(q).reshape(-1, 64)  # (blocks, 64)
    levels = bnb.functional.get_4bit_type("nf4", device="cpu")  # 16 values in [-1, 1]
    half_step = (levels[1:] - levels[:-1]).max() / 2
    absmax = w.abs().amax(dim=1, keepdim=True)
    assert ((w - w_hat).abs() <= half_step * absmax + 1e-6).all()
    assert not torch.equal(w, w_hat)  # it is a lossy format: the test could fail


def test_nf4_without_bias_stays_without_bias():
    q = to_nf4(random_linear(bias=False))
    assert q.bias is None
    x = torch.randn(2, 128)
    torch.testing.assert_close(q(x), F.linear(x, dequantize(q)), atol=1e-5, rtol=1e-5)


def test_dequantize_of_a_plain_linear_is_its_weight():
    linear = random_linear()
    assert torch.equal(dequantize(linear), linear.weight)


@pytest.mark.parametrize("fixture, n", [("tiny_checkpoint", 7), ("tiny_llama_checkpoint", 7), ("tiny_phi_checkpoint", 6)])
def test_loading_with_nf4_quantizes_exactly_the_projections_of_the_architecture(request, fixture, n):
    model = load_base(request.getfixturevalue(fixture), dtype=torch.bfloat16, device="cpu", quantize="nf4")
    quantized = {name for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert quantized == {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in model.config.projections}
    assert len(quantized) == n * model.config.num_hidden_layers
    for name, p in model.named_parameters():
        module, leaf = name.rsplit(".", 1)
        if module not in quantized or leaf == "bias":
            assert p.dtype == torch.bfloat16, name  # embedding, norms, lm_head and biases stay 16-bit


def test_nf4_model_equals_16bit_model_with_dequantized_weights(tiny_checkpoint):
    nf4 = load_base(tiny_checkpoint, dtype=torch.float32, device="cpu", quantize="nf4")
    ref = Decoder.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu")
    for name, m in nf4.named_modules():
        if isinstance(m, NF4Linear):
            ref.get_submodule(name).weight.data = dequantize(m)
    ids = torch.randint(0, nf4.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(nf4(ids), ref(ids), atol=1e-4, rtol=1e-4)


def test_footprint_counts_nf4_weights_at_half_a_byte_plus_scales(tiny_checkpoint):
    bf16 = Decoder.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16, device="cpu")
    nf4 = load_base(tiny_checkpoint, dtype=torch.bfloat16, device="cpu", quantize="nf4")
    n_quantized = sum(m.weight.quant_state.shape.numel() for m in nf4.modules() if isinstance(m, NF4Linear))
    n_blocks, n_layers = n_quantized // 64, 7 * nf4.config.num_hidden_layers
    saved = (footprint_gb(bf16) - footprint_gb(nf4)) * 1e9  # bytes
    # 2 bytes -> 0.5 byte per weight, minus the statistics: at least one byte per block (8-bit absmax),
    # at most an fp32 absmax per block plus fixed tables (NF4 code, second-level code and scales) per layer.
    assert 1.5 * n_quantized - 4 * n_blocks - 4096 * n_layers <= saved <= 1.5 * n_quantized - n_blocks


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 16])  # one row: bitsandbytes' fused gemv (decoding)
@pytest.mark.parametrize("needs_grad", [False, True])  # our own path where an input gradient is needed
def test_nf4_on_cuda_equals_bitsandbytes_linear4bit(rows, needs_grad):
    linear = random_linear(dtype=torch.bfloat16)
    ref = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
    ref.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, blocksize=64,
                                   compress_statistics=True, quant_type="nf4")
    ref.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    ref, q = ref.to("cuda"), to_nf4(linear.to("cuda"))  # both quantize on the GPU
    assert torch.equal(q.weight, ref.weight)
    x = torch.randn(rows, 128, dtype=torch.bfloat16, device="cuda", requires_grad=needs_grad)
    with torch.no_grad():
        expected = ref(x)
    torch.testing.assert_close(q(x), expected, atol=2e-2, rtol=2e-2)
