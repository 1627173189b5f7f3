"""TinyReason core: a hand-written Qwen2 decoder, its loader, tokenizer, chat format and generation.

Qwen2 in one breath: token embedding -> N x [RMSNorm -> grouped-query attention (q/k/v with bias, o without,
rotary positions with theta from the config) -> residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm ->
lm_head (tied to the embedding in some checkpoints, separate in others). Module names are the Hugging Face
checkpoint names, so loading is a plain name match.
"""
import json
import sys
import warnings
from dataclasses import MISSING, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100  # label of positions that carry no loss (prompt, padding)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def matmul_t(x, w, b=None):
    """x @ w.T + b. In fp32 on the CPU through oneDNN: on AVX2 CPUs its GEMM runs these thin shapes (decoding rows,
    a micro-batch's tokens against a wide lm_head) 1.2-2.5x faster than the default MKL one (README, bench.py)."""
    if (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available()):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


class FrozenMatmul(torch.autograd.Function):
    """y = x W^T + b for a frozen W = weight(): backward computes the input's gradient only, and calls weight()
    again rather than keeping W. For an NF4 weight, weight() dequantizes: the 16-bit W exists only for the length of
    one matmul, forward and backward; that is where QLoRA's memory saving comes from."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        return matmul_t(x, weight(), bias)

    @staticmethod
    def backward(ctx, grad):  # grad: (..., out) -> (..., in)
        return grad @ ctx.weight().to(grad.dtype), None, None


class Linear(nn.Linear):
    """nn.Linear whose frozen weight is rebuilt by `dense_weight` (quant.NF4Linear dequantizes there)."""

    def dense_weight(self):
        return self.weight

    def forward(self, x):
        if self.weight.requires_grad:
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and x.requires_grad:
            return FrozenMatmul.apply(x, self.dense_weight, self.bias)
        return matmul_t(x, self.dense_weight(), self.bias)


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
    """Keys and values of every layer, preallocated for the whole generation: (L, B, n_kv, max_len, hd).

    Prompts are left-padded, so all rows write at the same index; `mask` marks the slots that hold real tokens.
    Rows that finish are dropped by `keep`, which moves the live rows to the front in place."""

    def __init__(self, config, batch, max_len, dtype, device):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
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
        self.mask[:n] = self.mask[rows]
        self.next_pos[:n] = self.next_pos[rows]
        self.batch = n


class Attention(nn.Module):
    def __init__(self, c: QwenConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, self.n_head * self.hd, bias=True)
        self.k_proj = Linear(c.hidden_size, self.n_kv * self.hd, bias=True)
        self.v_proj = Linear(c.hidden_size, self.n_kv * self.hd, bias=True)
        self.o_proj = Linear(self.n_head * self.hd, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache, layer, real=None):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, ·), or (N, ·): the real tokens only
        if real is not None:
            q, k, v = unpad(q, real), unpad(k, real), unpad(v, real)
        B, T, _ = q.shape
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, n_kv, S, hd)
        if T == 1:  # decoding: the n_head / n_kv query heads sharing a kv head become rows of one query
            y = F.scaled_dot_product_attention(q.view(B, self.n_kv, -1, self.hd), k, v, attn_mask=mask).view_as(q)
        else:  # enable_gqa: each group of query heads reads its shared kv head without a copy
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)
        return self.o_proj(y if real is None else y[real])


def unpad(x, real):
    """(N, C) values of the real tokens -> (B, T, C), zero at the padding; `real` is the (B, T) boolean mask."""
    return x.new_zeros(*real.shape, x.shape[-1]).index_put((real,), x)


class MLP(nn.Module):
    def __init__(self, c: QwenConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, c: QwenConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, real=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, real)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, c: QwenConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


def causal_pad_mask(pad_mask, T, offset):
    """Boolean (B, 1, T, S) mask: causal, real keys only. A padding query still sees itself, so no row is all
    masked (which would give NaN); its output is never used."""
    S = pad_mask.shape[1]
    q_pos = torch.arange(offset, offset + T, device=pad_mask.device)[:, None]
    k_pos = torch.arange(S, device=pad_mask.device)[None]
    return ((k_pos <= q_pos) & pad_mask[:, None, :] | (k_pos == q_pos))[:, None]


class Qwen2(nn.Module):
    def __init__(self, config: QwenConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    def hidden(self, input_ids, attention_mask=None, cache=None):
        """Final-normed hidden states (B, T, D). With a cache, input_ids continue what it holds."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        mask, real = None, None
        if attention_mask is None and cache is None:
            positions = torch.arange(T, device=x.device).expand(B, T)
        else:
            new = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            # Left padding: a row's positions count its real tokens only, so every row starts at 0.
            positions = (new.cumsum(-1) - 1).clamp(min=0)
            if cache is None:
                mask = causal_pad_mask(new, T, 0)
                # A padded batch (training, validation): all but attention run on the real tokens only, (N, D).
                real, x = new, x[new]
            else:
                positions = positions + cache.next_pos[:B, None]
                cache.mask[:B, cache.len:cache.len + T] = new
                cache.next_pos[:B] += new.sum(-1)
                mask = causal_pad_mask(cache.mask[:B, :cache.len + T], T, cache.len)
        cos, sin = rope(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, None, i, real, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, real)
        if cache is not None:
            cache.len += T
        x = self.model.norm(x)
        return x if real is None else unpad(x, real)

    def forward(self, input_ids, attention_mask=None):
        return self.lm_head(self.hidden(input_ids, attention_mask))  # (B, T, vocab)

    @classmethod
    def from_pretrained(cls, path_or_repo, dtype=torch.bfloat16, device=None, quantize=None):
        """Load a Hugging Face Qwen2 checkpoint tensor by tensor, so peak memory stays near the final model size;
        with quantize="nf4" each block's projections become 4-bit as soon as the block is loaded."""
        if quantize not in (None, "none", "nf4"):
            raise ValueError(f"quantize={quantize!r}: expected 'nf4' or None")
        folder = resolve_checkpoint(path_or_repo)
        config = QwenConfig.from_json(folder / "config.json")
        device, _ = resolve_precision(device)
        with torch.device("meta"):
            model = cls(config)
        tensors = checkpoint_tensors(folder)
        expected = {name for name, _ in model.named_parameters()}  # a tied lm_head appears once, as the embedding
        unexpected = sorted(set(tensors) - expected - ({"lm_head.weight"} if config.tie_word_embeddings else set()))
        missing = sorted(expected - set(tensors))
        if unexpected or missing:
            raise ValueError(f"{folder}: tensors do not match a Qwen2 model of its config.json: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        from tqdm import tqdm
        for name in tqdm([n for n, _ in model.named_parameters()], desc="loading", leave=False):
            module_name, leaf = name.rsplit(".", 1)
            module = model.get_submodule(module_name)
            t = tensors[name]()
            if t.shape != getattr(module, leaf).shape:
                raise ValueError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, "
                                 f"config.json implies {tuple(getattr(module, leaf).shape)}")
            # copy=True: a tensor of the memory-mapped file would keep its pages resident after quantization
            setattr(module, leaf, nn.Parameter(t.to(device=device, dtype=dtype, copy=True), requires_grad=False))
            if quantize == "nf4" and name.endswith("mlp.down_proj.weight"):  # the block's last tensor
                quantize_block(model.get_submodule(module_name.rsplit(".", 2)[0]))
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        from quant import footprint_gb
        print(f"loaded {folder}: {footprint_gb(model):.2f} GB of weights ({quantize or 'no'} quantization, {dtype})",
              file=sys.stderr)  # stdout stays for the scripts' answers
        return model.eval()


def quantize_block(block):
    from quant import to_nf4
    for parent in (block.self_attn, block.mlp):
        for name, child in list(parent.named_children()):
            if name in PROJECTIONS:
                setattr(parent, name, to_nf4(child))


def checkpoint_tensors(folder):
    """name -> loader of that tensor, for a single or sharded safetensors checkpoint (read lazily, memory-mapped)."""
    from safetensors import safe_open
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for f in files:
        if not (folder / f).exists():
            raise FileNotFoundError(f"{folder}: no {f}" + (" (listed in model.safetensors.index.json)" if index.exists() else ""))
        handle = safe_open(str(folder / f), framework="pt")
        tensors.update({name: partial(handle.get_tensor, name) for name in handle.keys()})
    return tensors


def resolve_checkpoint(path_or_repo):
    """A local checkpoint folder as it is, or a hub repo id ("Qwen/Qwen2.5-1.5B-Instruct") downloaded once."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json, this is not a Hugging Face checkpoint folder")
        return path
    if path.exists() or str(path_or_repo).startswith((".", "/", "~")) or str(path_or_repo).count("/") != 1:
        raise FileNotFoundError(f"{path_or_repo}: no such model folder (nor a hub repo id like 'Qwen/Qwen2.5-1.5B-Instruct')")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(path_or_repo), allow_patterns=[
            "config.json", "model*.safetensors*", "tokenizer.json", "tokenizer_config.json"]))
    except Exception as e:
        raise RuntimeError(f"could not download {path_or_repo} from the Hugging Face hub ({type(e).__name__}: {e}). "
                           f"Offline? Pass a local checkpoint folder with --model /path/to/folder") from e


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_bf16():
    """AVX512-BF16 or AMX: the CPU computes in bf16. Without them (AVX2), bf16 is emulated and far slower."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(device="auto", dtype="auto"):
    """The --device and --dtype flags as torch objects. auto: CUDA when present; bf16 where the hardware computes
    in it, fp16 on GPUs without bf16 (T4, V100), fp32 on CPUs without bf16 instructions."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else device)
    if dtype not in (None, "auto"):
        if device.type == "cpu" and dtype == "bf16" and not cpu_has_bf16():
            warnings.warn("--dtype bf16 on a CPU without bf16 instructions is emulated: on an AVX2 CPU one QLoRA step "
                          "of the 0.5B model took 299 s against about 8 s in fp32. --dtype auto picks fp32 there.")
        return device, DTYPES[dtype]
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.bfloat16 if cpu_has_bf16() else torch.float32


class Tokenizer:
    """Qwen2's byte-level BPE (tokenizer.json) and the ChatML format, written out by hand."""
    DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

    def __init__(self, tok):
        self.tok = tok
        ids = {s: tok.token_to_id(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
        if None in ids.values():
            raise ValueError(f"tokenizer lacks ChatML special tokens: {[s for s, i in ids.items() if i is None]}")
        self.pad_id, self.im_start_id, self.im_end_id = ids.values()

    @classmethod
    def from_pretrained(cls, path_or_repo):
        from tokenizers import Tokenizer as HFTokenizer
        folder = resolve_checkpoint(path_or_repo)
        if not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        return cls(HFTokenizer.from_file(str(folder / "tokenizer.json")))

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat(self, messages, add_generation_prompt=True):
        """ChatML: each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`; Qwen adds its own system turn
        when the conversation has none. Special tokens in the rendered text encode to their ids, as in HF."""
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.DEFAULT_SYSTEM}, *messages]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return self.encode(text + ("<|im_start|>assistant\n" if add_generation_prompt else ""))


def sample(logits, temperature, top_p):
    """Next token per row from fp32 logits (B, V): argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    sorted_p[(sorted_p.cumsum(-1) - sorted_p) >= top_p] = 0  # keep the smallest prefix whose mass reaches top_p
    return order.gather(-1, torch.multinomial(sorted_p, 1)).squeeze(-1)


def left_pad(prompts, pad_id, device=None):
    """Token-id lists -> ids (B, T) padded on the left, so every prompt ends at column T - 1, and the boolean
    (B, T) mask of real tokens."""
    T = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=None, on_token=None):
    """Continue each prompt (a list of token ids) until a stop token or max_new_tokens; returns the new ids
    of each row without the stop token. Rows that stop leave the batch, so no work is spent on them."""
    param = model.model.embed_tokens.weight
    stop = torch.tensor(stop_ids or [tokenizer.im_end_id, tokenizer.pad_id], device=param.device)
    ids, pad_mask = left_pad(prompts, tokenizer.pad_id, param.device)
    cache = KVCache(model.config, len(prompts), ids.shape[1] + max_new_tokens, param.dtype, param.device)
    x = model.hidden(ids, pad_mask, cache)[:, -1]  # (B, D)
    rows = list(range(len(prompts)))  # the prompt index of each live row
    out = [[] for _ in prompts]
    for step in range(max_new_tokens):
        token = sample(model.lm_head(x).float(), temperature, top_p)  # (b,)
        done = torch.isin(token, stop)
        for r, t, d in zip(rows, token.tolist(), done.tolist()):  # one host sync per step
            if not d:
                out[r].append(t)
                if on_token:
                    on_token(r, t)
        if done.all() or step == max_new_tokens - 1:
            break
        if done.any():
            live = (~done).nonzero().squeeze(1)
            rows = [rows[i] for i in live.tolist()]
            cache.keep(live)
            token = token[live]
        x = model.hidden(token[:, None], None, cache)[:, -1]
    return out
