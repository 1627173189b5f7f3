"""NF4 (4-bit NormalFloat) storage for the frozen base weights, as in QLoRA (Dettmers et al., 2023).

Each of the 7 projections of every block becomes an `NF4Linear`: with bitsandbytes' kernels, the weight is split into
blocks of 64 values, each block stores one absmax scale and 64 4-bit indices into the 16 NF4 levels
(quantiles of a normal distribution, which is how trained weights are spread). Double quantization then
stores the absmax scales themselves in 8 bits. Each matmul dequantizes the weight back to 16 bit, in forward
and again in backward (`tinyreason.FrozenMatmul`), so only one layer's 16-bit weight exists at a time. On a GPU,
where no gradient is needed (generation), bitsandbytes' own 4-bit matmul runs instead: fused kernels for few rows.

    W (out, in) bf16  ->  packed uint8 (out*in/2, 1)  +  absmax (out*in/64,) uint8  +  small fp32 tables

Embeddings, norms and lm_head stay 16-bit. `load.load_base(..., quantize="nf4")` runs
`quantize_block` on each block as soon as it is loaded, so the whole model never sits in memory in 16 bit.
bitsandbytes is imported inside the functions, so code that never quantizes does not need it.
"""
import torch
from torch import nn

from tinyreason import PROJECTIONS, Linear


class NF4Linear(Linear):
    """A frozen linear whose weight is stored in NF4 and dequantized for each matmul (tinyreason.FrozenMatmul)."""

    def dense_weight(self):
        import bitsandbytes as bnb
        return bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state)  # (out, in)

    def forward(self, x):
        # Where no gradient is needed, a GPU runs bitsandbytes' fused 4-bit kernels (a gemv for one decoding row).
        # Not the CPU: there bnb.matmul_4bit took 4.0 / 5.9 ms for 1 / 16 rows of a 4864x896 weight, ours 0.7 / 1.4.
        if x.is_cuda and not (torch.is_grad_enabled() and x.requires_grad):
            import bitsandbytes as bnb
            return bnb.matmul_4bit(x, self.weight.t(), self.weight.quant_state, bias=self.bias)
        return super().forward(x)


def to_nf4(linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
    """A frozen NF4Linear holding `linear`'s weight and bias, quantized on `linear`'s device; dequantizing gives
    back `linear`'s dtype."""
    import bitsandbytes as bnb
    q = NF4Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    # Params4bit quantizes when moved to a real device (CPU or CUDA); the 16-bit weight can be freed after.
    q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=blocksize,
                                 compress_statistics=double_quant, quant_type="nf4").to(linear.weight.device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q


def quantize_block(block: nn.Module):
    """Each of the block's seven projections, in place, as an NF4Linear (the lm_head is no projection: it stays)."""
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if name in PROJECTIONS:
                setattr(parent, name, to_nf4(child))


def dequantize_for_inference(model: nn.Module):
    """Every NF4 linear, in place, as a frozen 16-bit Linear holding its dequantized weight: the very numbers each
    NF4 matmul computes, dequantized once instead of at every decoding step. For inference where memory holds the
    16-bit weights, as a CPU's RAM does (batch-1 chat on the 0.5B: README); a GPU keeps NF4 and bitsandbytes'
    fused kernels."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if is_nf4(child):
                dense = Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                dense.weight = nn.Parameter(dequantize(child), requires_grad=False)
                dense.bias = child.bias
                setattr(parent, name, dense)
    return model


def is_nf4(module: nn.Module) -> bool:
    return isinstance(module, NF4Linear)


def dequantize(module: nn.Module) -> torch.Tensor:
    """The (out, in) float weight of an NF4 linear (in the dtype it was quantized from) or of a plain one."""
    return module.dense_weight() if is_nf4(module) else module.weight.data


def _quant_state_bytes(module: nn.Module) -> int:
    # absmax (uint8 with double quant) + the NF4 code table + the second-level absmax/code, all small tensors.
    state = module.weight.quant_state.as_dict(packed=True)
    return sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))


def footprint_gb(model: nn.Module) -> float:
    """Bytes held by parameters and buffers, in GB (1e9): NF4 weights count their packed bytes plus their
    quantization statistics; tied weights count once."""
    tensors = list(model.parameters()) + list(model.buffers())
    n = sum(t.numel() * t.element_size() for t in tensors)
    n += sum(_quant_state_bytes(m) for m in model.modules() if is_nf4(m))
    return n / 1e9
