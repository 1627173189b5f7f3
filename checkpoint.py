"""Checkpoints that resume exactly: output_dir/checkpoint-NNNNNN holds the adapter (PEFT format), the resolved
experiment_config.json and training_state.pt (optimizer, grad scaler, every process's RNG states, the loop's state),
tensors and plain data only, so it loads with torch.load(weights_only=True). Folders are renamed into place and
renamed away before deletion, so nobody ever sees a partial one.
"""
import errno
import json
import math
import os
import pickle
import random
import re
import shutil
import socket
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import lora

CONFIG_FILE = "experiment_config.json"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def processes() -> tuple[int, int]:
    """This process's rank and the number of processes, once loop.init_distributed has joined them."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class Checkpoints:
    """The checkpoint-NNNNNN folders of output_dir. Pruning keeps the newest and the best by `scores` (lower is
    better, or higher with maximize), and fills up to `limit` with the next newest."""

    def __init__(self, output_dir, limit: int = 1, maximize: bool = False, save_adapter=lora.save_adapter):
        self.dir, self.limit, self.maximize, self.save_adapter = Path(output_dir), limit, maximize, save_adapter

    def saved(self) -> dict[int, Path]:
        """step -> folder, oldest first."""
        return {int(m[1]): p for p in sorted(self.dir.glob("checkpoint-*")) if (m := CHECKPOINT.fullmatch(p.name))}

    def best(self, scores: dict[int, float]) -> int:
        """The saved step with the best finite score; the newest when none has one."""
        saved = self.saved()
        scored = [s for s in saved if math.isfinite(scores.get(s, math.nan))]
        if not scored:
            return max(saved)
        return (max if self.maximize else min)(scored, key=scores.get)

    def save(self, model, optimizer, scaler, state: dict, cfg, scores: dict[int, float]) -> Path:
        """Called by every process: rank 0 writes, with each one's RNG states, so a resume with as many is exact."""
        rank, world = processes()
        final = self.dir / f"checkpoint-{state['step']:06d}"
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        if rank != 0:
            dist.barrier()  # until rank 0 has written it
            return final
        if bad := [k for k, p in lora.lora_state_dict(model).items() if not torch.isfinite(p).all()]:
            raise ValueError(f"step {state['step']}: the adapter diverged ({bad[0]} holds non-finite values), so it "
                             f"was not saved; the last checkpoint is {self.newest()} (lower --learning_rate)")
        with written_in_place(final, cfg) as tmp:
            self.save_adapter(model, tmp, cfg.model)
            torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "state": state,
                        "rng": rngs}, tmp / "training_state.pt")
        self.prune(scores)
        if world > 1:
            dist.barrier()
        return final

    def newest(self) -> Path | None:
        saved = self.saved()
        return saved[max(saved)] if saved else None

    def prune(self, scores: dict[int, float]):
        saved = self.saved()
        keep = {max(saved), self.best(scores)}
        newest_first = sorted(set(saved) - keep, reverse=True)
        keep |= set(newest_first[:max(self.limit - len(keep), 0)])
        for step in set(saved) - keep:
            discard(saved[step])

    def export_best(self, adapter_path, cfg, scores: dict[int, float]) -> int:
        """Copy the best checkpoint's adapter to adapter_path, with the run's resolved config; returns its step."""
        step = self.best(scores)
        rank, world = processes()
        if rank == 0:
            with written_in_place(Path(adapter_path), cfg) as tmp:
                shutil.copytree(self.saved()[step], tmp, ignore=shutil.ignore_patterns("training_state.pt"))
        if world > 1:
            dist.barrier()  # every process ends with the export written, none exits while rank 0 still writes
        return step


@contextmanager
def written_in_place(final: Path, cfg):
    """A temporary folder to fill; with the run's config added and flushed to disk, it replaces `final` by renames.
    If writing fails, the temporary folder goes, and a full disk is named as such."""
    tmp = final.with_name(".tmp-" + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        (tmp / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2))
        for f in [*tmp.iterdir(), tmp]:  # on disk before the rename makes it visible: a crash leaves no torn file
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        full = getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(final.parent).free < 2 ** 26
        raise OSError(f"writing {final} failed: " + ("no space left on the device" if full else str(e))) from e
    if final.exists():
        discard(final)
    os.replace(tmp, final)


def replaceable(folder: Path) -> bool:
    """Whether an export may replace `folder`: it is not there, or it is an adapter an earlier export wrote (its
    adapter and config, no training state). Never the output_dir, a parent folder or a model."""
    return not folder.exists() or (folder.is_dir() and (folder / "adapter_config.json").is_file()
                                   and (folder / CONFIG_FILE).is_file() and not (folder / "training_state.pt").exists())


def clean_leftovers(folder: Path, name: str = "*"):
    """The .tmp-NAME and .del-NAME folders a killed save, prune or export left in `folder`."""
    for leftover in [*folder.glob(".tmp-" + name), *folder.glob(".del-" + name)]:
        shutil.rmtree(leftover, ignore_errors=True)


def overlap(flag: str, output, inputs: dict[str, str]) -> str | None:
    """The problem with writing `output` (given by `flag`) if it is, holds or lies inside one of the inputs
    (flag -> path): writing there could destroy it; or if it would lie inside a file. None if it touches none."""
    out = Path(output).resolve()
    if file := next((p for p in out.parents if p.is_file()), None):
        return f"{flag} {output}: {file} is a file, not a folder"
    for name, path in inputs.items():
        if path and Path(path).exists() and (out == (p := Path(path).resolve()) or out in p.parents or p in out.parents):
            return f"{flag} {output} is, holds or lies inside {name} {path}: writing there could destroy it"
    return None


class RunLock:
    """output_dir/.lock while a run writes there, naming its process and host; a lock whose process died is stale
    and taken over. A second run on the same folder is refused in one line."""

    def __init__(self, folder):
        self.path = Path(folder) / ".lock"

    def holder(self) -> str | None:
        """Who holds the lock, if a live process does."""
        try:
            owner = json.loads(self.path.read_text())
            if owner["host"] == socket.gethostname():
                os.kill(owner["pid"], 0)  # raises if no such process
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no lock, a torn one, or its process is gone
        return f"process {owner['pid']} on {owner['host']}"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a stale lock is removed once, then taken as a fresh one
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if holder := self.holder():
                    raise ValueError(f"--output_dir {self.path.parent} is in use by {holder}; wait for it, or choose "
                                     "another --output_dir") from None
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
            os.close(fd)
            return self
        raise ValueError(f"--output_dir {self.path.parent}: could not take {self.path}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def discard(folder: Path):
    trash = folder.with_name(".del-" + folder.name)  # renamed first: never listed half-deleted
    os.replace(folder, trash)
    shutil.rmtree(trash)


def resume_folder(resume: str, output_dir) -> Path:
    """--resume latest (the newest checkpoint in output_dir) or a checkpoint folder."""
    if resume == "latest":
        if not (saved := Checkpoints(output_dir).saved()):
            raise FileNotFoundError(f"--resume latest: no checkpoint-* folder in {output_dir}")
        return saved[max(saved)]
    if not (Path(resume) / "training_state.pt").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no training_state.pt)")
    return Path(resume)


def load_training_state(folder: Path, optimizer, scaler) -> dict:
    """Restore optimizer, scaler and RNG states from a checkpoint (saved on any device); returns the loop state."""
    rank, world, path = *processes(), folder / "training_state.pt"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])  # moves the states to the parameters' device
        scaler.load_state_dict(saved["scaler"])
        rngs, state = saved["rng"], saved["state"]
    except (EOFError, RuntimeError, pickle.UnpicklingError, KeyError, TypeError, ValueError):  # torn, or another file
        raise ValueError(f"{path}: not a training state of this run (cut short, or another file)") from None
    if len(rngs) != world:
        raise ValueError(f"{folder} was saved by {len(rngs)} processes: resume it with as many, not {world}")
    set_rng_state(rngs[rank])
    return state


def rng_state() -> dict:
    """Every RNG the loop draws from, as tensors and plain data (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, keys, *rest = np.random.get_state()  # keys: a uint32 array, which weights_only cannot load
    return {"python": [version, list(mt), gauss], "numpy": [name, torch.from_numpy(keys.astype(np.int64)), *rest],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict):
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
