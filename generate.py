"""Batched generation with a KV cache: left-padded prompts, rows that leave the batch when they stop,
greedy or nucleus sampling, and the calculator tool writing its results into the rows that call it.

    new_ids = generate(model, tokenizer, [prompt_ids, ...], max_new_tokens=256, temperature=0.0)
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
    # Inverse CDF: one uniform per row and a binary search of the running sum. torch.multinomial took 0.85 s for
    # 64 rows of 151,936 here, this 0.1 s. u > 0, so a token of zero mass (past the nucleus, an exp that underflowed)
    # is never drawn: the search stops at the first token whose running sum reaches u.
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


def share_prefill(cache: KVCache, n: int):
    """Each of the cache's rows becomes n consecutive rows (row i -> rows i*n .. i*n+n-1): the n samples of a
    prompt share one prefill instead of computing it n times."""
    # keep gathers the rows before it writes them, so repeating them in place is safe
    cache.keep(torch.arange(cache.batch, device=cache.mask.device).repeat_interleave(n))


def stop_tokens(tokenizer) -> list[int]:
    """What ends a row by default: the assistant's <|im_end|>, or <|endoftext|>."""
    return [tokenizer.im_end_id, tokenizer.pad_id]


def stopped(ids: list[int], tokenizer) -> bool:
    """Whether a row generated with keep_stop ended on a default stop token (else it was cut at the length)."""
    return bool(ids) and ids[-1] in stop_tokens(tokenizer)


@torch.inference_mode()
def generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop_ids=None, on_token=None,
             num_samples=1, keep_stop=False, generator=None, calculator=False, forced=None):
    """Continue each prompt (a list of token ids) `num_samples` times until a stop token or max_new_tokens.
    Returns the new ids of each row (prompt-major: prompt i's samples are rows i*n .. i*n+n-1); a row that sampled
    a stop token ends with it when keep_stop, so a row shorter than max_new_tokens, or ending in a stop token,
    stopped, and any other was cut at the length. Finished rows leave the batch: no work is spent on them.
    With `calculator`, a row whose text ends in `<<EXPR=` gets the tool's `RESULT>>` as its next tokens, forced
    in place of its samples while the batch decodes on; a list passed as `forced` receives each row's positions
    of those tokens (they are the tool's, not the model's: RL does not train on them). A model with stages.py's
    verification adapter has it on for a row from the token that completes the row's VERIFY tag."""
    param = model.model.embed_tokens.weight
    stop = torch.tensor(stop_ids or stop_tokens(tokenizer), device=param.device)
    ids, pad_mask = left_pad(prompts, tokenizer.pad_id, param.device)
    cache = KVCache(model.config, len(prompts) * num_samples, ids.shape[1] + max_new_tokens, param.dtype,
                    param.device)
    cache.batch = len(prompts)
    verify = getattr(model, "verify", None)
    if verify:
        verify.start(ids)
    x = model.hidden(ids, pad_mask, cache)[:, -1]  # (P, D)
    if num_samples > 1:
        share_prefill(cache, num_samples)
        x = x.repeat_interleave(num_samples, 0)  # (P * n, D)
    rows = list(range(cache.batch))  # the output row of each live row
    out, queued = [[] for _ in rows], [[] for _ in rows]  # queued: what the calculator will write for each row
    if forced is not None:
        forced[:] = [[] for _ in rows]
    for step in range(max_new_tokens):
        token = sample(model.lm_head(x).float(), temperature, top_p, generator)  # (b,)
        forcing = [bool(queued[r]) for r in rows]
        if any(forcing):  # the tool's next token replaces the row's sample; the batch stays one batch
            token = torch.tensor([queued[r].pop(0) if f else t for r, t, f in zip(rows, token.tolist(), forcing)],
                                 device=token.device)
        done = torch.isin(token, stop)
        for r, t, d, f in zip(rows, token.tolist(), done.tolist(), forcing):  # one host sync per step
            if f and forced is not None:
                forced[r].append(len(out[r]))
            if not d or keep_stop:
                out[r].append(t)
            if on_token and not d:
                on_token(r, t)
            if calculator and not d and tokenizer.decode([t]).endswith("=") and (
                    written := tool_output(tokenizer.decode(out[r]))):
                queued[r] = tokenizer.encode(written)
        if done.all() or step == max_new_tokens - 1:
            break
        if done.any():
            live = (~done).nonzero().squeeze(1)
            rows = [rows[i] for i in live.tolist()]
            cache.keep(live)
            token = token[live]
        if verify:
            verify.follow(tokenizer, out, rows, token.device)
        x = model.hidden(token[:, None], None, cache)[:, -1]
    return out
