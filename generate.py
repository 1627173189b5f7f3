"""Batched generation with a KV cache: left-padded prompts, rows that leave the batch when they stop,
greedy or nucleus sampling.

    new_ids = generate(model, tokenizer, [prompt_ids, ...], max_new_tokens=256, temperature=0.0)
"""
import torch

from tinyreason import KVCache


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
