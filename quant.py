"""NF4 (4-bit NormalFloat) storage for the frozen base weights, as in QLoRA (Dettmers et al., 2023).

Each of the 7 projections of every block becomes a `bitsandbytes` `Linear4bit`: the weight is split into
blocks of 64 values, each block stores one absmax scale and 64 4-bit indices into the 16 NF4 levels
(quantiles of a normal distribution, which is how trained weights are spread). Double quantization then
stores the absmax scales themselves in 8 bits. Matmuls dequantize on the fly to the compute dtype.

    W (out, in) bf16  ->  packed uint8 (out*in/2, 1)  +  absmax (out*in/64,) uint8  +  small fp32 tables

Embeddings, norms and lm_head stay 16-bit. `tinyreason.Qwen2.from_pretrained(..., quantize="nf4")` calls
`to_nf4` on each projection as it is loaded, so the whole model never sits in memory in 16 bit.
bitsandbytes is imported inside the functions, so code that never quantizes does not need it.
"""
import torch
from torch import nn


def to_nf4(linear: nn.Linear, compute_dtype: torch.dtype, blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """A frozen NF4 `Linear4bit` holding `linear`'s weight and bias, quantized on `linear`'s device."""
    import bitsandbytes as bnb
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                          device="meta")
    # Params4bit quantizes when moved to a real device (CPU or CUDA); the 16-bit weight can be freed after.
    q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=blocksize,
                                 compress_statistics=double_quant, quant_type="nf4", module=q).to(linear.weight.device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    # On CPUs with AVX512-BF16, bnb repacks the weight in place on the first eval-mode forward (absmax rounded to
    # bf16). Keeping the standard layout makes train and eval numerics agree and lets `dequantize` read it.
    q.support_avx512bf16_for_cpu = False
    return q


def is_nf4(module: nn.Module) -> bool:
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def dequantize(module: nn.Module) -> torch.Tensor:
    """The (out, in) float weight of an NF4 linear (in the dtype it was quantized from) or of a plain one."""
    if not is_nf4(module):
        return module.weight.data
    import bitsandbytes as bnb
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)


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
