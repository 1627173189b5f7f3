"""Batched generation with a KV cache: left-padded prompts, greedy or nucleus sampling, the calculator tool writing
its results into the rows that call it, and a batch kept full (continuous batching): a row that stops leaves, and
the next prompts take the free slots, prefilled and appended to the cache while the others decode on.

    tokens, sampled = generate(model, tokenizer, [prompt_ids, ...], max_new_tokens=256, batch_size=64)
"""
import torch
import torch.nn.functional as F

from calculator import tool_output
from tinyreason import causal_mask


class KVCache:
    """Keys and values of every layer, preallocated: (L, slots, n_kv, capacity, hd), and each slot's token id and
    real-token flag. All rows write their next token at column `len`; a row's own tokens are the columns its mask
    marks, so rows that joined later sit right-aligned with the left of their row masked. `keep` moves the rows
    still generating to the front, `append` adds prefilled rows after them, `compact` drops leading columns that
    only finished rows used.

    A static cache also serves the static decode step (`decoder_step`): while `pos` holds the column (a (1,) tensor),
    every slot writes there and attends to every column up to it, so no shape depends on `len` or `batch`."""

    def __init__(self, config, batch, capacity, dtype, device, static=False):
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, capacity, config.head_dim)
        # Pages never written are never resident; a static step reads every column, so its cache holds no NaN garbage.
        make = torch.zeros if static else torch.empty
        self.k = make(shape, dtype=dtype, device=device)
        self.v = make(shape, dtype=dtype, device=device)
        self.ids = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # rotary position of each row's next token
        self.batch, self.len, self.start, self.capacity = batch, 0, 0, capacity
        self.pos, self.columns = None, torch.arange(capacity, device=device) if static else None
        if static:  # a CUDA graph replays fixed addresses: the buffers the compiled step writes are marked as fixed
            for t in (self.k, self.v, self.ids, self.mask, self.next_pos):
                torch._dynamo.mark_static_address(t)

    def write(self, input_ids, real, positions):
        """Record the new tokens (B, T) and their real-token flags at the next columns. Returns their rotary
        positions (each row's `positions` counted on from what it holds) and the attention mask (None: SDPA's
        causal kernels)."""
        B, T = input_ids.shape
        positions = positions + self.next_pos[:B, None]
        self.next_pos[:B] += real.sum(-1)
        if self.pos is not None:
            self.ids.index_copy_(1, self.pos, input_ids)
            self.mask.index_copy_(1, self.pos, real)
            return positions, (self.mask & (self.columns <= self.pos))[:, None, None]  # (slots, 1, 1, capacity)
        self.start, self.len = self.len, self.len + T
        self.ids[:B, self.start:self.len], self.mask[:B, self.start:self.len] = input_ids, real
        unpadded = not self.start and bool(real.all())  # SDPA's causal kernels then: no (T, T) mask for a long prompt
        return positions, None if unpadded else causal_mask(self.mask[:B, :self.len], T, self.start)

    def update(self, layer, k, v):  # k, v: (B, n_kv, T, hd) -> everything cached so far
        if self.pos is not None:
            self.k[layer].index_copy_(2, self.pos, k)
            self.v[layer].index_copy_(2, self.pos, v)
            return self.k[layer], self.v[layer]
        self.k[layer, :self.batch, :, self.start:self.len] = k
        self.v[layer, :self.batch, :, self.start:self.len] = v
        return self.k[layer, :self.batch, :, :self.len], self.v[layer, :self.batch, :, :self.len]

    def keep(self, rows):
        n = len(rows)
        for t in (self.k, self.v):  # only the slots written so far move
            t[:, :n, :, :self.len] = t[:, rows, :, :self.len]
        for t in (self.ids, self.mask, self.next_pos):
            t[:n] = t[rows]
        self.batch, self.len = n, self.len if n else 0

    def shift(self, delta):
        """Every row's columns moved by delta (left when negative: the first -delta columns are dropped)."""
        src, dst, b = slice(max(0, -delta), self.len), slice(max(0, delta), self.len + delta), self.batch
        for t in (self.k, self.v):
            for layer in t:  # a layer at a time: the copy's peak is one layer's cache
                layer[:b, :, dst] = layer[:b, :, src].clone()
        for t in (self.ids, self.mask):
            t[:b, dst] = t[:b, src].clone()
        self.mask[:b, :max(0, delta)] = False
        self.len += delta

    def compact(self):
        self.shift(-int(self.mask[:self.batch, :self.len].any(0).nonzero()[0]))

    def append(self, other: "KVCache"):
        """other's rows (prompts just prefilled) after this cache's, right-aligned: their last column is len - 1."""
        n, T = other.batch, other.len
        if T > self.len:
            self.shift(T - self.len)
        rows, cols = slice(self.batch, self.batch + n), slice(self.len - T, self.len)
        self.k[:, rows, :, :self.len - T], self.v[:, rows, :, :self.len - T] = 0, 0  # masked, but never NaN garbage
        self.k[:, rows, :, cols], self.v[:, rows, :, cols] = other.k[:, :n, :, :T], other.v[:, :n, :, :T]
        self.ids[rows], self.mask[rows] = 0, False
        self.ids[rows, cols], self.mask[rows, cols] = other.ids[:n, :T], other.mask[:n, :T]
        self.next_pos[rows] = other.next_pos[:n]
        self.batch += n


def sample(logits, temperature, top_p, generator=None):
    """Next token per row from fp32 logits (B, V): argmax at temperature 0, else a draw from softmax(logits / T),
    cut to its top_p nucleus when top_p < 1."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:  # keep the smallest prefix of the sorted distribution whose mass reaches top_p
        probs, order = probs.sort(dim=-1, descending=True)
        probs[(probs.cumsum(-1) - probs) >= top_p] = 0
    # Inverse CDF: one uniform per row and a binary search of the running sum, much faster than torch.multinomial
    # over a 150k vocabulary. u > 0, so a token of zero mass (past the nucleus, an exp that underflowed) is never
    # drawn: the search stops at the first token whose running sum reaches u.
    cdf = probs.cumsum(-1)  # (B, V)
    u = (1 - torch.rand(len(cdf), 1, generator=generator, device=cdf.device)) * cdf[:, -1:]  # in (0, total]
    token = torch.searchsorted(cdf, u).squeeze(-1)
    return token if top_p >= 1 else order.gather(-1, token[:, None]).squeeze(-1)


def left_pad(prompts, pad_id, device=None):
    """Token-id lists -> ids (B, T) padded on the left, so every prompt ends at column T - 1, and the boolean
    (B, T) mask of real tokens."""
    T = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)
    return ids, mask


def stopped(ids: list[int], tokenizer) -> bool:
    """Whether a generated row ended on one of the checkpoint's stop tokens (else it was cut at the length)."""
    return bool(ids) and ids[-1] in tokenizer.stop_ids


def prefill(model, prompts, num_samples, pad_id, cache=None):
    """Hidden states (P * n, D) of the prompts' last positions and the cache of their prompts (`cache` if given,
    empty, else a new one), each prompt's row repeated num_samples times: its samples share its prefill."""
    ids, pad_mask = left_pad(prompts, pad_id, model.lm_head.weight.device)
    cache = cache or KVCache(model.config, len(prompts) * num_samples, ids.shape[1],
                             model.model.embed_tokens.weight.dtype, ids.device)
    cache.batch = len(prompts)
    x = model(ids, pad_mask, cache)[:, -1]  # (P, D)
    if num_samples > 1:  # row i becomes rows i*n .. i*n+n-1 (keep gathers before it writes: safe in place)
        cache.keep(torch.arange(cache.batch, device=ids.device).repeat_interleave(num_samples))
        x = x.repeat_interleave(num_samples, 0)
    return x, cache


def decoder_step(model, compile=False):
    """`step(token (b,), cache) -> hidden states (b, D)`: the next position of the cache's live rows. Compiled, the
    step is static (the cache must be): it runs every slot over every column with the write column as a tensor, so
    its shapes never change and torch.compile captures it once, as CUDA graphs on a GPU (gpt-fast's design)."""
    def forward(token, cache):
        return model(token[:, None], None, cache)[:, -1]
    if not compile:
        return forward
    if not hasattr(model, "static_step"):  # once per model: a new torch.compile would compile anew
        model.static_step = torch.compile(forward, mode="reduce-overhead" if model.lm_head.weight.is_cuda else None,
                                          dynamic=False)

    def step(token, cache):
        b = len(token)
        cache.pos = torch.tensor([cache.len], device=token.device)
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's output is not read again
        x = model.static_step(F.pad(token, (0, len(cache.next_pos) - b)), cache)[:b].clone()
        cache.pos, cache.len = None, cache.len + 1
        return x
    return step


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=None, on_token=None,
             num_samples=1, generator=None, calculator=False, batch_size=None,
             on_done=None, compile=False) -> tuple[list[list[int]], list[list[bool]]]:
    """Continue each prompt (a list of token ids) `num_samples` times until a stop token or max_new_tokens.

    Returns the new tokens of each row (prompt-major: prompt i's samples are rows i*n .. i*n+n-1), ending with
    the stop token when the row stopped, and for each token whether the model sampled it. With `calculator`, a
    row whose text ends in `<<EXPR=` gets the tool's `RESULT>>` as its next tokens in place of its samples, while
    the batch decodes on: those are marked not sampled (RL does not train on them). At most `batch_size` rows
    (default: all) decode at once; when a row stops, prompts waiting take the free slots. `on_token(row, token)`
    sees every new token but the stop, `on_done(row, tokens)` each row as it ends. `compile`: the static decode
    step, compiled (the same tokens)."""
    if not prompts:
        return [], []
    n, device = num_samples, model.lm_head.weight.device
    slots = max(batch_size or len(prompts) * n, n)  # one prompt's samples always fit
    stop = torch.tensor(stop_ids or tokenizer.stop_ids, device=device)
    span = max(map(len, prompts)) + max_new_tokens  # the most columns one row uses
    capacity = span + span // 4 * (slots < len(prompts) * n)  # room to refill
    if compile:  # a few sizes, so that calls with other prompts reuse a compiled step
        capacity = -(-capacity // 256) * 256
    cache = KVCache(model.config, slots, capacity, model.model.embed_tokens.weight.dtype, device, static=compile)
    step = decoder_step(model, compile)
    cache.batch, waiting = 0, list(range(len(prompts)))
    refill = max(1, slots // 8)  # free slots that make a prefill worth its pass over the weights
    rows, x = [], None  # the output row of each live row, and their last hidden states (b, D)
    tokens, sampled = [[] for _ in range(len(prompts) * n)], [[] for _ in range(len(prompts) * n)]
    queued = [[] for _ in tokens]  # what the calculator will still write in each row
    while True:
        free = slots - len(rows)
        if waiting and free >= max(n, min(refill, len(waiting) * n)):
            taken, waiting = waiting[:free // n], waiting[free // n:]
            if cache.batch:  # rows are decoding: the new ones are prefilled apart, then appended
                x_new, new = prefill(model, [prompts[i] for i in taken], n, tokenizer.pad_id)
                cache.append(new)
            else:
                x_new, _ = prefill(model, [prompts[i] for i in taken], n, tokenizer.pad_id, cache)
            rows += [i * n + j for i in taken for j in range(n)]
            x = x_new if x is None else torch.cat([x, x_new])
        if not rows:
            return tokens, sampled
        token = sample(model.lm_head(x).float(), temperature, top_p, generator)  # (b,)
        by_tool = [bool(queued[r]) for r in rows]
        if any(by_tool):  # the tool's next token replaces the row's sample; the batch stays one batch
            token = torch.tensor([queued[r].pop(0) if f else t for r, t, f in zip(rows, token.tolist(), by_tool)],
                                 device=device)
        is_stop, done = torch.isin(token, stop).tolist(), []  # one host sync per step
        for r, t, f, s in zip(rows, token.tolist(), by_tool, is_stop):
            tokens[r].append(t)
            sampled[r].append(not f)
            done.append(s or len(tokens[r]) == max_new_tokens)
            if on_token and not s:
                on_token(r, t)
            if calculator and not done[-1] and tokenizer.decode([t]).endswith("=") and (
                    written := tool_output(tokenizer.decode(tokens[r]))):
                queued[r] = tokenizer.encode(written)
        if any(done):
            live = [i for i, d in enumerate(done) if not d]
            for r in (r for r, d in zip(rows, done) if d and on_done):
                on_done(r, tokens[r])
            rows, x = [rows[i] for i in live], None
            cache.keep(torch.tensor(live, dtype=torch.long, device=device))
            token = token[live]
        if rows:
            if cache.len == cache.capacity:
                cache.compact()
            x = step(token, cache)
