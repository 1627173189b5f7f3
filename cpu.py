"""Inference on a CPU, faster and with the same numbers: `for_inference(model)`, which load.py calls for eval.py,
chat.py and distill.py when the device is a CPU. Two changes, both for frozen weights only (nothing trains after):

1. An NF4 weight is dequantized once, to the 16-bit weight each of its matmuls would rebuild at every decoding
   step. A CPU's RAM holds the 16-bit model; a GPU keeps NF4 and bitsandbytes' fused 4-bit kernels.
2. Each projection and the lm_head is stored in oneDNN's blocked layout (its prepacked GEMM reads it as it is),
   which runs the thin matmuls of decoding faster than the plain (out, in) weight. A tied lm_head gets its own
   packed copy; the embedding keeps the plain one.

load.py applies it to each block as soon as it is loaded, and to the whole model after its adapter: packing a
whole loaded model at once peaked 0.26 GB higher for the 0.5B (docs/results.md). The gains: docs/cpu.md.
"""
from contextlib import contextmanager

import torch
from torch import nn

from lora import LoRALinear, merged_linear
from quant import NF4Linear, replace_linears


class PackedLinear(nn.Linear):
    """y = x W^T + b through oneDNN, W prepacked. Inference only: no backward, no merge."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def dense(layer: NF4Linear) -> nn.Linear:
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight, plain.bias = nn.Parameter(layer.dense_weight(), requires_grad=False), layer.bias
    return plain


def for_inference(module: nn.Module) -> nn.Module:
    """The module with its NF4 weights dequantized and its frozen 16/32-bit weights packed, in place; a linear
    layer itself (the lm_head) comes back replaced."""
    def replace(name, child):
        layer = dense(child) if isinstance(child, NF4Linear) else child
        if (torch.backends.mkldnn.is_available() and not name.startswith(("lora_", "verify_"))  # not LoRA's own
                and type(layer) is nn.Linear and layer.weight.dtype in (torch.bfloat16, torch.float32)):
            return PackedLinear(layer)
        return layer if layer is not child else None
    return (replace("lm_head", module) or module) if isinstance(module, nn.Linear) else replace_linears(module, replace)


@contextmanager
def sampling_weights(model: nn.Module):
    """For the rollouts of a model in training: inside the block each projection and the lm_head is one dense,
    packed layer, W + (alpha/r) B A for a LoRA one, so sampling decodes at eval.py's speed instead of through the
    NF4 dequantization and LoRA's two extra matmuls per projection. The policy sampled is the trained one up to the
    16-bit rounding of the merged sum; the trained modules are back when the block ends, for the loss. Off a CPU
    it changes nothing: a GPU samples through bitsandbytes' 4-bit kernels."""
    if model.lm_head.weight.device.type != "cpu":
        yield model
        return
    swaps = [(parent, name, child) for parent in list(model.modules()) if not isinstance(parent, LoRALinear)
             for name, child in parent.named_children() if isinstance(child, (LoRALinear, nn.Linear))]
    for parent, name, child in swaps:
        dense_layer = merged_linear(child) if isinstance(child, LoRALinear) else child
        setattr(parent, name, for_inference(dense_layer))
    try:
        yield model
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)
