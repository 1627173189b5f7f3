"""The model: a hand-written Qwen2 decoder, its per-token log-probabilities, and loading by Hugging Face names.

Qwen2 in one breath: token embedding -> N x [RMSNorm -> grouped-query attention (q/k/v with bias, o without,
rotary positions with theta from the config) -> residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm ->
lm_head (tied to the embedding in some checkpoints, separate in others). Module names are the Hugging Face
checkpoint names, so loading is a plain name match. The tokenizer is in tokenizer.py, generation in generate.py,
NF4 storage in quant.py, LoRA in lora.py.
"""
import json
from dataclasses import MISSING, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOGPROB_CHUNK = 1024  # positions per lm_head call in token_logprobs: (1024, 151936) fp32 logits are 0.6 GB


@dataclass
class QwenConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path):
        raw = json.loads(Path(path).read_text())
        if raw.get("model_type") != "qwen2":
            raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not supported, TinyReason implements qwen2")
        if "rope_theta" not in raw and "rope_parameters" in raw:  # transformers >= 5 nests it
            raw["rope_theta"] = raw["rope_parameters"]["rope_theta"]
        if missing := [f.name for f in fields(cls) if f.default is MISSING and f.name not in raw]:
            raise ValueError(f"{path}: missing {', '.join(missing)}")
        # Settings this decoder does not implement: refuse them rather than compute another model quietly.
        scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))  # "type" in older configs
        head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
        unsupported = [text for text, refused in [
            (f"rope scaling {rope_type!r}", rope_type != "default"),
            ("use_sliding_window: true", raw.get("use_sliding_window")),
            (f"head_dim {head_dim} != hidden_size / num_attention_heads",
             head_dim * raw["num_attention_heads"] != raw["hidden_size"])] if refused]
        if unsupported:
            raise ValueError(f"{path}: {'; '.join(unsupported)} is not supported by TinyReason's Qwen2")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # In fp32 whatever the input dtype, as the reference does; the scale multiplies after the cast back.
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


def rope(positions, head_dim, theta, dtype):
    """cos, sin of shape (B, 1, T, hd) for integer positions (B, T); the two halves repeat (rotate-half layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of every layer, preallocated for the whole generation: (L, B, n_kv, max_len, hd), and each
    slot's token id and real-token flag. Left-padded rows all write at the same index; `keep` moves the rows still
    generating to the front, in place."""

    def __init__(self, config, batch, max_len, dtype, device):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.ids = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # rotary position of each row's next token
        self.batch, self.len = batch, 0

    def update(self, layer, k, v):  # k, v: (B, n_kv, T, hd) -> everything cached so far
        end = self.len + k.shape[2]
        self.k[layer, :self.batch, :, self.len:end] = k
        self.v[layer, :self.batch, :, self.len:end] = v
        return self.k[layer, :self.batch, :, :end], self.v[layer, :self.batch, :, :end]

    def keep(self, rows):
        n = len(rows)
        for t in (self.k, self.v):  # only the slots written so far move
            t[:, :n, :, :self.len] = t[:, rows, :, :self.len]
        for t in (self.ids, self.mask, self.next_pos):
            t[:n] = t[rows]
        self.batch = n


class Attention(nn.Module):
    def __init__(self, c: QwenConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * self.hd, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.hd, c.hidden_size, bias=False)

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
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, c: QwenConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, c: QwenConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_mask(real, T, offset):
    """Boolean (B, 1, T, S) attention mask for T queries at slots offset.. of S: causal, real keys only. A padding
    query still sees itself, so no row is all masked (which would give NaN); its output is never used."""
    q_pos = torch.arange(offset, offset + T, device=real.device)[:, None]
    k_pos = torch.arange(real.shape[1], device=real.device)[None]
    return ((k_pos <= q_pos) & real[:, None, :] | (k_pos == q_pos))[:, None]


class Qwen2(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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
        mask = None if attention_mask is None else causal_mask(real, T, 0)  # None: SDPA's fused causal kernels
        if cache is not None:
            positions = positions + cache.next_pos[:B, None]
            cache.ids[:B, cache.len:cache.len + T], cache.mask[:B, cache.len:cache.len + T] = input_ids, real
            cache.next_pos[:B] += real.sum(-1)
            mask = causal_mask(cache.mask[:B, :cache.len + T], T, cache.len)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, None, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.len += T
        return self.model.norm(x)

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.bfloat16, device="cpu", on_block=None):
        """Load a Hugging Face Qwen2 checkpoint folder tensor by tensor, so peak memory stays near the final model
        size. As soon as a block or an untied lm_head is loaded, `on_block(module)` gives the module to keep in its
        place (quant.py makes a block 4-bit there)."""
        folder = Path(folder)
        config = QwenConfig.from_json(folder / "config.json")
        with torch.device("meta"):
            model = cls(config)
        expected = dict(model.named_parameters())  # a tied lm_head appears once, as the embedding
        tensors = checkpoint_tensors(folder)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected) - tied)
        if missing or unexpected:
            raise ValueError(f"{folder}: tensors do not match a Qwen2 model of its config.json: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        # The lm_head, the largest tensor, first: a copy on_block makes of it exists while little else is loaded.
        for name in tqdm(sorted(expected, key=lambda n: n != "lm_head.weight"), desc="loading", leave=False):
            module_name, leaf = name.rsplit(".", 1)
            module, t = model.get_submodule(module_name), tensors[name]()
            if t.shape != expected[name].shape:
                raise ValueError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, "
                                 f"config.json implies {tuple(expected[name].shape)}")
            setattr(module, leaf, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
            if on_block and name.endswith("mlp.down_proj.weight"):  # the block's last tensor
                i = int(name.split(".")[2])
                model.model.layers[i] = on_block(model.model.layers[i])
            elif on_block and name == "lm_head.weight":
                model.lm_head = on_block(model.lm_head)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.eval()


def checkpoint_tensors(folder: Path) -> dict:
    """name -> a function reading that tensor, for a single or sharded safetensors checkpoint. Safetensors is 8 bytes
    of header length, that much JSON, then raw tensor bytes: nothing in it runs, nothing is unpickled. Named trick:
    each tensor is read straight into its own memory, not memory-mapped as safetensors.safe_open does, whose pages
    count as resident beside the copies (a CPU load peak 0.7 GB lower for the 0.5B: docs/results.md)."""
    index = folder / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for name in names:
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no {name}" + (" (listed in model.safetensors.index.json)" * index.exists()))
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
        header.pop("__metadata__", None)
        tensors |= {key: partial(read_tensor, path, key, h, 8 + n) for key, h in header.items()}
    return tensors


def read_tensor(path: Path, key: str, h: dict, data_start: int) -> torch.Tensor:
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(h["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: tensor {key} is {h['dtype']}, expected BF16, F16 or F32")
    t = torch.empty(h["shape"], dtype=dtype)
    start, end = h["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + start)
        if t.numel() * t.element_size() != end - start or f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - start:
            raise ValueError(f"{path}: tensor {key} is cut short or does not match its shape {h['shape']}")
    return t


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
