"""Our safetensors reader: what the safetensors library reads, and every file the format forbids refused from its
header, before anything is allocated, in one line naming the file and the tensor, where safetensors.safe_open
refuses it too; shards only from inside the checkpoint's folder.

    python -m pytest tests/test_weights.py -q
"""
import json
import re

import pytest
import torch
from conftest import copy_checkpoint

import weights
from tinyreason import Decoder


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


TWO = {"a": entry(offsets=(0, 8)), "b": entry(offsets=(8, 16))}  # two F32 tensors of 2 numbers: 16 bytes of data
TWO_JSON = json.dumps(TWO)[1:-1]  # their entries, to write headers a dict cannot say


def safetensors_file(folder, header=TWO, data=16, length=None, name="model.safetensors"):
    """The one builder of hostile files: 8 bytes of header length (or `length`), the header (a dict, or bytes for
    what a dict cannot say), then `data` zero bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = folder / name
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + bytes(data))
    return path


def assert_refused(tmp_path, file, message, by_safetensors=True):
    """Our reader refuses the file in one line, naming it; safetensors.safe_open refuses it too, or lets it pass."""
    from safetensors import SafetensorError, safe_open
    path = safetensors_file(tmp_path, **file)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: .*{re.escape(message)}") as ours:
        weights.checkpoint_tensors(tmp_path)
    assert "\n" not in str(ours.value)
    try:
        with safe_open(str(path), "pt"):
            refused = False
    except SafetensorError:
        refused = True
    assert refused == by_safetensors


def test_our_safetensors_reader_gives_what_the_safetensors_library_gives(tmp_path):
    from safetensors.torch import load_file, save_file
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.randn(7), "c": torch.randn(2, 2).half(), "d": torch.ones(()),
               "e": torch.ones(0, 3)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = {name: t.read() for name, t in weights.checkpoint_tensors(tmp_path).items()}
    reference = load_file(tmp_path / "model.safetensors")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    assert all(ours[k].dtype == reference[k].dtype for k in ours)


def test_a_cut_short_or_foreign_checkpoint_file_is_named_in_the_error(tmp_path, tiny_checkpoint):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "cut")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"cut/model\.safetensors: not a safetensors file: .* cut short"):
        Decoder.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes((10).to_bytes(8, "little") + b"PK\x03\x04 zip!" + data[18:])
    with pytest.raises(ValueError, match="not a safetensors file: its header is not JSON"):
        Decoder.from_pretrained(folder)


@pytest.mark.parametrize("file, message", [
    (dict(length=2 ** 40), "its header length 1,099,511,627,776 is over the format's limit of 100,000,000 bytes"),
    (dict(length=10 ** 6), "its header length 1,000,000 is past the end of the"),
    (dict(header=b"PK\x03\x04 zip!"), "its header is not JSON"),
    (dict(header=b'{"\xff": 1}'), "its header is not JSON"),  # not UTF-8
    (dict(header=b"[" * 100_000 + b"]" * 100_000), "its header is not JSON"),  # deeper than the parser goes
    (dict(header=json.dumps(TWO).encode() + b"\0\0"), "its header is not JSON"),  # padded with other than spaces
    (dict(header=b"[]"), "its header is not a JSON object"),
    (dict(header={"__metadata__": {"format": 1}, **TWO}), "its __metadata__ is not an object of strings"),
    (dict(header={"a": {"dtype": "F32", "shape": [2]}, "b": TWO["b"]}),
     "tensor a is not an object of exactly dtype, shape and data_offsets"),
    (dict(header={"a": entry(dtype="F99"), "b": TWO["b"]}), "tensor a is F99, expected BF16, F16 or F32"),
    (dict(header=b'{"a": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}, "b": '
          + json.dumps(TWO["b"]).encode() + b"}"), "its header gives 'dtype' twice"),
    (dict(header=b'{' + TWO_JSON.replace('"b"', '"a"').encode() + b"}"), "its header gives 'a' twice"),
], ids=["length 2^40", "length past the end", "not JSON", "not UTF-8", "nested too deep", "NUL padding", "a list",
        "metadata", "a missing key", "an unknown dtype", "a field given twice", "a name given twice"])
def test_a_malformed_header_is_refused_in_one_line_as_safetensors_refuses_it(tmp_path, file, message):
    assert_refused(tmp_path, file, message)


@pytest.mark.parametrize("file, message", [
    (dict(header={"a": {**entry(), "extra": 1}, "b": TWO["b"]}),
     "tensor a is not an object of exactly dtype, shape and data_offsets"),
    (dict(header={"a": ["F32", [2], [0, 8]], "b": TWO["b"]}),
     "tensor a is not an object of exactly dtype, shape and data_offsets"),
    (dict(header=b'{"a": ' + json.dumps(entry(offsets=(8, 16))).encode() + b", " + TWO_JSON.encode() + b"}"),
     "its header gives 'a' twice"),  # the first a is lost, and the rest is a valid file
    (dict(header=b"{" + TWO_JSON.encode() + b', "a": ' + json.dumps(TWO["a"]).encode() + b"}"),
     "its header gives 'a' twice"),
], ids=["an extra key", "an entry as a list", "a name given twice", "a name given twice, both the same"])
def test_what_safetensors_lets_pass_but_the_format_does_not_say_is_refused(tmp_path, file, message):
    """safe_open reads each entry as a struct, which ignores unknown keys and takes a list of its three fields, and
    keeps the last of a name given twice (as json.loads alone would); the format lists exactly three keys per
    tensor, each name once."""
    assert_refused(tmp_path, file, message, by_safetensors=False)


@pytest.mark.parametrize("file, message", [
    (dict(header={"a": entry(offsets=(-8, 0)), "b": TWO["b"]}),
     "tensor a: data_offsets [-8, 0] are not two integers 0 <= begin <= end"),  # back into the header
    (dict(header={"a": entry(offsets=(8, 0)), "b": TWO["b"]}), "data_offsets [8, 0] are not"),
    (dict(header={"a": entry(offsets=(0, 8, 16)), "b": TWO["b"]}), "data_offsets [0, 8, 16] are not"),
    (dict(header={"a": entry(offsets=(0.0, 8)), "b": TWO["b"]}), "data_offsets [0.0, 8] are not"),
    (dict(header={"a": entry(offsets=(0, 8)), "b": entry(offsets=(0, 8))}, data=8),
     "tensor b's data begins at byte 0, expected 8: the tensors overlap"),  # b would alias a
    (dict(header={"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, data=12),
     "tensor b's data begins at byte 4, expected 8: the tensors overlap"),
    (dict(header={"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))}, data=20),
     "tensor b's data begins at byte 12, expected 8: the tensors leave a gap"),
    (dict(header={"a": entry(offsets=(4, 12)), "b": entry(offsets=(12, 20))}, data=20),
     "tensor a's data begins at byte 4, expected 0: the tensors leave a gap"),
    (dict(data=20), "its tensors end at byte 16 of the data, the file holds 20 bytes of data: trailing bytes"),
    (dict(data=12), "its tensors end at byte 16 of the data, the file holds 12 bytes of data: cut short"),
], ids=["negative", "reversed", "three", "a float", "aliasing", "overlapping", "a gap", "a gap first",
        "trailing bytes", "cut short"])
def test_byte_ranges_must_tile_the_data_section(tmp_path, file, message):
    assert_refused(tmp_path, file, message)


@pytest.mark.parametrize("shape, offsets, message", [
    ((-2,), (0, 8), "tensor a: shape [-2] is not a list of at most 64 non-negative integers"),
    ((2.0,), (0, 8), "tensor a: shape [2.0] is not"),
    ((True, 2), (0, 8), "tensor a: shape [True, 2] is not"),
    ("2", (0, 8), "tensor a: shape '2' is not"),
    ((3,), (0, 8), "tensor a: shape [3] of F32 is 12 bytes, its data_offsets [0, 8] hold 8"),
    ((2 ** 40, 2 ** 40), (0, 8), f"tensor a: shape [{2 ** 40}, {2 ** 40}] overflows 64 bits"),
], ids=["negative", "a float", "a bool", "a string", "more than its bytes", "past 64 bits"])
def test_a_shape_must_be_non_negative_integers_filling_its_bytes(tmp_path, shape, offsets, message):
    header = {"a": {**entry(offsets=offsets), "shape": shape if isinstance(shape, str) else list(shape)}, "b": TWO["b"]}
    assert_refused(tmp_path, dict(header=header), message)


@pytest.mark.parametrize("shape, size, message", [
    ((0, 2 ** 62, 2 ** 62), 0, "overflows 64 bits"),  # torch.empty cannot make it
    ((1,) * 65, 4, "is not a list of at most 64"),  # the size of a long one costs time quadratic in its length
], ids=["zero-size past 64 bits", "65 dims"])
def test_shapes_past_64_bits_or_dims_are_refused_where_safetensors_lets_them_pass(tmp_path, shape, size, message):
    file = dict(header={"a": entry(shape=shape, offsets=(0, size))}, data=size)
    assert_refused(tmp_path, file, message, by_safetensors=False)


def test_zero_size_tensors_and_an_empty_file_are_read_as_safetensors_reads_them(tmp_path):
    safetensors_file(tmp_path, {"a": entry(shape=(0, 3), offsets=(0, 0)), "b": entry(shape=(0,), offsets=(0, 0))}, 0)
    assert {k: t.read().shape for k, t in weights.checkpoint_tensors(tmp_path).items()} == {"a": (0, 3), "b": (0,)}
    safetensors_file(tmp_path, {}, 0)
    assert weights.checkpoint_tensors(tmp_path) == {}


def index(folder, *shards):
    weight_map = {f"t{i}": shard for i, shard in enumerate(shards)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture
def other(tmp_path):
    """Another checkpoint's folder beside the one loaded, with a valid file in it."""
    (tmp_path / "other").mkdir()
    return safetensors_file(tmp_path / "other")


@pytest.mark.parametrize("shard, message", [
    ("/etc/passwd", "'/etc/passwd' is not a file of this folder"),
    ("../other/model.safetensors", "'../other/model.safetensors' is not a file of this folder"),
    ("sub/model.safetensors", "'sub/model.safetensors' is not a file of this folder"),
    ("link.safetensors", "'link.safetensors' is not a file of this folder"),  # a symlink to ../other
])
def test_shards_are_opened_only_from_inside_the_folder(tmp_path, other, shard, message):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "model.safetensors").write_bytes(other.read_bytes())
    (folder / "link.safetensors").symlink_to(other)
    index(folder, shard)
    with pytest.raises(ValueError, match=f"^{re.escape(str(folder))}: {re.escape(message)}$"):
        weights.checkpoint_tensors(folder)


def test_a_symlink_out_of_the_folder_is_refused_without_an_index(tmp_path, other):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").symlink_to(other)
    with pytest.raises(ValueError, match="'model.safetensors' is not a file of this folder"):
        weights.checkpoint_tensors(tmp_path / "model")


def test_a_hub_cache_snapshot_reads_its_repo_blobs_through_its_symlinks(tmp_path):
    repo = tmp_path / "models--owner--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    blob = safetensors_file(repo / "blobs", name="4f2e9a")
    (repo / "snapshots" / "abc123" / "model.safetensors").symlink_to(f"../../blobs/{blob.name}")
    assert weights.checkpoint_tensors(repo / "snapshots" / "abc123").keys() == {"a", "b"}


@pytest.mark.parametrize("write, message", [
    (lambda f: index(f, "model-1.safetensors", "model-2.safetensors"), "tensor a is also in model-1.safetensors"),
    (lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": ["model-1.safetensors"]}'),
     "weight_map is not an object of tensor names to file names"),
    (lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": {"a": 1}}'),
     "weight_map is not an object of tensor names to file names"),
    (lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": '), "not JSON"),
    (lambda f: (f / "model.safetensors.index.json").write_text("[]"), "not a JSON object"),
], ids=["a tensor in two shards", "a list", "a number", "cut short", "not an object"])
def test_a_bad_index_is_refused_in_one_line(tmp_path, write, message):
    for shard in ("model-1.safetensors", "model-2.safetensors"):
        safetensors_file(tmp_path, name=shard)
    write(tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        weights.checkpoint_tensors(tmp_path)
