"""Reinforcement learning with verifiable rewards on an NF4 base + LoRA: GRPO and its variants, as one loop.

    python rl.py                                   # GRPO from the SFT adapter (outputs/lora_adapter) on GSM8K train
    python rl.py --algo lpro --group_size 4        # the Nexus recipe (LPRO); --algo infused: Infused Phi-2's
    python eval.py --adapter outputs/rl_adapter    # the result, scored as always

One step (the formulas and their sources are in the README's RL section):
1. Rollout: prompts_per_step questions x group_size samples at `temperature`, top_p 1 (the loss takes log-probs of
   the whole softmax), in one batched generate where a prompt's samples share its prefill, seeded by (seed, step).
2. Rewards: correctness (grade.py: eval.py's grader on the style's strict answer span), format, and optionally the
   verifiable reasoning reward, weighted by --reward_weights. A completion cut at max_new_tokens earns nothing.
3. Advantages within each group: z-score, mean-only or batch-scaled, minus LPRO's length term. Groups whose
   rewards are all equal carry no signal: dropped (or kept) and counted.
4. ppo_epochs optimizer steps over the rollout, each over all of it: per token -min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A)
   + β·k3, ρ = exp(ℓ - ℓ_old), weighted by --loss_agg's normalizer, counted over the whole step before the first
   backward. At ppo_epochs 1, ℓ_old = ℓ.detach(): ρ ≡ 1, the clip never acts and the loss is 0 by construction,
   while its gradient is Σ (A/D)·∇ℓ. Watch the reward, the accuracy and the gradient norm, not the loss.
"""
import json
import random
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

import data
import grade
import lora
import loop
from generate import generate, stopped
from load import DEFAULT_ADAPTER, QUANTIZE, dtype_name, load_base, resolve_model_flags
from loop import log
from tinyreason import resolve_checkpoint, token_logprobs
from tokenizer import Tokenizer

# rl-design.md §5. A preset fills the knobs left unset (None); a flag given always wins.
PRESETS = {
    "grpo": dict(advantage="group", eps_high=0.2, loss_agg="seq", ppo_epochs=1, beta=0.04, zero_std="keep"),
    "dr_grpo": dict(advantage="none", eps_high=0.2, loss_agg="const", ppo_epochs=1, beta=0.0, zero_std="keep"),
    "dapo": dict(advantage="group", eps_high=0.28, loss_agg="token", ppo_epochs=1, beta=0.0, zero_std="drop"),
    "lpro": dict(advantage="group", eps_high=0.28, loss_agg="token", ppo_epochs=4, beta=0.0, zero_std="drop",
                 length_penalty=0.1),
    "infused": dict(advantage="none", eps_high=0.2, loss_agg="seq", ppo_epochs=1, beta=0.0, zero_std="keep",
                    reward_weights="1.0,0.3,0.7", format="answer_tags", temperature=0.8, group_size=3),
}
PARTS = ("reward", "correct", "format", "reasoning")
COMMON = dict(length_penalty=0.0, reward_weights="1.0,0.1,0.0", format="tinyreason", temperature=1.0, group_size=8)
FIXED_ON_RESUME = ("model", "adapter", "data", "zone", "algo", "format", "calculator", "group_size", "prompts_per_step",
                   "eval_samples", "quantize", "lora_r", "lora_alpha", "seed")


@dataclass
class RLConfig:
    model: str = ""  # base checkpoint; empty: the --adapter's base model
    adapter: str = DEFAULT_ADAPTER  # the adapter RL starts from (the SFT one); "none": a fresh adapter on the base
    data: str = "openai/gsm8k"  # hub dataset (train split) or local .jsonl/.json/.parquet with question/answer
    algo: str = "grpo"  # preset: grpo, dr_grpo, dapo, lpro, infused
    format: str = None  # tinyreason, boxed or answer_tags: the prompt and what the rewards read
    group_size: int = None  # G: samples per question
    prompts_per_step: int = 4  # questions per step; a step trains on prompts_per_step * group_size completions
    micro_batch_size: int = 8  # completions per forward/backward
    max_new_tokens: int = 512  # a completion cut here is truncated: reward 0
    calculator: bool = None  # the calculator tool in rollouts (its tokens never train); default: as --adapter was
    temperature: float = None  # sampling temperature, also applied to the log-probs of the loss
    reward_weights: str = None  # correctness,format,reasoning
    advantage: str = None  # group (z-score), batch (centred, scaled by the batch std) or none (centred only)
    length_penalty: float = None  # LPRO's λ: subtracts λ·(length z-score) within each group
    zero_std: str = None  # groups whose rewards are all equal: drop (no backward spent on them) or keep
    mask_truncated: bool = False  # truncated completions out of the loss (their reward still counts in the group)
    loss_agg: str = None  # token (all tokens of the step), seq (mean of sequence means), const (N · max_new_tokens)
    ppo_epochs: int = None  # optimizer steps per rollout (μ); above 1 the clip acts
    eps_low: float = 0.2  # the ratio is clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float = None
    beta: float = None  # weight of the k3 KL to the starting policy; 0: no reference pass
    learning_rate: float = 1e-5  # peak learning rate (LoRA RL: 1e-5 to 3e-5)
    warmup_steps: int = 0  # linear warmup, then linear decay to 0 at max_steps
    max_steps: int = 200  # rollouts (each followed by ppo_epochs optimizer steps)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 16  # for --adapter none
    lora_alpha: float = 32
    quantize: str = "nf4"  # base weights: nf4 or none
    dtype: str = "auto"
    device: str = "auto"
    optim: str = "auto"  # adamw_8bit on CUDA, adamw elsewhere
    gradient_checkpointing: bool = True
    eval_steps: int = 25  # held-out greedy accuracy every this many steps (and at the end)
    eval_samples: int = 64  # the last records of --data, never trained on
    zone: str = ""  # "2,5": train only on questions distill.py found n_correct in [2, 5] (the learnable zone)
    save_steps: int = 25
    save_total_limit: int = 2  # newest checkpoints kept; the best by held-out accuracy is never deleted
    logging_steps: int = 5  # a log line every step; a sample completion every this many steps
    report_to: str = "none"  # also send the metrics.jsonl figures to "tensorboard" or "wandb"
    seed: int = 3407
    output_dir: str = "outputs/rl"
    adapter_path: str = "outputs/rl_adapter"  # the best adapter by held-out accuracy
    resume: str = ""  # a checkpoint folder, or "latest" (bare --resume) in output_dir


def parse_config(argv=None) -> RLConfig:
    cfg = loop.parse_config(RLConfig, argv, FIXED_ON_RESUME, __doc__)
    if cfg.algo not in PRESETS:
        raise ValueError(f"--algo {cfg.algo!r}: expected one of {tuple(PRESETS)}")
    for key, value in {**COMMON, **PRESETS[cfg.algo]}.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    return cfg


def check_config(cfg: RLConfig):
    """Every input problem visible before the model loads, in one specific error."""
    positive = ("group_size", "prompts_per_step", "micro_batch_size", "max_new_tokens", "max_steps", "ppo_epochs",
                "eval_steps", "save_steps", "save_total_limit", "logging_steps", "learning_rate", "lora_r")
    problems = [f"--{k} must be > 0 (got {getattr(cfg, k)})" for k in positive if getattr(cfg, k) <= 0]
    problems += [f"--{k} must be >= 0 (got {getattr(cfg, k)})" for k in ("warmup_steps", "beta", "length_penalty",
                 "eps_low", "eps_high", "temperature", "eval_samples") if getattr(cfg, k) < 0]
    for flag, allowed in (("format", grade.STYLES), ("advantage", ("group", "batch", "none")),
                          ("loss_agg", ("token", "seq", "const")), ("zero_std", ("drop", "keep")),
                          ("quantize", QUANTIZE), ("optim", ("auto", "adamw", "adamw_8bit"))):
        if getattr(cfg, flag) not in allowed:
            problems.append(f"--{flag} {getattr(cfg, flag)!r}: expected one of {allowed}")
    try:
        weights = [float(w) for w in cfg.reward_weights.split(",")]
        assert len(weights) == 3
    except (ValueError, AssertionError):
        problems.append(f"--reward_weights {cfg.reward_weights!r}: expected three numbers, e.g. 1.0,0.1,0.0")
    if cfg.zone and not re.fullmatch(r"\d+,\d+", cfg.zone):
        problems.append(f"--zone {cfg.zone!r}: expected two counts, e.g. 2,5")
    if cfg.temperature == 0:
        problems.append("--temperature 0 samples one completion G times: RL needs > 0")
    problems += loop.check_report_to(cfg.report_to)
    if data.is_local(cfg.data) and not Path(cfg.data).is_file():
        problems.append(f"--data {cfg.data}: no such file")
    if not cfg.resume and loop.Checkpoints(cfg.output_dir).saved():
        problems.append(f"--output_dir {cfg.output_dir} already holds checkpoints: continue them with --resume, "
                        "or choose another --output_dir")
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


def question_indices(n: int, per_step: int, seed: int, position: tuple[int, int]):
    """The next `per_step` training questions from data position (epoch, index), and the position after them; each
    epoch's order depends only on (seed, epoch), so a saved position resumes exactly."""
    epoch, index = position
    out = []
    while len(out) < per_step:
        order = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        take = order[index:index + per_step - len(out)]
        out, index = out + take, index + len(take)
        if index == n:
            epoch, index = epoch + 1, 0
    return out, (epoch, index)


def compute_rewards(texts, completions, golds, ended, cfg) -> dict[str, torch.Tensor]:
    """Reward parts per completion (N,) and their weighted sum under "reward"."""
    parts = [grade.rewards(t, g, cfg.format, s) for t, g, s in zip(texts, golds, ended)]
    out = {k: torch.tensor([p[k] for p in parts]) for k in PARTS[1:]}
    out["reward"] = sum(float(w) * out[k] for w, k in zip(cfg.reward_weights.split(","), PARTS[1:]))
    return out


def advantages(rewards, lengths, kind: str, length_penalty: float = 0.0, eps: float = 1e-4):
    """One advantage per completion from rewards and lengths (P, G): centred within each group, divided by the
    group's std (n-1) or the whole batch's, then LPRO's -λ·(L - mean L)/(std L + ε). Also returns which groups
    had all rewards equal (P,)."""
    centred = rewards - rewards.mean(1, keepdim=True)
    adv = {"group": centred / (rewards.std(1, keepdim=True) + eps), "batch": centred / (rewards.std() + eps),
           "none": centred}[kind]
    if length_penalty:
        L = lengths.float()
        adv = adv - length_penalty * (L - L.mean(1, keepdim=True)) / (L.std(1, keepdim=True) + eps)
    return adv, rewards.std(1) == 0


def token_weights(lengths, active, loss_agg: str, max_new_tokens: int, totals=None):
    """The normalizer 1/D of each completion's tokens (N,), for the whole step: token, 1 / all active tokens;
    seq, 1 / (N_active · |o_i|); const, 1 / (N_active · max_new_tokens). Inactive completions weigh 0. `totals`:
    (N_active, active tokens) of the whole step when it spans several processes, else counted here."""
    n_seq, n_tokens = totals or (int(active.sum()), int(lengths[active].sum()))
    D = {"token": torch.tensor(max(n_tokens, 1)), "seq": max(n_seq, 1) * lengths.clamp(min=1),
         "const": torch.tensor(max(n_seq, 1) * max_new_tokens)}[loss_agg]
    return torch.where(active, 1 / D.float(), 0.0)


def own_tokens(completions, forced) -> torch.Tensor:
    """1 on the tokens the policy sampled, 0 on those the calculator wrote (no action of the policy, so no target),
    rows concatenated (Σ|o_i|,)."""
    masks = [torch.ones(len(c)) for c in completions]
    for mask, positions in zip(masks, forced):
        mask[positions] = 0
    return torch.cat(masks)


def clipped_objective(logp, old_logp, adv, eps_low: float, eps_high: float):
    """Per token min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A) and ρ; the log-ratio is clamped to ±20 before exp."""
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))
    return torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv), ratio


def k3(logp, ref_logp):
    """exp(ℓ_ref - ℓ) - (ℓ_ref - ℓ) - 1 >= 0: an unbiased, always positive estimate of KL(π || π_ref)."""
    d = ref_logp - logp
    return d.exp() - d - 1


def completion_logprobs(model, prompts, completions, temperature, device):
    """log π(o_t | q, o_<t) at `temperature` of every completion token, rows concatenated (Σ|o_i|,). The rows are
    right-padded prompt + completion; lm_head runs on the completion positions only (tinyreason.token_logprobs)."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    is_target = torch.zeros(len(prompts), T - 1, dtype=torch.bool)  # position t predicts token t + 1
    for row, (p, c) in enumerate(zip(prompts, completions)):
        ids[row, :len(p) + len(c)] = torch.tensor(p + c)
        mask[row, :len(p) + len(c)] = True
        is_target[row, len(p) - 1:len(p) + len(c) - 1] = True
    ids, mask, is_target = ids.to(device), mask.to(device), is_target.to(device)
    hidden = model.hidden(ids, mask)[:, :-1][is_target]  # (Σ|o_i|, D)
    return token_logprobs(model, hidden, ids[:, 1:][is_target], temperature)


@contextmanager
def adapter_swapped(model, tensors: dict):
    """The model with these LoRA tensors in place of its own, restored after: the reference policy costs no copy
    of the model, only of the adapter."""
    params = lora.lora_state_dict(model)
    own = {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(own[k])


@torch.no_grad()
def frozen_logprobs(model, prompts, completions, cfg, device, autocast):
    """Per-row log-probs from a training forward with dropout off and no graph: ℓ_old, or ℓ_ref in a swap."""
    model.eval()
    out = []
    for i in range(0, len(prompts), cfg.micro_batch_size):
        with autocast:
            logp = completion_logprobs(model, prompts[i:i + cfg.micro_batch_size],
                                       completions[i:i + cfg.micro_batch_size], cfg.temperature, device)
        out += logp.float().split([len(c) for c in completions[i:i + cfg.micro_batch_size]])
    model.train()
    return out


def policy_update(model, optimizer, scaler, params, batch, cfg, device, autocast, lr) -> dict:
    """ppo_epochs optimizer steps over the active completions of one rollout; returns the step's statistics."""
    prompts, completions, adv, w = batch["prompts"], batch["completions"], batch["adv"], batch["weight"]
    old, ref = batch.get("old"), batch.get("ref")
    forced = batch.get("forced", [[]] * len(completions))
    stats = dict(clip_low=0.0, clip_high=0.0, kl=0.0, ratio=0.0)
    for _ in range(cfg.ppo_epochs):
        for i in range(0, len(prompts), cfg.micro_batch_size):
            rows = slice(i, i + cfg.micro_batch_size)
            lengths = torch.tensor([len(c) for c in completions[rows]])
            with autocast:
                logp = completion_logprobs(model, prompts[rows], completions[rows], cfg.temperature, device).float()
            a = adv[rows].repeat_interleave(lengths).to(device)  # each completion's advantage on its tokens
            old_logp = logp.detach() if old is None else torch.cat(old[rows])
            objective, ratio = clipped_objective(logp, old_logp, a, cfg.eps_low, cfg.eps_high)
            per_token = -objective
            if cfg.beta:
                kl = k3(logp, torch.cat(ref[rows]))
                per_token = per_token + cfg.beta * kl
                stats["kl"] += float(kl.detach().sum())
            weight = w[rows].repeat_interleave(lengths) * own_tokens(completions[rows], forced[rows])
            scaler.scale((per_token * weight.to(device)).sum()).backward()
            stats["clip_low"] += float(((ratio < 1 - cfg.eps_low) & (a < 0)).sum())
            stats["clip_high"] += float(((ratio > 1 + cfg.eps_high) & (a > 0)).sum())
            stats["ratio"] += float(ratio.detach().sum())
        loop.sum_gradients(params)
        grad_norm = loop.optimizer_step(optimizer, scaler, params, cfg.max_grad_norm, lr)
    *sums, n_tokens = loop.all_ranks_sum(*stats.values(), sum(map(len, completions)) * cfg.ppo_epochs)
    return {**{k: v / max(n_tokens, 1) for k, v in zip(stats, sums)}, "grad_norm": grad_norm}


def rl_step(model, tokenizer, optimizer, scaler, params, questions, ref_tensors, cfg, step, device, autocast, lr):
    """Rollout, rewards, advantages and the policy update of one step; returns its statistics and one sample."""
    G, t0 = cfg.group_size, time.time()
    prompts = [data.prompt_ids(tokenizer, q["question"], cfg.format) for q in questions]
    model.eval()
    generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step)
    forced = []  # the positions the calculator wrote in each completion
    completions = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, top_p=1.0,
                           num_samples=G, keep_stop=True, generator=generator, calculator=cfg.calculator,
                           forced=forced)
    model.train()
    ended = [stopped(c, tokenizer) for c in completions]
    texts = [tokenizer.decode(c) for c in completions]
    golds = [data.gold_answer(q) for q in questions for _ in range(G)]
    r = compute_rewards(texts, completions, golds, ended, cfg)
    lengths = torch.tensor([len(c) for c in completions])
    adv, zero_std = advantages(r["reward"].view(-1, G), lengths.view(-1, G), cfg.advantage, cfg.length_penalty)
    active = lengths > 0
    if cfg.zero_std == "drop":
        active &= ~zero_std.repeat_interleave(G)
    if cfg.mask_truncated:
        active &= torch.tensor(ended)
    t_gen, t1 = time.time() - t0, time.time()

    keep = active.nonzero().squeeze(1).tolist()  # only what trains is forwarded again
    targets = lengths - torch.tensor([len(f) for f in forced])  # the calculator's tokens are no targets
    totals = loop.all_ranks_sum(len(keep), int(targets[active].sum()))  # the step's, over all processes
    batch = {"prompts": [prompts[i // G] for i in keep], "completions": [completions[i] for i in keep],
             "forced": [forced[i] for i in keep], "adv": adv.flatten()[keep],
             "weight": token_weights(targets, active, cfg.loss_agg, cfg.max_new_tokens, totals)[keep]}
    if keep and cfg.ppo_epochs > 1:
        batch["old"] = frozen_logprobs(model, batch["prompts"], batch["completions"], cfg, device, autocast)
    if keep and cfg.beta:
        with adapter_swapped(model, ref_tensors):
            batch["ref"] = frozen_logprobs(model, batch["prompts"], batch["completions"], cfg, device, autocast)
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
def held_out_accuracy(model, tokenizer, records, cfg, batch_size=16) -> tuple[float, float]:
    """Greedy accuracy and strict-format rate on held-out questions, read by the rewards' own grader."""
    model.eval()
    parts, records = [], records[loop.RANK::loop.WORLD]  # this process's share
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        prompts = [data.prompt_ids(tokenizer, q["question"], cfg.format) for q in chunk]
        for q, c in zip(chunk, generate(model, tokenizer, prompts, cfg.max_new_tokens, keep_stop=True,
                                        calculator=cfg.calculator)):
            parts.append(grade.rewards(tokenizer.decode(c), data.gold_answer(q), cfg.format, stopped(c, tokenizer)))
    model.train()
    correct, fmt, n = loop.all_ranks_sum(sum(p["correct"] for p in parts), sum(p["format"] for p in parts), len(parts))
    return correct / n, fmt / n


def reference_tensors(model, cfg) -> dict:
    """The starting policy for the KL: the starting adapter's tensors (kept frozen, also across a resume), or
    B = 0 (the base alone) for a fresh adapter."""
    from safetensors.torch import load_file
    own = lora.lora_state_dict(model)
    if cfg.adapter == "none":
        return {k: torch.zeros_like(p) if ".lora_B." in k else p.detach().clone() for k, p in own.items()}
    saved = load_file(Path(cfg.adapter) / "adapter_model.safetensors")
    return {k: saved[k].to(p.device) for k, p in own.items()}


def setup(cfg: RLConfig):
    """Resolve model, precision and optimizer into cfg, load questions, the model with its adapter and the optimizer."""
    flags = SimpleNamespace(adapter=cfg.adapter, model=cfg.model or None, quantize=cfg.quantize, device=cfg.device,
                            dtype=cfg.dtype, calculator=cfg.calculator)
    adapter, _ = resolve_model_flags(flags)
    device, dtype = flags.device, flags.dtype
    cfg.model, cfg.device, cfg.dtype, cfg.calculator = flags.model, device.type, dtype_name(dtype), flags.calculator
    cfg.optim = loop.resolve_optim(cfg.optim, device)
    resolve_checkpoint(cfg.model)
    records = [r for r in data.load_records(cfg.data) if isinstance(r.get("question"), str) and data.gold_answer(r)]
    train_q, eval_q = records[:len(records) - cfg.eval_samples], records[len(records) - cfg.eval_samples:]
    if cfg.zone:  # distill.py's difficulty counts; one entry per question
        lo, hi = map(int, cfg.zone.split(","))
        train_q = list({q["question"]: q for q in train_q if lo <= q.get("n_correct", -1) <= hi}.values())
    if len(train_q) < cfg.prompts_per_step:
        raise ValueError(f"--data {cfg.data}: {len(train_q)} usable questions after holding out {cfg.eval_samples}")
    log(f"data: {len(train_q)} training questions, {len(eval_q)} held out (the last records of {cfg.data})")
    log(json.dumps(asdict(cfg), indent=2))
    model = load_base(cfg.model, dtype, device, cfg.quantize)
    if cfg.resume:
        lora.load_adapter(model, cfg.resume)
    elif adapter is not None:
        lora.load_adapter(model, adapter)
    else:
        lora.inject(model, lora.TARGETS, cfg.lora_r, cfg.lora_alpha)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    log(lora.trainable_report(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = loop.make_optimizer(params, cfg.optim, cfg.learning_rate, cfg.weight_decay)
    return model.train(), Tokenizer.from_pretrained(cfg.model), train_q, eval_q, params, optimizer, device, dtype


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
    state = {"step": 0, "position": (0, 0), "rewards": {}, "accuracy": {}}
    if cfg.resume:
        state = loop.load_training_state(Path(cfg.resume), optimizer, scaler)
        log(f"resumed from {cfg.resume} at step {state['step']}")
    checkpoints = loop.Checkpoints(cfg.output_dir, cfg.save_total_limit, maximize=True)
    metrics = loop.Metrics(cfg, state["step"])
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="rl", dynamic_ncols=True, disable=rank != 0)
    with loop.StopAtStepBoundary() as stop:
        for step in range(state["step"], cfg.max_steps):
            picked, position = question_indices(len(train_q), cfg.prompts_per_step, cfg.seed, state["position"])
            s, sample = rl_step(model, tokenizer, optimizer, scaler, params, [train_q[i] for i in picked[rank::world]],
                                ref_tensors, cfg, step, device, autocast, loop.get_lr(step, cfg))
            state.update(step=step + 1, position=position)
            state["rewards"][step + 1] = s["reward"]
            metrics.log(step + 1, **s)
            bar.update()
            bar.set_postfix(reward=f"{s['reward']:.3f}", acc=f"{s['correct']:.2f}")
            log(f"step {step + 1}/{cfg.max_steps} | reward {s['reward']:.3f} (correct {s['correct']:.2f} format "
                f"{s['format']:.2f} reasoning {s['reasoning']:.2f}) | zero-std {s['frac_zero_std']:.2f} | len "
                f"{s['len_mean']:.0f}/{s['len_max']} | trunc {s['truncated']:.2f} | clip {s['clip_low']:.3f}/"
                f"{s['clip_high']:.3f} | kl {s['kl']:.4f} | ρ {s['ratio']:.3f} | grad norm {s['grad_norm']:.3f} | "
                f"lr {s['lr']:.2e} | gen {s['t_gen']:.1f}s ref {s['t_ref']:.1f}s update {s['t_update']:.1f}s | "
                f"peak {s['peak_gb']:.2f} GB")
            done = state["step"] == cfg.max_steps
            if state["step"] % cfg.logging_steps == 0:
                log(f"sample completion:\n{sample}\n")
            if eval_q and (state["step"] % cfg.eval_steps == 0 or done):
                acc, fmt = held_out_accuracy(model, tokenizer, eval_q, cfg)
                state["accuracy"][state["step"]] = acc
                metrics.log(state["step"], accuracy=acc, eval_format=fmt)
                log(f"step {state['step']}: held-out accuracy {acc:.3f} ({round(acc * len(eval_q))}/{len(eval_q)}), "
                    f"format {fmt:.2f}")
            loop.save_or_stop(checkpoints, stop, state["step"] % cfg.save_steps == 0 or done, "rl.py", model,
                              optimizer, scaler, state, cfg, state["accuracy"])
    bar.close()
    best = checkpoints.export_best(cfg.adapter_path, cfg, state["accuracy"])
    log(f"adapter of step {best} (held-out accuracy {state['accuracy'].get(best, float('nan')):.3f}) -> "
        f"{cfg.adapter_path} | peak memory {loop.peak_memory_gb(device):.2f} GB")
    return state


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # bad flags, files or data, no network: the message alone says what to do
        raise SystemExit(f"rl.py: {e}")
