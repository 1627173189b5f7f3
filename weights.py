"""A checkpoint's tensors, read from its safetensors files by hand. Safetensors is 8 bytes of header length, that much
JSON (each tensor's dtype, shape and byte range), then the raw tensor bytes: nothing in it runs, nothing is unpickled.

Named trick: each tensor is read straight into its own memory, not memory-mapped as safetensors.safe_open does, whose
pages count as resident beside the copies (a CPU load peak 0.7 GB lower for the 0.5B: docs/results.md).
"""
import json
from functools import partial
from pathlib import Path

import torch

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def checkpoint_tensors(folder: Path) -> dict:
    """name -> a function reading that tensor, for a single or sharded safetensors checkpoint."""
    index = folder / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for name in names:
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{folder}: no {name}" + (" (listed in model.safetensors.index.json)" * index.exists()))
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
        header.pop("__metadata__", None)
        tensors |= {key: partial(read_tensor, path, key, h, 8 + n) for key, h in header.items()}
    return tensors


def read_tensor(path: Path, key: str, h: dict, data_start: int) -> torch.Tensor:
    dtype = DTYPES.get(h["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: tensor {key} is {h['dtype']}, expected BF16, F16 or F32")
    t = torch.empty(h["shape"], dtype=dtype)
    start, end = h["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + start)
        if t.numel() * t.element_size() != end - start or f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - start:
            raise ValueError(f"{path}: tensor {key} is cut short or does not match its shape {h['shape']}")
    return t
