"""What train.py's SFT and rl.py's RL share: torchrun, seeding, the schedule, precision and the optimizer step,
metrics.jsonl, the common config fields and their checks, and `run`, the loop itself (resume, evaluations,
checkpoints, Ctrl-C at a step boundary). Each script brings only its own step and evaluation.
"""
import atexit
import contextlib
import importlib.util
import json
import math
import os
import random
import resource
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import data
import lora
from load import DEFAULT_ADAPTER, DEFAULT_MODEL
from tinyreason import Config

RANK, WORLD = 0, 1  # this process's rank and the number of processes (torchrun), set by init_distributed
MAX_SKIPPED = 20  # non-finite gradients in a row that stop a run: fp16's scaler halves at most 16 times from 2^16


def log(message: str):
    """Print above the progress bar, from rank 0 only."""
    if RANK == 0:
        tqdm.write(message)


def init_distributed() -> tuple[int, int]:
    """Under torchrun join the process group (NCCL, one GPU per process; gloo on CPUs); alone, rank 0 of 1."""
    global RANK, WORLD
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(dist.destroy_process_group)  # its threads stopped before exit, not torn down mid-exit
        RANK, WORLD = dist.get_rank(), dist.get_world_size()
    return RANK, WORLD


def all_ranks_sum(*values: float, op=dist.ReduceOp.SUM) -> list[float]:
    """A few numbers summed (or reduced by `op`) over all processes."""
    if WORLD == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op)
    return t.tolist()


def seed_everything(seed: int):
    os.environ["PYTHONHASHSEED"] = str(seed)  # reaches subprocesses (this process fixed its hash seed at start)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def get_lr(step: int, cfg) -> float:
    """Step `step`'s (0-based) learning rate: linear warmup to the peak at warmup_steps - 1, then linear decay
    towards 0 at max_steps; no step runs at lr 0."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    return cfg.learning_rate * (cfg.max_steps - step) / (cfg.max_steps - cfg.warmup_steps)


def resolve_optim(name: str, device: torch.device) -> str:
    return name if name != "auto" else ("adamw_8bit" if device.type == "cuda" else "adamw")


def trainable(model, cfg):
    """The model set to train, its trainable (fp32 LoRA) parameters and cfg.optim over them, all with weight decay
    (no bias or norm trains)."""
    model.gradient_checkpointing = cfg.gradient_checkpointing
    log(lora.trainable_report(model))
    params = [p for p in model.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW
    if cfg.optim == "adamw_8bit":
        import bitsandbytes as bnb  # 8-bit Adam states: a quarter of the optimizer memory
        adamw = bnb.optim.AdamW8bit
    return model.train(), params, adamw(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def amp(device: torch.device, dtype: torch.dtype):
    """(autocast, grad scaler): matmuls in `dtype`, LoRA weights fp32; fp16 gradients need scaling not to underflow."""
    return (torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
            torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def optimizer_step(optimizer, scaler, params, max_grad_norm: float, lr: float) -> float:
    """Sum the gradients over all processes, unscale, clip, step at `lr` (skipped when the gradient is not finite),
    zero the gradients. Returns the gradient norm before clipping."""
    if WORLD > 1:  # one flat all_reduce of the LoRA gradients; each loss was divided by the whole step's normalizer
        grads = [p.grad if p.grad is not None else p.new_zeros(p.shape) for p in params]  # a process with no sample
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for p, g, chunk in zip(params, grads, flat.split([g.numel() for g in grads])):
            p.grad = chunk.view_as(g)
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.unscale_(optimizer)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if np.isfinite(grad_norm):
        scaler.step(optimizer)
    scaler.update()  # after an overflow this lowers the scale
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # peak resident memory


class Metrics:
    """output_dir/metrics.jsonl: a JSON line of figures per step and per evaluation, also sent to --report_to. A
    resumed run first drops the lines past its checkpoint, so no step appears twice."""

    def __init__(self, cfg, resumed_step: int = 0):
        self.path, self.report = Path(cfg.output_dir) / "metrics.jsonl", None
        if RANK != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            lines = data.read_appended(self.path, log)
            if bad := next((n for n, line in enumerate(lines, 1) if type(line.get("step")) is not int), None):
                raise ValueError(f"{self.path}: line {bad} has no step number, it is not a line this run wrote")
            kept = [line for line in lines if line["step"] <= resumed_step]
            data.replace_text(self.path, "".join(json.dumps(line) + "\n" for line in kept))
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.report = SummaryWriter(Path(cfg.output_dir) / "tensorboard").add_scalar
        elif cfg.report_to == "wandb":
            import wandb
            wandb.init(project="tinyreason", config=asdict(cfg), dir=cfg.output_dir)
            self.report = lambda key, value, step: wandb.log({key: value}, step=step)

    def log(self, step: int, **figures):
        if RANK != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **figures}) + "\n")
        for key, value in figures.items():
            if self.report and isinstance(value, (int, float)):
                self.report(key, value, step)


@dataclass
class LoopConfig:
    """The fields both loops have, with the SFT recipe's defaults; train.py's and rl.py's configs add their own."""
    model: str = DEFAULT_MODEL  # hub repo id or local Hugging Face checkpoint folder
    task: str = "gsm8k"  # gsm8k, math, or your own task's file path/to/task.py (docs/tasks.md)
    data: str = ""  # hub dataset or local .jsonl/.json/.parquet of the task's records; empty: the task's own
    quantize: Literal["nf4", "none"] = "nf4"  # base weights: nf4 (QLoRA) or none (16-bit LoRA)
    lora_r: int = 16  # rank of a new adapter
    lora_alpha: float = 32  # a new adapter's update is scaled by lora_alpha / lora_r
    target_modules: tuple[str, ...] = ()  # a new adapter's projections, e.g. q_proj v_proj; empty: all of them
    max_steps: int = 250  # optimizer steps
    warmup_steps: int = 50  # linear warmup, then linear decay to 0 at max_steps
    learning_rate: float = 2e-4  # peak learning rate
    weight_decay: float = 0.01  # decoupled (AdamW) decay of the LoRA matrices
    max_grad_norm: float = 1.0  # clip the global gradient norm to this
    optim: Literal["auto", "adamw", "adamw_8bit"] = "auto"  # adamw_8bit (bitsandbytes) or adamw; auto: 8-bit on CUDA
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 where supported, else fp16 (GPU) or fp32
    device: str = "auto"  # cuda, cpu, ...; auto: cuda when available
    gradient_checkpointing: bool = True  # recompute each block's activations in backward: less memory, slower
    eval_steps: int = 50  # held-out evaluation every this many steps (also before the first and after the last)
    save_steps: int = 50  # checkpoint every this many steps (and at the end)
    save_total_limit: int = 3  # newest checkpoints kept; the best by the held-out score is never deleted
    logging_steps: int = 10  # a log line every this many steps
    report_to: Literal["none", "tensorboard", "wandb"] = "none"  # also send the metrics.jsonl figures there
    seed: int = 3407  # seeds Python, NumPy and torch: the data order, a new adapter, the sampling
    output_dir: str = "outputs"  # checkpoints and metrics.jsonl go here
    adapter_path: str = DEFAULT_ADAPTER  # the best adapter by the held-out score + experiment_config.json end up here
    resume: str = ""  # a checkpoint folder, or latest (bare --resume) in output_dir, to continue from


def config_problems(cfg, positive=(), nonnegative=()) -> list[str]:
    """What argparse cannot see wrong in the common fields and a script's own `positive` and `nonnegative` ones."""
    positive = ("max_steps", "learning_rate", "lora_r", "eval_steps", "save_steps", "save_total_limit",
                "logging_steps", *positive)
    problems = [f"--{k} must be > 0 (got {getattr(cfg, k)})" for k in positive if getattr(cfg, k) <= 0]
    problems += [f"--{k} must be >= 0 (got {getattr(cfg, k)})" for k in
                 ("warmup_steps", "weight_decay", "max_grad_norm", *nonnegative) if getattr(cfg, k) < 0]
    problems += [f"--{f.name} must be a finite number (got {getattr(cfg, f.name)})" for f in fields(cfg)
                 if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name))]
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:  # the package has its name
        problems.append(f"--report_to {cfg.report_to}: the {cfg.report_to} package is not installed "
                        f"(pip install {cfg.report_to}), or use --report_to none")
    if cfg.data and data.is_local(cfg.data) and not Path(cfg.data).is_file():  # empty: the task's own
        problems.append(f"--data {cfg.data}: no such file")
    if Path(cfg.output_dir).is_file():
        problems.append(f"--output_dir {cfg.output_dir} is a file, not a folder")
    elif not cfg.resume and checkpoint.Checkpoints(cfg.output_dir).saved():
        problems.append(f"--output_dir {cfg.output_dir} already holds checkpoints: continue them with --resume, "
                        "or choose another --output_dir")
    if holder := checkpoint.RunLock(cfg.output_dir).holder():
        problems.append(f"--output_dir {cfg.output_dir} is in use by {holder}; wait for it, or choose another")
    inputs = {"--data": cfg.data, "--model": cfg.model, "--adapter": getattr(cfg, "adapter", "")}
    for flag in ("output_dir", "adapter_path"):
        if problem := checkpoint.overlap(f"--{flag}", getattr(cfg, flag), inputs):
            problems.append(problem)
    if not checkpoint.replaceable(Path(cfg.adapter_path)):
        problems.append(f"--adapter_path {cfg.adapter_path} exists and is not an adapter an earlier run exported: it "
                        "would be replaced, so choose another --adapter_path")
    return problems


def check_target_modules(cfg, folder: Path):
    """--target_modules against the projections of the checkpoint in `folder`, from its config.json alone."""
    if cfg.target_modules:
        lora.check_targets(Config.from_json(folder / "config.json"), cfg.target_modules)


class StopAtStepBoundary:
    """Ctrl-C sets a flag read between steps, so a checkpoint never holds half a step (RNG states drawn mid-step,
    weights updated under the old step number). A second Ctrl-C stops at once, without saving."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self.request)
        return self

    def request(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("Ctrl-C: stopping after this step (press again to stop at once, without saving)")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def run(cfg, script: str, model, optimizer, scaler, state: dict, train_step, evaluate=None, *, score: str,
        maximize: bool = False, shown: tuple[str, ...] = (), save_adapter=lora.save_adapter) -> dict:
    """Steps from state["step"] to cfg.max_steps, evaluating before the first step, every eval_steps and at the end,
    saving every save_steps and at the end; then the checkpoint with the best `score` (lower is better unless
    maximize) becomes adapter_path.

    train_step(step) and evaluate() (None: no held-out data) return figures and a log line (or None). `state`, saved
    with each checkpoint and returned, holds "step", the script's data position and a {step: value} dict per figure
    kept, e.g. {"loss": {1: 2.3}}. shown: the progress bar's figures.
    """
    lock = checkpoint.RunLock(cfg.output_dir) if RANK == 0 else contextlib.nullcontext()  # one run per folder
    with lock:
        if RANK == 0:  # what a killed save, prune or export left
            checkpoint.clean_leftovers(Path(cfg.output_dir))
            checkpoint.clean_leftovers(Path(cfg.adapter_path).parent, Path(cfg.adapter_path).name)
        log(json.dumps(asdict(cfg), indent=2))  # the resolved config, as experiment_config.json records it
        if cfg.resume:
            state.update(checkpoint.load_training_state(Path(cfg.resume), optimizer, scaler))
            log(f"resumed from {cfg.resume} at step {state['step']}")
        checkpoints = checkpoint.Checkpoints(cfg.output_dir, cfg.save_total_limit, maximize, save_adapter)
        metrics = Metrics(cfg, state["step"])

        def record(figures: dict):
            metrics.log(state["step"], **figures)
            for name in figures.keys() & state.keys():
                state[name][state["step"]] = figures[name]

        if evaluate and state["step"] == 0:  # the start's score: the origin of the curve (no checkpoint to export)
            figures, line = evaluate()
            metrics.log(0, **figures)
            log(f"step 0: {line}")
        bar = tqdm(total=cfg.max_steps, initial=state["step"], desc=script, dynamic_ncols=True, disable=RANK != 0)
        skipped = 0  # non-finite gradients in a row
        with StopAtStepBoundary() as stop:
            for step in range(state["step"], cfg.max_steps):
                figures, line = train_step(step)
                state["step"] = step + 1
                record(figures)
                skipped = 0 if math.isfinite(figures.get("grad_norm", 0.0)) else skipped + 1
                if skipped == MAX_SKIPPED:
                    raise ValueError(f"steps {step + 2 - skipped}-{step + 1} all had non-finite gradients: the run "
                                     f"diverged; the last checkpoint is {checkpoints.newest()} (lower --learning_rate "
                                     "and --resume from it)")
                bar.set_postfix({k: f"{figures[k]:.4g}" for k in shown}, refresh=False)
                bar.update()
                if line:
                    log(line)
                done = state["step"] == cfg.max_steps
                if evaluate and (state["step"] % cfg.eval_steps == 0 or done):
                    figures, line = evaluate()
                    record(figures)
                    log(f"step {state['step']}: {line}")
                stop.requested = all_ranks_sum(stop.requested)[0] > 0  # every process stops after the same step
                if stop.requested or state["step"] % cfg.save_steps == 0 or done:
                    log(f"saved {checkpoints.save(model, optimizer, scaler, state, cfg, state[score])}")
                if stop.requested:
                    log(f"stopped after step {state['step']}: continue with python {script} --resume --output_dir "
                        f"{cfg.output_dir}")
                    raise SystemExit(130)
        bar.close()
        best = checkpoints.export_best(cfg.adapter_path, cfg, state[score])
        log(f"adapter of step {best} ({score} {state[score].get(best, float('nan')):.4g}) -> {cfg.adapter_path} | "
            f"peak memory {peak_memory_gb(torch.device(cfg.device)):.2f} GB")
        return state
