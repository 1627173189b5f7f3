"""The model: one hand-written decoder for Qwen2, Llama and Phi checkpoints, its per-token log-probabilities, and
loading by Hugging Face names.

Qwen2 in one breath: token embedding -> N x [RMSNorm -> grouped-query attention (q/k/v with bias, o without,
rotary positions) -> residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head (tied to the embedding in
some checkpoints). Llama is Qwen2 without the q/k/v biases (Llama-3.1's long-context rope scaling included). Phi
feeds one LayerNorm to attention and a GELU MLP side by side (x + attn(ln(x)) + mlp(ln(x))), rotates only part of
each head, and has biases everywhere. Config's switches are all that differ (docs/architectures.md). Module names
are each checkpoint's own, so loading is a plain name match. The tokenizer is in tokenizer.py, generation in
generate.py (its KV cache too), NF4 storage in quant.py, LoRA in lora.py.
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from weights import CONFIG_FIELDS, check_fields, check_size, check_tensors, checkpoint_tensors, inside, read_json

LOGPROB_CHUNK = 1024  # positions per lm_head call in token_logprobs: (1024, 151936) fp32 logits are 0.6 GB


@dataclass
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int  # the leading dims of each head that rotate: all of them, or Phi's partial_rotary_factor of them
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    llama3_rope: tuple = ()  # Llama-3.1's (factor, low_freq_factor, high_freq_factor, original context); (): none
    tie_word_embeddings: bool = False
    norm: Literal["rms", "layer"] = "rms"  # RMSNorm, or LayerNorm with a bias (Phi)
    mlp: Literal["swiglu", "gelu"] = "swiglu"  # down(silu(gate(x)) * up(x)), or Phi's fc2(gelu(fc1(x)))
    parallel_residual: bool = False  # Phi: x + attn(ln(x)) + mlp(ln(x)), one norm per block
    qkv_bias: bool = False  # Qwen2, Phi: q, k and v have biases
    bias: bool = False  # Phi: every other linear has one too, the lm_head included
    o_proj: str = "o_proj"  # the attention output's name: Phi's checkpoints call it dense
    final_norm: str = "norm"  # Phi: final_layernorm

    @property
    def projections(self) -> tuple[str, ...]:
        """The names of a block's linear layers: what NF4 quantizes and LoRA adapts by default."""
        return ("q_proj", "k_proj", "v_proj", self.o_proj,
                *(("fc1", "fc2") if self.mlp == "gelu" else ("gate_proj", "up_proj", "down_proj")))

    @classmethod
    def from_json(cls, path):
        """The config of a Hugging Face config.json: a setting this decoder does not implement is refused by name,
        and each field it reads must have its type and range (CONFIG_FIELDS)."""
        path = Path(path)
        raw = {k: v for k, v in read_json(inside(path.parent, path.name)).items() if v is not None}  # null: unset
        kind = raw.get("model_type")
        if type(kind) is not str or kind not in ARCHITECTURES:
            raise ValueError(f"{path}: model_type {kind!r} is not supported, TinyReason implements "
                             f"{', '.join(ARCHITECTURES)}")
        check_fields(path, raw, CONFIG_FIELDS)
        rope = {k: v for part in (raw, raw.get("rope_parameters", {}), raw.get("rope_scaling", {}))
                for k, v in part.items() if v is not None}  # transformers 5 nests them
        check_fields(path, rope, CONFIG_FIELDS)
        scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))  # "type" in older configs
        act = raw.get("hidden_act", "gelu_new" if kind == "phi" else "silu")
        refused = [text for text, bad in [
            (f"rope scaling {rope_type!r}", rope_type not in ("default", "llama3" if kind == "llama" else "default")),
            ("use_sliding_window: true", raw.get("use_sliding_window")),
            ("qk_layernorm: true", raw.get("qk_layernorm")),
            ("attention_bias: true", kind == "llama" and raw.get("attention_bias")),
            ("mlp_bias: true", raw.get("mlp_bias")),
            (f"hidden_act {act!r}", act != ("gelu_new" if kind == "phi" else "silu"))] if bad]
        if refused:
            raise ValueError(f"{path}: {'; '.join(refused)} is not supported by TinyReason's {kind}")
        llama3 = LLAMA3 if rope_type == "llama3" else ()
        if missing := [k for k in REQUIRED if k not in raw] + [k for k in llama3 if k not in rope]:
            raise ValueError(f"{path}: missing {', '.join(missing)}")
        heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
        kv, head_dim = raw.get("num_key_value_heads", heads), raw.get("head_dim", hidden // heads)
        rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 0.5 if kind == "phi" else 1.0))
        if heads % kv:
            raise ValueError(f"{path}: num_key_value_heads {kv} does not divide num_attention_heads {heads}")
        if rotary_dim % 2 or not rotary_dim:
            raise ValueError(f"{path}: {rotary_dim} dims of each head to rotate, expected a positive even number")
        return cls(**{k: raw[k] for k in (*REQUIRED, "tie_word_embeddings") if k in raw},
                   num_key_value_heads=kv, head_dim=head_dim, rotary_dim=rotary_dim,
                   norm_eps=raw.get("layer_norm_eps" if kind == "phi" else "rms_norm_eps", 1e-6),
                   rope_theta=rope.get("rope_theta", 10000.0),
                   llama3_rope=tuple(rope[k] for k in LLAMA3) if rope_type == "llama3" else (), **ARCHITECTURES[kind])


REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
LLAMA3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")  # its rope scaling
ARCHITECTURES = {  # model_type -> its switches of Config
    "qwen2": dict(qkv_bias=True),
    "llama": dict(),
    "phi": dict(norm="layer", mlp="gelu", parallel_residual=True, qkv_bias=True, bias=True, o_proj="dense",
                final_norm="final_layernorm"),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # In fp32 whatever the input dtype, as the reference does; the scale multiplies after the cast back.
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def norm(c: Config) -> nn.Module:
    return RMSNorm(c.hidden_size, c.norm_eps) if c.norm == "rms" else nn.LayerNorm(c.hidden_size, c.norm_eps)


def inv_freq(c: Config) -> torch.Tensor:
    """The rotary frequencies (rotary_dim / 2,). Llama-3.1's scaling divides those of wavelengths longer than
    original_context / low_freq_factor by `factor`, keeps those shorter than original_context / high_freq_factor,
    and blends the two in between."""
    freq = 1.0 / c.rope_theta ** (torch.arange(0, c.rotary_dim, 2).float() / c.rotary_dim)
    if not c.llama3_rope:
        return freq
    factor, low, high, context = c.llama3_rope
    smooth = ((context / (2 * math.pi / freq) - low) / (high - low)).clamp(0, 1)  # from context / wavelength
    return (1 - smooth) * freq / factor + smooth * freq


def rope(positions, freq, dtype):
    """cos, sin of shape (B, 1, T, rotary_dim) for integer positions (B, T); the halves repeat (rotate-half layout)."""
    freqs = positions[..., None].float() * freq.to(positions.device)  # (B, T, rotary_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    d = cos.shape[-1]  # Phi rotates the first d dims of each head; the rest pass through
    x1, x2 = x[..., :d // 2], x[..., d // 2:d]
    rotated = x[..., :d] * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rotated if d == x.shape[-1] else torch.cat((rotated, x[..., d:]), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.n_head, self.n_kv, self.hd, self.o_name = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.o_proj
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * self.hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=c.qkv_bias)
        setattr(self, c.o_proj, nn.Linear(self.n_head * self.hd, c.hidden_size, bias=c.bias))  # under its own name

    def forward(self, x, cos, sin, mask, cache, layer):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv, S, hd)
        if T == 1:  # decoding: the query heads that share a kv head become rows of one query, no kv copy
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv, -1, self.hd), k, v, attn_mask=mask).view_as(q)
        else:  # enable_gqa: each group of query heads reads its shared kv head without a copy
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return getattr(self, self.o_name)(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class GeluMLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.bias)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # gelu_new


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.input_layernorm = norm(c)
        self.self_attn = Attention(c)
        if not c.parallel_residual:
            self.post_attention_layernorm = norm(c)
        self.mlp = GeluMLP(c) if c.mlp == "gelu" else MLP(c)
        self.parallel_residual = c.parallel_residual

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        h = self.input_layernorm(x)
        if self.parallel_residual:
            return x + self.self_attn(h, cos, sin, mask, cache, layer) + self.mlp(h)
        x = x + self.self_attn(h, cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_mask(real, T, offset):
    """Boolean (B, 1, T, S) attention mask for T queries at slots offset.. of S: causal, real keys only. A padding
    query still sees itself, so no row is all masked (which would give NaN); its output is never used."""
    q_pos = torch.arange(offset, offset + T, device=real.device)[:, None]
    k_pos = torch.arange(real.shape[1], device=real.device)[None]
    return ((k_pos <= q_pos) & real[:, None, :] | (k_pos == q_pos))[:, None]


class Decoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict({
            "embed_tokens": nn.Embedding(config.vocab_size, config.hidden_size),
            "layers": nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            config.final_norm: norm(config)})
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, cache=None):
        """Final-normed hidden states (B, T, D); `self.lm_head` of them are the logits. `attention_mask` (B, T) marks
        the real tokens of padded rows; with `cache`, input_ids continue what it holds. Right-padded rows need no
        mask: causal attention never lets a real token see the padding after it."""
        B, T = input_ids.shape
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = (real.cumsum(-1) - 1).clamp(min=0)  # a row's real tokens count from 0 whatever its padding
        if cache is None:
            mask = None if attention_mask is None else causal_mask(real, T, 0)  # None: SDPA's fused causal kernels
        else:
            positions, mask = cache.write(input_ids, real, positions)  # the cache says what the new tokens see
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope(positions, inv_freq(self.config), x.dtype)
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, None, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        return self.model[self.config.final_norm](x)

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.bfloat16, device="cpu", on_block=None):
        """Load a Hugging Face checkpoint folder tensor by tensor, so peak memory stays near the final model size. As
        soon as all of a block's or an untied lm_head's tensors are in, `on_block(module)` gives the module to keep
        in its place (quant.py makes a block 4-bit there)."""
        folder = Path(folder)
        config = Config.from_json(folder / "config.json")
        tensors = checkpoint_tensors(folder)  # every header checked; no tensor read yet
        check_size(folder, config, tensors)  # before building, whose cost grows with the layers config.json asks for
        with torch.device("meta"):
            model = cls(config)
        expected = dict(model.named_parameters())  # a tied lm_head appears once, as the embedding
        check_tensors(folder, tensors, expected, tied={"lm_head.weight"} if config.tie_word_embeddings else set())
        # The lm_head, the largest tensor, first: a copy on_block makes of it exists while little else is loaded.
        order = sorted(expected, key=lambda n: not n.startswith("lm_head."))
        last = {unit(n): n for n in order if unit(n)}  # the last tensor of each block and of the lm_head
        for name in tqdm(order, desc="loading", leave=False):
            module_name, leaf = name.rsplit(".", 1)
            module, t = model.get_submodule(module_name), tensors[name].read()
            setattr(module, leaf, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
            if on_block and name == last.get(unit(name)):
                model.set_submodule(unit(name), on_block(model.get_submodule(unit(name))))
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()


def unit(name: str) -> str | None:
    """The module on_block gets a tensor's name in: model.layers.N, lm_head, or none."""
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else "lm_head" if parts[0] == "lm_head" else None


class TokenLogProb(torch.autograd.Function):
    """log softmax(z)[y] per row of fp32 logits z (N, V), its gradient (onehot(y) - softmax(z)) * g written over z
    itself: one (N, V) block where log_softmax + gather keep two and backward makes more. Named speed trick: with
    the plain form RL's update ran at 0.85x the speed, and the training peak was higher (docs/results.md)."""

    @staticmethod
    def forward(ctx, z, y):
        lse = torch.logsumexp(z, dim=-1)  # (N,)
        ctx.save_for_backward(z, y, lse)
        return z.gather(1, y[:, None]).squeeze(1) - lse

    @staticmethod
    def backward(ctx, g):  # g: (N,)
        z, y, lse = ctx.saved_tensors  # z is ours alone: lm_head's output, which nothing else keeps
        p = z.sub_(lse[:, None]).exp_()  # softmax(z), in place
        p[torch.arange(len(y), device=y.device), y] -= 1
        return p.mul_(-g[:, None]), None


def token_logprobs(model, hidden, targets, temperature=1.0):
    """log softmax(lm_head(h) / T)[y] for hidden states (N, D) and their next tokens (N,): the one lm_head path of
    the SFT loss (T = 1) and of RL. lm_head runs only on the rows asked for, LOGPROB_CHUNK rows at a time; when
    training on several chunks, a chunk's logits are recomputed in backward rather than kept."""
    def chunk(h, y):
        z = model.lm_head(h).float()  # (chunk, vocab)
        return TokenLogProb.apply(z if temperature == 1 else z / temperature, y)
    pieces = zip(hidden.split(LOGPROB_CHUNK), targets.split(LOGPROB_CHUNK))
    if torch.is_grad_enabled() and hidden.requires_grad and len(hidden) > LOGPROB_CHUNK:
        return torch.cat([checkpoint(chunk, h, y, use_reentrant=False) for h, y in pieces])
    return torch.cat([chunk(h, y) for h, y in pieces])
