"""Reinforcement learning with verifiable rewards on an NF4 base + LoRA: GRPO and its variants, as one loop.

    python rl.py                                   # GRPO from the SFT adapter (outputs/lora_adapter) on GSM8K train
    python rl.py --algo lpro --task math           # the Nexus recipe (LPRO) on MATH; --algo infused: Infused Phi-2's
    python eval.py --adapter outputs/rl_adapter    # the result, scored as always

At ppo_epochs 1 the loss is 0 by construction (ρ ≡ 1) while its gradient is not: watch the reward and the accuracy.
The algorithms, their sources and the log: docs/rl.md.
"""
import random
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

import config
import cpu
import data
import lora
import loop
import tasks
from generate import generate, stopped
from load import DEFAULT_ADAPTER, context_length, dtype_name, load_base, resolve_checkpoint, resolve_model_flags
from tinyreason import token_logprobs
from tokenizer import Tokenizer

# The algorithms of docs/rl.md. A preset fills the fields left unset (None); a flag given always wins.
PRESETS = {
    "grpo": dict(advantage="group", eps_high=0.2, loss_agg="seq", ppo_epochs=1, beta=0.04, zero_std="keep"),
    "dr_grpo": dict(advantage="none", eps_high=0.2, loss_agg="const", ppo_epochs=1, beta=0.0, zero_std="keep"),
    "dapo": dict(advantage="group", eps_high=0.28, loss_agg="token", ppo_epochs=1, beta=0.0, zero_std="drop"),
    "lpro": dict(advantage="group", eps_high=0.28, loss_agg="token", ppo_epochs=4, beta=0.0, zero_std="drop",
                 length_penalty=0.1, group_size=4),
    "infused": dict(advantage="none", eps_high=0.2, loss_agg="seq", ppo_epochs=1, beta=0.0, zero_std="keep",
                    reward_weights="1.0,0.3,0.7", format="answer_tags", temperature=0.8, group_size=3),
}
PARTS = ("reward", "correct", "format", "reasoning")
COMMON = dict(length_penalty=0.0, reward_weights="1.0,0.1,0.0", format="tinyreason", temperature=1.0, group_size=8)
FIXED_ON_RESUME = ("model", "adapter", "task", "data", "zone", "algo", "format", "calculator", "group_size",
                   "prompts_per_step", "eval_samples", "quantize", "lora_r", "lora_alpha", "target_modules", "seed")


@dataclass
class RLConfig(loop.LoopConfig):
    model: str = ""  # base checkpoint; empty: the --adapter's base model
    adapter: str = DEFAULT_ADAPTER  # the adapter RL starts from (the SFT one); none: a new adapter on the base
    algo: Literal["grpo", "dr_grpo", "dapo", "lpro", "infused"] = "grpo"  # sets the fields shown with no default
    format: Literal["tinyreason", "boxed", "answer_tags"] = None  # the prompt, and the answer span the rewards read
    group_size: int = None  # G: samples per question
    prompts_per_step: int = 4  # questions per step; a step trains on prompts_per_step x group_size completions
    micro_batch_size: int = 8  # completions per forward/backward
    max_new_tokens: int = 512  # a completion cut here is truncated: reward 0
    calculator: bool = None  # the calculator tool in rollouts (its tokens never train); default: as --adapter was
    compile: bool = False  # torch.compile the static decode step (CUDA graphs on a GPU); its first steps compile
    temperature: float = None  # sampling temperature, also applied to the log-probs of the loss
    reward_weights: str = None  # weights of correctness,format,reasoning in the reward
    advantage: Literal["group", "batch", "none"] = None  # group z-score; batch: centred / batch std; none: centred only
    length_penalty: float = None  # LPRO's λ: subtracts λ·(length z-score) within each group
    zero_std: Literal["drop", "keep"] = None  # groups whose rewards are all equal: drop (no backward) or keep
    mask_truncated: bool = False  # truncated completions out of the loss (their reward still counts in the group)
    loss_agg: Literal["token", "seq", "const"] = None  # D: the step's token count, N·|o_i| or N·max_new_tokens
    ppo_epochs: int = None  # optimizer steps per rollout (μ); above 1 the clip acts
    eps_low: float = 0.2  # the ratio is clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float = None  # the upper clip; above eps_low: DAPO's clip-higher
    beta: float = None  # weight of the k3 KL to the starting policy; 0: no reference pass
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    max_steps: int = 200  # rollouts, each followed by ppo_epochs optimizer steps
    weight_decay: float = 0.0
    eval_steps: int = 25
    eval_samples: int = 64  # held-out questions: the last records of --data, never trained on
    zone: str = ""  # e.g. 2,5: only questions distill.py found n_correct in [2, 5] (the learnable zone); empty: all
    save_steps: int = 25
    save_total_limit: int = 2
    logging_steps: int = 5  # a sample completion every this many steps (a log line every step)
    output_dir: str = "outputs/rl"
    adapter_path: str = "outputs/rl_adapter"


def parse_config(argv=None) -> RLConfig:
    cfg = config.parse_config(RLConfig, argv, FIXED_ON_RESUME, __doc__)
    for key, value in {**COMMON, **PRESETS[cfg.algo]}.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    cfg.data = cfg.data or tasks.load_task(cfg.task).source("train")
    return cfg


def check_config(cfg: RLConfig):
    """Every input problem argparse cannot see, found before the model loads, in one specific error."""
    problems = loop.config_problems(cfg, ("group_size", "prompts_per_step", "micro_batch_size", "max_new_tokens",
                                          "ppo_epochs"),
                                    ("beta", "length_penalty", "eps_low", "eps_high", "temperature", "eval_samples"))
    if config.numbers(cfg.reward_weights, 3) is None:
        problems.append(f"--reward_weights {cfg.reward_weights!r}: expected three numbers, e.g. 1.0,0.1,0.0")
    if cfg.zone and not re.fullmatch(r"\d+,\d+", cfg.zone):
        problems.append(f"--zone {cfg.zone!r}: expected two counts, e.g. 2,5")
    if cfg.temperature == 0:
        problems.append("--temperature 0 samples one completion G times: RL needs > 0")
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


def question_indices(n: int, per_step: int, seed: int, step: int) -> list[int]:
    """The questions of step `step`: the next per_step of a run of epochs over the n, each shuffled by (seed, epoch)
    alone, so a resumed run draws the same ones."""
    picks, orders = range(step * per_step, (step + 1) * per_step), {}
    for epoch in {k // n for k in picks}:
        orders[epoch] = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(orders[epoch])
    return [orders[k // n][k % n] for k in picks]


def compute_rewards(texts, completions, golds, ended, cfg) -> dict[str, torch.Tensor]:
    """Reward parts per completion (N,) and their weighted sum under "reward"."""
    parts = [tasks.load_task(cfg.task).rewards(t, g, cfg.format, s) for t, g, s in zip(texts, golds, ended)]
    out = {k: torch.tensor([p[k] for p in parts]) for k in PARTS[1:]}
    out["reward"] = sum(w * out[k] for w, k in zip(config.numbers(cfg.reward_weights, 3), PARTS[1:]))
    return out


def advantages(rewards, lengths, kind: str, length_penalty: float = 0.0, eps: float = 1e-4):
    """Advantages from rewards and lengths (P, G): centred in each group, over the group's std or the batch's, then
    LPRO's −λ·(length z-score); and which groups had all rewards equal (P,)."""
    centred = rewards - rewards.mean(1, keepdim=True)
    adv = {"group": centred / (rewards.std(1, keepdim=True) + eps), "batch": centred / (rewards.std() + eps),
           "none": centred}[kind]
    if length_penalty:
        L = lengths.float()
        adv = adv - length_penalty * (L - L.mean(1, keepdim=True)) / (L.std(1, keepdim=True) + eps)
    return adv, rewards.std(1) == 0


def token_weights(lengths, active, loss_agg: str, max_new_tokens: int, totals=None):
    """Each completion's 1/D (N,), 0 if inactive. D: token, the step's active tokens; seq, N_active·|o_i|; const,
    N_active·max_new_tokens. `totals`: (N_active, active tokens) over all processes; default: counted here."""
    n_seq, n_tokens = totals or (int(active.sum()), int(lengths[active].sum()))
    D = {"token": torch.tensor(max(n_tokens, 1)), "seq": max(n_seq, 1) * lengths.clamp(min=1),
         "const": torch.tensor(max(n_seq, 1) * max_new_tokens)}[loss_agg]
    return torch.where(active, 1 / D.float(), 0.0)


def policy_loss(logp, old_logp, ref_logp, adv, weight, cfg) -> tuple[torch.Tensor, dict]:
    """The loss of some completion tokens and its statistics. Per token: ℓ, ℓ_old and ℓ_ref its log-prob now, at
    the rollout and under the starting policy (None at β = 0), A its completion's advantage, w its weight:

        loss = Σ_t w_t · (−min(ρ_t A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_t) + β · k3_t)
        ρ  = exp(ℓ − ℓ_old)                      the ratio to the rollout policy, its log clamped to ±20
        k3 = exp(ℓ_ref − ℓ) − (ℓ_ref − ℓ) − 1    an unbiased estimate of KL(π ‖ π_ref), never negative
        w  = 1/D                                 the step's normalizer (token_weights); 0 on the calculator's tokens

    The min is the pessimistic side: where the clip acts the token's gradient is exactly 0."""
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * adv)
    kl = (ref_logp - logp).exp() - (ref_logp - logp) - 1 if ref_logp is not None else torch.zeros_like(logp)
    loss = (weight * (-surrogate + cfg.beta * kl)).sum()
    stats = dict(clip_low=(ratio < 1 - cfg.eps_low) & (adv < 0), clip_high=(ratio > 1 + cfg.eps_high) & (adv > 0),
                 kl=kl, ratio=ratio)
    return loss, {k: float(v.detach().sum()) for k, v in stats.items()}


def completion_logprobs(model, prompts, completions, temperature, device):
    """log π(o_t | q, o_<t) at `temperature` of every completion token, rows concatenated (Σ|o_i|,)."""
    starts = torch.tensor([len(p) for p in prompts])[:, None]
    ends = starts + torch.tensor([len(c) for c in completions])[:, None]
    T = int(ends.max())
    ids = torch.tensor([p + c + [0] * (T - len(p) - len(c)) for p, c in zip(prompts, completions)], device=device)
    t = torch.arange(T - 1)  # position t predicts token t + 1
    is_target = ((t >= starts - 1) & (t < ends - 1)).to(device)
    hidden = model(ids)[:, :-1][is_target]  # (Σ|o_i|, D); right padding needs no mask
    return token_logprobs(model, hidden, ids[:, 1:][is_target], temperature)


def micro_batches(model, batch, cfg, device, autocast):
    """Each micro-batch of a rollout: its rows and the fp32 log-probs of their completion tokens."""
    for i in range(0, len(batch["completions"]), cfg.micro_batch_size):
        rows = slice(i, i + cfg.micro_batch_size)
        with autocast:
            logp = completion_logprobs(model, batch["prompts"][rows], batch["completions"][rows], cfg.temperature,
                                       device)
        yield rows, logp.float()


def policy_update(model, optimizer, scaler, params, batch, cfg, device, autocast, lr) -> dict:
    """ppo_epochs optimizer steps over the active completions of one rollout; returns the step's statistics."""
    lengths = [len(c) for c in batch["completions"]]
    # 0 on the tokens the calculator wrote: no action of the policy, so no target
    weights = [torch.tensor(sampled, dtype=torch.float) * w for sampled, w in zip(batch["sampled"], batch["weight"])]
    stats = dict.fromkeys(("clip_low", "clip_high", "kl", "ratio"), 0.0)
    for _ in range(cfg.ppo_epochs):
        for j, (rows, logp) in enumerate(micro_batches(model, batch, cfg, device, autocast)):
            adv = batch["adv"][rows].repeat_interleave(torch.tensor(lengths[rows])).to(device)  # on each token
            old = batch["old"][j] if batch.get("old") else logp.detach()
            ref = batch["ref"][j] if cfg.beta else None
            loss, figures = policy_loss(logp, old, ref, adv, torch.cat(weights[rows]).to(device), cfg)
            scaler.scale(loss).backward()
            stats = {k: v + figures[k] for k, v in stats.items()}
        grad_norm = loop.optimizer_step(optimizer, scaler, params, cfg.max_grad_norm, lr)
    *sums, n_tokens = loop.all_ranks_sum(*stats.values(), sum(lengths) * cfg.ppo_epochs)
    return {**{k: v / max(n_tokens, 1) for k, v in zip(stats, sums)}, "grad_norm": grad_norm}


@torch.no_grad()
def frozen_logprobs(model, batch, cfg, device, autocast, adapter: dict = None):
    """micro_batches' log-probs, dropout off: ℓ_old; or ℓ_ref, with the reference `adapter` tensors copied in."""
    params, adapter = lora.lora_state_dict(model), adapter or {}
    own = {k: params[k].clone() for k in adapter}
    for k, t in adapter.items():
        params[k].copy_(t)
    model.eval()
    out = [logp for _, logp in micro_batches(model, batch, cfg, device, autocast)]
    model.train()
    for k, t in own.items():
        params[k].copy_(t)
    return out


def rl_step(model, tokenizer, optimizer, scaler, params, questions, ref_tensors, cfg, step, device, autocast, lr):
    """Rollout, rewards, advantages and the policy update of one step; returns its statistics and one sample."""
    G, t0, task = cfg.group_size, time.time(), tasks.load_task(cfg.task)
    prompts = [data.prompt_ids(tokenizer, task.question(q), cfg.format) for q in questions]
    model.eval()
    generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)
    with autocast, cpu.sampling_weights(model):  # the loss's policy (up to rounding), the whole softmax (top_p 1)
        completions, sampled = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, top_p=1.0,
                                        num_samples=G, generator=generator, calculator=cfg.calculator,
                                        compile=cfg.compile)
    model.train()
    texts, ended = [tokenizer.decode(c) for c in completions], [stopped(c, tokenizer) for c in completions]
    r = compute_rewards(texts, completions, [task.gold(q) for q in questions for _ in range(G)], ended, cfg)
    lengths = torch.tensor([len(c) for c in completions])
    adv, zero_std = advantages(r["reward"].view(-1, G), lengths.view(-1, G), cfg.advantage, cfg.length_penalty)
    active = torch.tensor(ended) | (not cfg.mask_truncated)
    if cfg.zero_std == "drop":
        active &= ~zero_std.repeat_interleave(G)
    t_gen, t1 = time.time() - t0, time.time()
    keep = active.nonzero().squeeze(1).tolist()  # only what trains is forwarded again
    targets = torch.tensor([sum(s) for s in sampled])  # the calculator's tokens are no targets
    totals = loop.all_ranks_sum(len(keep), int(targets[active].sum()))  # the step's, over all processes
    batch = {"prompts": [prompts[i // G] for i in keep], "completions": [completions[i] for i in keep],
             "sampled": [sampled[i] for i in keep], "adv": adv.flatten()[keep],
             "weight": token_weights(targets, active, cfg.loss_agg, cfg.max_new_tokens, totals)[keep]}
    batch["old"] = frozen_logprobs(model, batch, cfg, device, autocast) if keep and cfg.ppo_epochs > 1 else None
    batch["ref"] = frozen_logprobs(model, batch, cfg, device, autocast, ref_tensors) if keep and cfg.beta else None
    t_ref, t2 = time.time() - t1, time.time()
    update = (policy_update(model, optimizer, scaler, params, batch, cfg, device, autocast, lr) if totals[0] else
              dict(clip_low=0.0, clip_high=0.0, kl=0.0, ratio=1.0, grad_norm=0.0))  # every group had equal rewards
    n, *sums = loop.all_ranks_sum(len(completions), *(float(r[k].sum()) for k in PARTS), float(lengths.sum()),
                                  len(completions) - sum(ended), float(zero_std.sum()) * G)
    stats = dict(zip((*PARTS, "len_mean", "truncated", "frac_zero_std"), (s / n for s in sums)))
    stats |= dict(len_max=int(loop.all_ranks_sum(int(lengths.max()), op=loop.dist.ReduceOp.MAX)[0]), **update, lr=lr,
                  t_gen=t_gen, t_ref=t_ref, t_update=time.time() - t2, peak_gb=loop.peak_memory_gb(device))
    return stats, texts[0]


@torch.no_grad()
def held_out_accuracy(model, tokenizer, records, cfg, autocast, batch_size=32) -> tuple[dict, str]:
    """Greedy accuracy and strict-format rate on held-out questions (the rewards' grader), and their log line."""
    model.eval()
    records, task = records[loop.RANK::loop.WORLD], tasks.load_task(cfg.task)  # this process's share
    prompts = [data.prompt_ids(tokenizer, task.question(q), cfg.format) for q in records]
    with autocast, cpu.sampling_weights(model):
        completions, _ = generate(model, tokenizer, prompts, cfg.max_new_tokens, calculator=cfg.calculator,
                                  batch_size=batch_size, compile=cfg.compile)
    parts = [task.rewards(tokenizer.decode(c), task.gold(q), cfg.format, stopped(c, tokenizer))
             for q, c in zip(records, completions)]
    model.train()
    correct, fmt, n = loop.all_ranks_sum(sum(p["correct"] for p in parts), sum(p["format"] for p in parts), len(parts))
    return ({"accuracy": correct / n, "eval_format": fmt / n},
            f"held-out accuracy {correct / n:.3f} ({correct:.0f}/{n:.0f}), format {fmt / n:.2f}")


def reference_tensors(model, cfg) -> dict:
    """The starting policy of the KL, frozen also across a resume: the starting adapter, or B = 0 for a new one."""
    own = lora.lora_state_dict(model)
    if cfg.adapter == "none":
        return {k: torch.zeros_like(p) for k, p in own.items() if ".lora_B." in k}
    saved = load_file(Path(cfg.adapter) / "adapter_model.safetensors")
    return {k: saved[k].to(p.device) for k, p in own.items()}


def setup(cfg: RLConfig):
    """Resolve model, precision and optimizer into cfg; load the questions, the model and adapter, the optimizer."""
    adapter, _ = resolve_model_flags(cfg)  # the model and calculator of the adapter's run where not given
    device, dtype = cfg.device, cfg.dtype
    cfg.device, cfg.dtype, cfg.optim = device.type, dtype_name(dtype), loop.resolve_optim(cfg.optim, device)
    path = resolve_checkpoint(cfg.model)
    loop.check_target_modules(cfg, path)
    task = tasks.load_task(cfg.task)
    records = task.records(cfg.data, "train", loop.log)
    train_q, eval_q = records[:len(records) - cfg.eval_samples], records[len(records) - cfg.eval_samples:]
    if cfg.zone:  # distill.py's difficulty counts; one entry per question
        lo, hi = map(int, cfg.zone.split(","))
        train_q = list({task.question(q): q for q in train_q if lo <= q.get("n_correct", -1) <= hi}.values())
    tokenizer, context, n = Tokenizer.from_pretrained(path), context_length(path), len(train_q) + len(eval_q)
    if context:  # a question whose prompt leaves no room for an answer is dropped, as train.py drops a long record
        train_q, eval_q = ([q for q in part if data.fits(tokenizer, task.question(q), cfg.format, context)]
                           for part in (train_q, eval_q))
        if dropped := n - len(train_q) - len(eval_q):
            loop.log(f"data: {dropped} questions dropped, their prompts past the model's context of {context:,} tokens")
    if len(train_q) < cfg.prompts_per_step:
        raise ValueError(f"--data {cfg.data}: {len(train_q)} usable questions after holding out {cfg.eval_samples}")
    loop.log(f"data: {len(train_q)} training questions, {len(eval_q)} held out (the last records of {cfg.data})")
    model = load_base(cfg.model, dtype, device, cfg.quantize)
    if cfg.resume or adapter:  # a checkpoint's own adapter first
        lora.load_adapter(model, cfg.resume or adapter)
    else:
        lora.inject(model, cfg.target_modules, cfg.lora_r, cfg.lora_alpha)
    model, params, optimizer = loop.trainable(model, cfg)
    return model, tokenizer, train_q, eval_q, params, optimizer, device, dtype


def main(argv=None) -> dict:
    cfg = parse_config(argv)
    check_config(cfg)
    rank, world = loop.init_distributed()
    if cfg.prompts_per_step % world:
        raise ValueError(f"--prompts_per_step {cfg.prompts_per_step} must split evenly over {world} processes")
    loop.seed_everything(cfg.seed)
    model, tokenizer, train_q, eval_q, params, optimizer, device, dtype = setup(cfg)
    ref_tensors = reference_tensors(model, cfg) if cfg.beta else None
    autocast, scaler = loop.amp(device, dtype)
    state = {"step": 0, "reward": {}, "accuracy": {}}

    def train_step(step):
        picked = question_indices(len(train_q), cfg.prompts_per_step, cfg.seed, step)
        s, sample = rl_step(model, tokenizer, optimizer, scaler, params, [train_q[i] for i in picked[rank::world]],
                            ref_tensors, cfg, step, device, autocast, loop.get_lr(step, cfg))
        line = f"step {step + 1}/{cfg.max_steps} | " + " | ".join(f"{k} {v:.4g}" for k, v in s.items())
        return s, line + (f"\nsample completion:\n{sample}\n" if (step + 1) % cfg.logging_steps == 0 else "")

    evaluate = partial(held_out_accuracy, model, tokenizer, eval_q, cfg, autocast) if eval_q else None
    return loop.run(cfg, "rl.py", model, optimizer, scaler, state, train_step, evaluate, score="accuracy",
                    maximize=True, shown=("reward", "correct"))


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # bad flags, files or data, no network: the message alone says what to do
        raise SystemExit(f"rl.py: {e}")
