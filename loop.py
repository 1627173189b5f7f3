"""What both training loops (train.py's SFT, rl.py's RL) run on: flags from a config dataclass, seeding, the
learning-rate schedule, precision and the optimizer step, checkpoints with exact resume, and Ctrl-C that stops
at a step boundary.

A checkpoint, output_dir/checkpoint-NNNNNN, holds the adapter (PEFT format), experiment_config.json (the run's
resolved config) and training_state.pt: optimizer, grad scaler, RNG states and the loop's own state, all tensors
and plain data, so it loads with torch.load(weights_only=True) and nothing in the file is ever executed.
"""
import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import signal
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import lora

RANK, WORLD = 0, 1  # this process's rank and the number of processes (torchrun), set by init_distributed


def log(message: str):
    """Print above the progress bar, from rank 0 only."""
    if RANK == 0:
        tqdm.write(message)


def init_distributed() -> tuple[int, int]:
    """Under torchrun (its RANK, WORLD_SIZE and LOCAL_RANK variables) join the process group, NCCL on GPUs and gloo
    on CPUs, one GPU per process; alone, rank 0 of 1. Each process holds the whole (NF4) model; only the LoRA
    gradients travel, summed by one all_reduce per optimizer step (sum_gradients)."""
    global RANK, WORLD
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        RANK, WORLD = dist.get_rank(), dist.get_world_size()
    return RANK, WORLD


def all_ranks_sum(*values: float, op=dist.ReduceOp.SUM) -> list[float]:
    """The sums (or another reduction) over all processes of a few numbers (themselves when alone)."""
    if WORLD == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op)
    return t.tolist()


def sum_gradients(params):
    """Sum each gradient over all processes in one flat all_reduce. Every process scaled its loss by the whole
    step's normalizer, so the sum is the gradient one process would get from the whole step."""
    if WORLD == 1:
        return
    grads = [p.grad if p.grad is not None else p.new_zeros(p.shape) for p in params]  # a process with no sample
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for p, g, chunk in zip(params, grads, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(g)


def parse_config(cls, argv=None, fixed_on_resume=(), description=None):
    """Flags generated from the dataclass `cls`; --config FILE.json sets fields that flags then override.
    With --resume (bare: latest) the checkpoint's own experiment_config.json is the base; a flag given again may
    change it except for the fields in `fixed_on_resume`, which would make the resumed run another run."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)  # only the flags given appear
    parser.add_argument("--config", help="JSON file of config fields")
    for f in fields(cls):
        kind = ({"action": argparse.BooleanOptionalAction} if f.type is bool else
                {"nargs": "+"} if f.type == tuple[str, ...] else
                {"nargs": "?", "const": "latest"} if f.name == "resume" else {"type": f.type})
        parser.add_argument(f"--{f.name}", help=f"default: {f.default}", **kind)
    values = vars(parser.parse_args(argv))
    if "config" in values:
        values = {**read_config(cls, values.pop("config"), parser.error), **values}
    if not values.get("resume"):
        return make_config(cls, values)
    folder = resume_folder(values["resume"], values.get("output_dir", cls.output_dir))
    saved = make_config(cls, read_config(cls, folder / "experiment_config.json", parser.error))
    cfg = make_config(cls, {**asdict(saved), **values, "resume": str(folder)})
    if changed := [f"--{k} {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in fixed_on_resume
                   if getattr(cfg, k) != getattr(saved, k)]:
        parser.error(f"--resume {folder}: these would make it another run, not a continuation: {', '.join(changed)}")
    return cfg


def read_config(cls, path, error) -> dict:
    path = Path(path)
    if not path.is_file():
        error(f"{path}: no such file")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        error(f"{path}: not valid JSON ({e})")
    if not isinstance(values, dict) or (unknown := sorted(set(values) - {f.name for f in fields(cls)})):
        error(f"{path}: unknown fields {unknown if isinstance(values, dict) else values!r}")
    return values


def make_config(cls, values: dict):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def save_config(cfg, path: Path):
    path.write_text(json.dumps(asdict(cfg), indent=2))


def seed_everything(seed: int):
    os.environ["PYTHONHASHSEED"] = str(seed)  # reaches subprocesses (this process fixed its hash seed at start)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def get_lr(step: int, cfg) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to the peak, reached at step
    warmup_steps - 1, then linear decay towards 0 at max_steps. No step runs at lr 0."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    return cfg.learning_rate * (cfg.max_steps - step) / (cfg.max_steps - cfg.warmup_steps)


def resolve_optim(name: str, device: torch.device) -> str:
    return name if name != "auto" else ("adamw_8bit" if device.type == "cuda" else "adamw")


def make_optimizer(params, name: str, lr: float, weight_decay: float):
    if name == "adamw_8bit":
        import bitsandbytes as bnb  # 8-bit Adam states: a quarter of the optimizer memory
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def amp(device: torch.device, dtype: torch.dtype):
    """(autocast context, grad scaler): the LoRA weights stay fp32, the matmuls run in `dtype`; fp16 gradients
    underflow unscaled, so fp16 gets a scaler that skips steps whose gradients overflow."""
    return (torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
            torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def optimizer_step(optimizer, scaler, params, max_grad_norm: float, lr: float) -> float:
    """Unscale, clip, step at `lr` (or skip the update when the gradient is not finite), zero the gradients.
    Returns the gradient norm before clipping."""
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


class StopAtStepBoundary:
    """Ctrl-C sets a flag that the loop reads between steps: it saves the last finished step and exits, so a
    checkpoint never holds half a step (RNG states drawn mid-step, weights updated under the old step number).
    A second Ctrl-C stops at once, without saving."""

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


def save_or_stop(checkpoints, stop: StopAtStepBoundary, due: bool, script: str, model, optimizer, scaler,
                 state: dict, cfg, scores: dict):
    """At the end of a step: save a checkpoint when one is due or Ctrl-C asked to stop; then stop, with the command
    that continues the run."""
    stop.requested = all_ranks_sum(stop.requested)[0] > 0  # every process stops after the same step
    if due or stop.requested:
        path = checkpoints.save(model, optimizer, scaler, state, cfg, scores)
        log(f"saved {path}")
    if stop.requested:
        log(f"stopped after step {state['step']}: continue with python {script} --resume --output_dir {cfg.output_dir}")
        raise SystemExit(130)


class Metrics:
    """output_dir/metrics.jsonl: one JSON line per step and per evaluation with every figure of the log line and the
    wall time; --report_to tensorboard or wandb sends the same figures there. A resumed run first drops the lines
    past its checkpoint's step, so the file never holds a step twice."""

    def __init__(self, cfg, resumed_step: int = 0):
        self.path, self.report = Path(cfg.output_dir) / "metrics.jsonl", None
        if RANK != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            self.path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= resumed_step))
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


def check_report_to(report_to: str) -> list[str]:
    """The problem with --report_to, if any, found before anything loads."""
    if report_to not in ("none", "tensorboard", "wandb"):
        return [f"--report_to {report_to!r}: expected none, tensorboard or wandb"]
    if report_to != "none" and importlib.util.find_spec(report_to) is None:  # the package has the option's name
        return [f"--report_to {report_to}: the {report_to} package is not installed (pip install {report_to}), "
                "or use --report_to none"]
    return []


def rng_state() -> dict:
    """Every RNG the loop draws from, as tensors and plain data (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss], "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                             has_gauss, cached],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict):
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_folder(resume: str, output_dir) -> Path:
    """--resume latest (the newest checkpoint in output_dir) or a checkpoint folder."""
    if resume == "latest":
        if not (saved := Checkpoints(output_dir).saved()):
            raise FileNotFoundError(f"--resume latest: no checkpoint-* folder in {output_dir}")
        return saved[max(saved)]
    if not (Path(resume) / "training_state.pt").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no training_state.pt)")
    return Path(resume)


class Checkpoints:
    """The checkpoint-NNNNNN folders of output_dir. Each is written under a temporary name and renamed into place,
    so a reader (or a resume after a crash) never sees a partial one. Pruning keeps the newest and the best by
    `scores` (lower is better, or higher with maximize), and fills up to `limit` with the next newest."""

    def __init__(self, output_dir, limit: int = 1, maximize: bool = False, save_adapter=lora.save_adapter):
        self.dir, self.limit, self.maximize, self.save_adapter = Path(output_dir), limit, maximize, save_adapter

    def saved(self) -> dict[int, Path]:
        """step -> folder, oldest first."""
        return {int(p.name[11:]): p for p in sorted(self.dir.glob("checkpoint-[0-9]*"))}

    def best(self, scores: dict[int, float]) -> int:
        """The saved step with the best score; the newest when none was scored."""
        saved = self.saved()
        scored = [s for s in saved if s in scores]
        if not scored:
            return max(saved)
        return (max if self.maximize else min)(scored, key=scores.get)

    def save(self, model, optimizer, scaler, state: dict, cfg, scores: dict[int, float]) -> Path:
        """Called by every process: each one's RNG states are kept (rank 0 writes), so a resume with the same
        number of processes is exact."""
        final = self.dir / f"checkpoint-{state['step']:06d}"
        rngs = [rng_state()]
        if WORLD > 1:
            rngs = [None] * WORLD
            dist.all_gather_object(rngs, rng_state())
        if RANK != 0:
            dist.barrier()  # until rank 0 has written it
            return final
        tmp = final.with_name(".tmp-" + final.name)
        shutil.rmtree(tmp, ignore_errors=True)
        self.save_adapter(model, tmp, cfg.model)
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "state": state,
                    "rng": rngs}, tmp / "training_state.pt")
        save_config(cfg, tmp / "experiment_config.json")
        replace_folder(tmp, final)
        self.prune(scores)
        if WORLD > 1:
            dist.barrier()
        return final

    def prune(self, scores: dict[int, float]):
        saved = self.saved()
        keep = {max(saved), self.best(scores)}
        keep |= set(sorted(set(saved) - keep)[len(keep) - self.limit:] if self.limit > len(keep) else [])
        for step in set(saved) - keep:
            discard(saved[step])

    def export_best(self, adapter_path, cfg, scores: dict[int, float]) -> int:
        """Copy the best checkpoint's adapter to adapter_path, with the run's resolved config."""
        step = self.best(scores)
        if RANK != 0:
            return step
        out = Path(adapter_path)
        tmp = out.with_name(".tmp-" + out.name)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.saved()[step], tmp, ignore=shutil.ignore_patterns("training_state.pt"))
        save_config(cfg, tmp / "experiment_config.json")
        replace_folder(tmp, out)
        return step


def load_training_state(folder: Path, optimizer, scaler) -> dict:
    """Restore optimizer, scaler and RNG states from a checkpoint (saved on any device); returns the loop state."""
    saved = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])  # moves the states to the parameters' device
    scaler.load_state_dict(saved["scaler"])
    if len(saved["rng"]) != WORLD:
        raise ValueError(f"{folder} was saved by {len(saved['rng'])} processes: resume it with as many, not {WORLD}")
    set_rng_state(saved["rng"][RANK])
    return saved["state"]


def replace_folder(tmp: Path, final: Path):
    """Put a fully written `tmp` in place of `final` by renames, so a reader never sees a partial folder."""
    if final.exists():
        discard(final)
    os.replace(tmp, final)


def discard(folder: Path):
    trash = folder.with_name(".del-" + folder.name)  # renamed first: never listed half-deleted
    os.replace(folder, trash)
    shutil.rmtree(trash)
