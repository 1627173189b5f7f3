"""A checkpoint's files, checked as their formats specify before anything is built or allocated, and its tensors read
by hand. Safetensors is 8 bytes of header length, that much JSON (each tensor's dtype, shape and byte range), then the
raw tensor bytes: nothing in it runs, nothing is unpickled, and no file outside the checkpoint's folder is opened.

Named trick: each tensor is read straight into its own memory, not memory-mapped as safetensors.safe_open does, whose
pages count as resident beside the copies (a CPU load peak 0.7 GB lower for the 0.5B: docs/results.md).
"""
import json
import math
import reprlib
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
MAX_HEADER = 100_000_000  # bytes: the safetensors library's own limit

# A config field's rule: (test, what the value must be). An absent or null field is left to its default.
POSITIVE_INT = (lambda x: type(x) is int and x > 0, "a positive integer")  # type(): True is an int to isinstance
POSITIVE = (lambda x: type(x) in (int, float) and 0 < x < math.inf, "a positive number")
FINITE = (lambda x: type(x) in (int, float) and math.isfinite(x), "a finite number")
FRACTION = (lambda x: type(x) in (int, float) and 0 < x <= 1, "a number in (0, 1]")
PROBABILITY = (lambda x: type(x) in (int, float) and 0 <= x <= 1, "a number in [0, 1]")
BOOL = (lambda x: type(x) is bool, "true or false")
INTEGER = (lambda x: type(x) is int, "an integer")
TEXT = (lambda x: type(x) is str, "a string")
OBJECT = (lambda x: type(x) is dict, "a JSON object")
CONFIG_FIELDS = {  # what tinyreason.Config.from_json reads, the rope settings wherever transformers nests them
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "original_max_position_embeddings"), POSITIVE_INT),
    **dict.fromkeys(("rms_norm_eps", "layer_norm_eps", "rope_theta", "factor", "low_freq_factor", "high_freq_factor"),
                    POSITIVE),
    "partial_rotary_factor": FRACTION, "tie_word_embeddings": BOOL, "rope_scaling": OBJECT, "rope_parameters": OBJECT}


class Stored(NamedTuple):
    """A tensor of a safetensors file: its dtype, shape and byte range in the file, checked against one another."""
    path: Path
    dtype: torch.dtype
    shape: tuple
    start: int
    end: int

    def read(self) -> torch.Tensor:
        t = torch.empty(self.shape, dtype=self.dtype)
        with open(self.path, "rb") as f:
            f.seek(self.start)
            if f.readinto(t.view(-1).view(torch.uint8).numpy()) != self.end - self.start:
                raise ValueError(f"{self.path}: cut short since its header was read")
        return t


def checkpoint_tensors(folder: Path) -> dict[str, Stored]:
    """name -> Stored, for a single or sharded safetensors checkpoint: every header read and checked, no data."""
    index = inside(folder, "model.safetensors.index.json")
    shards = ["model.safetensors"]
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if type(weight_map) is not dict or not all(type(v) is str for v in weight_map.values()):
            raise ValueError(f"{index}: weight_map is not an object of tensor names to file names")
        shards = sorted(set(weight_map.values()))
    tensors = {}
    for name in shards:
        path = inside(folder, name)
        if not path.exists():
            listed = " (listed in model.safetensors.index.json)" * index.exists()
            raise FileNotFoundError(f"{folder}: no {name}{listed}")
        header = read_header(path)
        if twice := next((key for key in header if key in tensors), None):
            raise ValueError(f"{path}: tensor {twice} is also in {tensors[twice].path.name}")
        tensors |= header
    return tensors


def read_header(path: Path) -> dict[str, Stored]:
    """The tensors of a safetensors file, checked as the format specifies: a header of at most MAX_HEADER bytes of
    UTF-8 JSON, an object whose every entry is exactly dtype, shape and data_offsets under a name given once; each
    shape's size its byte range; the ranges tiling the data from the header's end to the file's, without overlap
    or gap."""
    def bad(why):
        return ValueError(f"{path}: not a safetensors file: {why}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER:
            raise bad(f"its header length {n:,} is over the format's limit of {MAX_HEADER:,} bytes")
        if 8 + n > size:
            raise bad(f"its header length {n:,} is past the end of the {size:,}-byte file")
        try:
            header = json.loads(f.read(n).decode(), object_pairs_hook=unique)
        except KeyError as e:
            raise bad(f"its header gives {e} twice") from None
        except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested too deep for the parser
            raise bad("its header is not JSON") from None
    if type(header) is not dict:
        raise bad("its header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and (type(meta) is not dict or not all(type(v) is str for v in meta.values())):
        raise bad("its __metadata__ is not an object of strings")
    tensors, ranges = {}, []
    for name, h in header.items():
        if type(h) is not dict or h.keys() != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name} is not an object of exactly dtype, shape and data_offsets")
        if (dtype := DTYPES.get(h["dtype"]) if type(h["dtype"]) is str else None) is None:
            raise ValueError(f"{path}: tensor {name} is {h['dtype']}, expected BF16, F16 or F32")
        shape, offsets = h["shape"], h["data_offsets"]
        if type(shape) is not list or len(shape) > 64 or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name}: shape {reprlib.repr(shape)} is not a list of at most 64 non-negative integers")
        if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int for o in offsets) \
                or not 0 <= offsets[0] <= offsets[1]:
            raise bad(f"tensor {name}: data_offsets {reprlib.repr(offsets)} are not two integers 0 <= begin <= end")
        if math.prod(d or 1 for d in shape) >= 2 ** 63:  # even beside a 0: torch's strides would overflow
            raise bad(f"tensor {name}: shape {shape} overflows 64 bits")
        if (nbytes := math.prod(shape) * dtype.itemsize) != offsets[1] - offsets[0]:
            raise bad(f"tensor {name}: shape {shape} of {h['dtype']} is {nbytes:,} bytes, its data_offsets {offsets} "
                      f"hold {offsets[1] - offsets[0]:,}")
        tensors[name] = Stored(path, dtype, tuple(shape), 8 + n + offsets[0], 8 + n + offsets[1])
        ranges.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(ranges):
        if begin != end:
            raise bad(f"tensor {name}'s data begins at byte {begin:,}, expected {end:,}: the tensors "
                      f"{'overlap' if begin < end else 'leave a gap'}")
        end = stop
    if 8 + n + end != size:
        raise bad(f"its tensors end at byte {end:,} of the data, the file holds {size - 8 - n:,} bytes of data: "
                  f"{'cut short' if 8 + n + end > size else 'trailing bytes'}")
    return tensors


def unique(pairs: list) -> dict:
    """json.loads's object_pairs_hook: a name given twice is a KeyError, where json.loads alone keeps the last."""
    if len(d := dict(pairs)) < len(pairs):
        raise KeyError(next(k for k, count in Counter(k for k, _ in pairs).items() if count > 1))
    return d


def inside(folder: Path, name: str) -> Path:
    """folder / name, refused unless name is a plain file name whose file lies in the folder: a symlink may point
    inside it, or from a hub cache snapshot into its repo's blobs (huggingface_hub's layout), nowhere else."""
    home, path = Path(folder).resolve(), Path(folder) / name
    blobs = home.parent.parent / "blobs" if home.parent.name == "snapshots" else home
    if Path(name).name != name or path.resolve().parent not in (home, blobs):
        raise ValueError(f"{folder}: {name!r} is not a file of this folder")
    return path


def read_json(path: Path) -> dict:
    """A file's JSON object, or a ValueError naming the file."""
    try:
        raw = json.loads(Path(path).read_bytes())
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested too deep for the parser
        raise ValueError(f"{path}: not JSON ({e})") from None
    if type(raw) is not dict:
        raise ValueError(f"{path}: not a JSON object")
    return raw


def check_fields(path, raw: dict, rules: dict):
    """Refuse the first field of `raw` whose value breaks its rule in `rules` (name -> rule)."""
    for name, (test, what) in rules.items():
        if raw.get(name) is not None and not test(raw[name]):
            raise ValueError(f"{path}: {name} is {reprlib.repr(raw[name])}, expected {what}")


def check_tensors(folder, tensors: dict, expected: dict, tied: set):
    """Refuse a checkpoint whose tensors (name -> Stored) are not exactly the model's (name -> parameter): names,
    then shapes, from the headers alone. `tied`: names the checkpoint may hold beyond them."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected) - tied)
    if missing or unexpected:
        raise ValueError(f"{folder}: tensors do not match a model of its config.json: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if wrong := next((name for name, p in expected.items() if tensors[name].shape != p.shape), None):
        raise ValueError(f"{folder}: tensor {wrong} has shape {tensors[wrong].shape}, "
                         f"config.json implies {tuple(expected[wrong].shape)}")


def check_size(folder, config, tensors: dict):
    """Refuse a config whose model holds more parameters than the checkpoint's tensors, before the model is built,
    which takes time per layer however few tensors there are. Fewer is left to check_tensors, which names them."""
    if (implied := parameter_count(config)) > (held := sum(math.prod(t.shape) for t in tensors.values())):
        raise ValueError(f"{folder}: config.json implies {implied:,} parameters, its tensors hold {held:,}")


def parameter_count(c) -> int:
    """The parameters of tinyreason.Decoder(c), counted without building it (sizes past 64 bits do not build even
    on the meta device)."""
    h, i = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim  # the q and k (or v) widths
    norm = h * (1 if c.norm == "rms" else 2)  # LayerNorm has a bias
    attention = 2 * h * q + 2 * h * kv + (q + 2 * kv) * c.qkv_bias + h * c.bias  # q, k, v, o
    mlp = 3 * h * i + (2 * i + h) * c.bias if c.mlp == "swiglu" else 2 * h * i + (i + h) * c.bias
    block = attention + mlp + norm * (1 if c.parallel_residual else 2)
    embeddings = c.vocab_size * h * (1 if c.tie_word_embeddings else 2) + c.vocab_size * c.bias  # and the lm_head
    return embeddings + norm + c.num_hidden_layers * block
