"""NF4 (4-bit NormalFloat) storage for the frozen base weights, as in QLoRA (Dettmers et al., 2023), through
bitsandbytes: each weight is split into blocks of 64 values, each block stores an absmax scale and 64 4-bit indices
into the 16 NF4 levels (the quantiles of a normal distribution, as trained weights are spread); double quantization
stores the scales in 8 bits. A matmul dequantizes the weight to 16 bit, in forward and again in backward, so one
layer's 16-bit weight exists at a time: QLoRA's memory saving. Embeddings, norms and lm_head stay 16-bit.
"""
import torch
import torch.nn.functional as F
from torch import nn



class FrozenNF4Matmul(torch.autograd.Function):
    """y = x W^T + b for an NF4 layer's frozen W: backward computes the input's gradient only, and dequantizes W
    again rather than keeping the 16-bit copy that autograd would otherwise save for it."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dense_weight(), layer.bias)

    @staticmethod
    def backward(ctx, grad):  # grad: (..., out) -> (..., in)
        return grad @ ctx.layer.dense_weight().to(grad.dtype), None


class NF4Linear(nn.Linear):
    """A frozen linear whose weight is stored in NF4 and dequantized for each matmul."""

    def dense_weight(self):
        import bitsandbytes as bnb
        return bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state)  # (out, in)

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return FrozenNF4Matmul.apply(x, self)
        if x.is_cuda:  # no gradient on a GPU: bitsandbytes' fused 4-bit kernels (a gemv for one decoding row)
            import bitsandbytes as bnb
            return bnb.matmul_4bit(x, self.weight.t(), self.weight.quant_state, bias=self.bias)
        return F.linear(x, self.dense_weight(), self.bias)


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


def replace_linears(model: nn.Module, replace):
    """In place, each child module for which replace(name, child) returns a module, by that module."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (new := replace(name, child)) is not None:
                setattr(parent, name, new)
    return model


def quantize_block(block: nn.Module):
    """Each of the block's projections (its linear layers), in place, as an NF4Linear."""
    return replace_linears(block, lambda name, child: to_nf4(child) if type(child) is nn.Linear else None)


def dequantize(module: nn.Module) -> torch.Tensor:
    """The (out, in) float weight of an NF4 linear (in the dtype it was quantized from) or of a plain one."""
    return module.dense_weight() if isinstance(module, NF4Linear) else module.weight.data


def footprint_gb(model: nn.Module) -> float:
    """Bytes held by parameters and buffers, in GB (1e9): NF4 weights count their packed bytes plus their
    quantization statistics (absmax, code tables); tied weights count once."""
    n = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for m in model.modules():
        if isinstance(m, NF4Linear):
            n += sum(t.numel() * t.element_size() for t in m.weight.quant_state.as_dict(packed=True).values()
                     if torch.is_tensor(t))
    return n / 1e9
