"""Batched generation with a KV cache: left-padded prompts, rows that leave the batch when they stop, greedy or
nucleus sampling, and the calculator tool writing its results into the rows that call it.

    tokens, sampled = generate(model, tokenizer, [prompt_ids, ...], max_new_tokens=256, temperature=0.0)
"""
import torch

from calculator import tool_output
from tinyreason import KVCache


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


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=None, on_token=None,
             num_samples=1, generator=None, calculator=False) -> tuple[list[list[int]], list[list[bool]]]:
    """Continue each prompt (a list of token ids) `num_samples` times until a stop token or max_new_tokens.

    Returns the new tokens of each row (prompt-major: prompt i's samples are rows i*n .. i*n+n-1), ending with
    the stop token when the row stopped, and for each token whether the model sampled it. With `calculator`, a
    row whose text ends in `<<EXPR=` gets the tool's `RESULT>>` as its next tokens in place of its samples, while
    the batch decodes on: those are marked not sampled (RL does not train on them). Finished rows leave the batch,
    and a prompt's samples share its prefill. `on_token(row, token)` sees every new token but the stop."""
    device = model.lm_head.weight.device
    stop = torch.tensor(stop_ids or tokenizer.stop_ids, device=device)
    ids, pad_mask = left_pad(prompts, tokenizer.pad_id, device)
    cache = KVCache(model.config, len(prompts) * num_samples, ids.shape[1] + max_new_tokens,
                    model.model.embed_tokens.weight.dtype, device)
    cache.batch = len(prompts)
    x = model(ids, pad_mask, cache)[:, -1]  # (P, D)
    if num_samples > 1:  # row i becomes rows i*n .. i*n+n-1 (keep gathers before it writes: safe in place)
        cache.keep(torch.arange(cache.batch, device=device).repeat_interleave(num_samples))
        x = x.repeat_interleave(num_samples, 0)  # (P * n, D)
    rows = list(range(cache.batch))  # the output row of each live row
    tokens, sampled = [[] for _ in rows], [[] for _ in rows]
    queued = [[] for _ in rows]  # what the calculator will still write in each row
    for step in range(max_new_tokens):
        token = sample(model.lm_head(x).float(), temperature, top_p, generator)  # (b,)
        by_tool = [bool(queued[r]) for r in rows]
        if any(by_tool):  # the tool's next token replaces the row's sample; the batch stays one batch
            token = torch.tensor([queued[r].pop(0) if f else t for r, t, f in zip(rows, token.tolist(), by_tool)],
                                 device=device)
        done = torch.isin(token, stop)
        for r, t, d, f in zip(rows, token.tolist(), done.tolist(), by_tool):  # one host sync per step
            tokens[r].append(t)
            sampled[r].append(not f)
            if on_token and not d:
                on_token(r, t)
            if calculator and not d and tokenizer.decode([t]).endswith("=") and (
                    written := tool_output(tokenizer.decode(tokens[r]))):
                queued[r] = tokenizer.encode(written)
        if done.all() or step == max_new_tokens - 1:
            break
        if done.any():
            live = (~done).nonzero().squeeze(1)
            rows = [rows[i] for i in live.tolist()]
            cache.keep(live)
            token = token[live]
        x = model(token[:, None], None, cache)[:, -1]
    return tokens, sampled
