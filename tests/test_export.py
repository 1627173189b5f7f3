"""GGUF export: transformers' own GGUF loader reads our file back to the merged folder's logits and tokenizer, Phi-2's
(which that loader does not read) checked tensor by tensor through gguf.GGUFReader, and a failed export leaves no file.

    python -m pytest tests/test_export.py -q
"""
import json
import subprocess
import sys

import gguf
import jinja2
import numpy as np
import pytest
import torch
from conftest import ROOT, make_checkpoint

import export
import lora
from load import load_base
from tokenizer import Tokenizer

CHAT = [{"role": "system", "content": "You are a helpful assistant that solves math problems step-by-step."},
        {"role": "user", "content": "Natalia sold 48 clips in April, half as many in May. How many in all? 数学 €"}]


@pytest.fixture(scope="module")
def merged(tmp_path_factory, request):
    """fixture name -> a merge (fp32) of a trained adapter into that tiny checkpoint, made once."""
    folders = {}

    def make(fixture):
        if fixture not in folders:
            checkpoint, out = request.getfixturevalue(fixture), tmp_path_factory.mktemp(fixture)
            model = lora.inject(load_base(checkpoint, dtype=torch.float32, device="cpu", quantize="none"), r=4, alpha=8)
            torch.manual_seed(0)
            for m in lora.lora_modules(model).values():  # B no longer zero, as after training
                torch.nn.init.normal_(m.lora_B.weight, std=0.1)
            lora.save_adapter(model, out / "adapter", str(checkpoint))
            lora.export_merged(checkpoint, out / "adapter", out / "merged", dtype=torch.float32)
            folders[fixture] = out / "merged"
        return folders[fixture]
    return make


@pytest.fixture(scope="module")
def default_rope_llama_checkpoint(tmp_path_factory, llama3_tokenizer_dir):
    """Llama without Llama-3.1's rope scaling, which transformers' GGUF loader does not read back (tested apart)."""
    return make_checkpoint(tmp_path_factory.mktemp("llama_default_rope"), llama3_tokenizer_dir, tie=False,
                           model_type="llama", rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def hf_model(folder, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()


def rounded_as_stored(model, gguf_type):
    """`model` with every 2-D weight rounded as the GGUF stores it, through the gguf package's own quantizer."""
    qtype = gguf.GGMLQuantizationType[gguf_type.upper()]
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                stored = gguf.quants.quantize(p.detach().numpy(), qtype)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(stored, qtype)))
    return model


def tokens(vocab_size):
    return torch.randint(0, vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))


def declared(folder, kind: str) -> int | None:
    """The id of the special token a checkpoint declares: tokenizer_config.json's `{kind}_token`, else config.json's
    `{kind}_token_id`."""
    token = json.loads((folder / "tokenizer_config.json").read_text()).get(f"{kind}_token")
    return (Tokenizer.from_pretrained(folder).tok.token_to_id(token) if token else
            json.loads((folder / "config.json").read_text()).get(f"{kind}_token_id"))


def reader_value(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("gguf_type", export.GGUF_TYPES)
@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_tied_checkpoint", "default_rope_llama_checkpoint"])
def test_transformers_reads_the_gguf_to_the_merged_logits_with_weights_rounded_as_stored(merged, fixture, gguf_type):
    folder = merged(fixture)
    export.export_gguf(folder, folder.parent / "model.gguf", gguf_type)
    ids = tokens(hf_model(folder).config.vocab_size)
    with torch.no_grad():
        got = hf_model(folder.parent, gguf_file="model.gguf")(ids).logits
        exact = hf_model(folder)(ids).logits
        want = rounded_as_stored(hf_model(folder), gguf_type)(ids).logits
    assert not torch.equal(want, exact)  # the rounding is there to be matched
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_llama_3_1_rope_scaling_travels_as_the_rope_freqs_llama_cpp_divides_by(merged, tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    folder = merged("tiny_llama_checkpoint")
    export.export_gguf(folder, tmp_path / "model.gguf")
    config = AutoConfig.from_pretrained(folder)
    scaled = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0]
    base = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
    stored = next(t for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors if t.name == "rope_freqs.weight")
    assert stored.tensor_type == gguf.GGMLQuantizationType.F32 and (base / scaled != 1).any()
    torch.testing.assert_close(torch.from_numpy(np.array(stored.data)), base / scaled)


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_llama_checkpoint"])
def test_the_tokenizer_read_back_encodes_a_chat_prompt_to_our_ids_with_our_special_tokens(merged, fixture, tmp_path):
    from transformers import AutoTokenizer
    folder = merged(fixture)
    export.export_gguf(folder, tmp_path / "model.gguf")
    theirs, ours = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf"), Tokenizer.from_pretrained(folder)
    assert list(theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"]) \
        == ours.apply_chat(CHAT)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == tuple(
        declared(folder, kind) for kind in ("bos", "eos", "pad"))


def test_token_types_are_llama_cpps_padding_rows_unused_added_tokens_control_or_user_defined(tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer
    (tmp_path / "tok").mkdir()
    tok = HFTokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.add_tokens(["<tool_call>"])  # not special, as in Qwen2.5
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_bytes((tokenizer_dir / "tokenizer_config.json").read_bytes())
    folder = make_checkpoint(tmp_path / "padded", tmp_path / "tok", tie=False, vocab_size=416)  # rows 401-415 unused
    export.export_gguf(folder, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    names, types = reader_value(reader, "tokenizer.ggml.tokens"), reader_value(reader, "tokenizer.ggml.token_type")
    vocab = tok.get_vocab()
    T = gguf.TokenType
    assert types == [T.UNUSED if i >= len(vocab) else T.USER_DEFINED if names[i] == "<tool_call>" else
                     T.CONTROL if names[i] in ("<|endoftext|>", "<|im_start|>", "<|im_end|>") else T.NORMAL
                     for i in range(416)]
    assert names == sorted(vocab, key=vocab.get) + [f"[PAD{i}]" for i in range(len(vocab), 416)]
    chat = [{"role": "user", "content": "Call <tool_call> on 48 clips."}]
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert list(theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"]) \
        == Tokenizer.from_pretrained(folder).apply_chat(chat)


PHI2_NAMES = {  # llama.cpp's phi2 tensors (its llama-arch.cpp) <- Hugging Face's Phi modules
    "model.embed_tokens": "token_embd", "model.final_layernorm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.dense": "attn_output", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}


def phi2_name(name: str) -> str:
    module, suffix = name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, block, module = module.split(".", 3)
        return f"blk.{block}.{PHI2_NAMES[module]}.{suffix}"
    return f"{PHI2_NAMES[module]}.{suffix}"


def test_phi_2_which_transformers_cannot_load_from_gguf_has_every_tensor_under_llama_cpps_name(merged, tmp_path):
    from safetensors.torch import load_file
    folder = merged("tiny_phi_checkpoint")
    export.export_gguf(folder, tmp_path / "model.gguf", "f16")
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    hf = load_file(folder / "model.safetensors")
    assert set(stored) == {phi2_name(name) for name in hf}
    for name, w in hf.items():
        t = stored[phi2_name(name)]
        assert t.tensor_type == (gguf.GGMLQuantizationType.F16 if w.ndim == 2 else gguf.GGMLQuantizationType.F32)
        want = w.half().float() if w.ndim == 2 else w  # phi2 rotates halves, as Hugging Face: no permutation
        assert torch.equal(torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(w.shape), want), name


def test_phi_2s_metadata_is_its_config_and_its_tokenizer_is_tokenizer_json(merged, tmp_path):
    folder = merged("tiny_phi_checkpoint")
    export.export_gguf(folder, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    config = json.loads((folder / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert {k: reader_value(reader, "phi2." + k) for k in (
        "context_length", "embedding_length", "feed_forward_length", "block_count", "attention.head_count",
        "attention.head_count_kv", "rope.dimension_count")} == {
        "context_length": config["max_position_embeddings"], "embedding_length": config["hidden_size"],
        "feed_forward_length": config["intermediate_size"], "block_count": config["num_hidden_layers"],
        "attention.head_count": config["num_attention_heads"], "attention.head_count_kv": config["num_key_value_heads"],
        "rope.dimension_count": int(config["rope_parameters"]["partial_rotary_factor"] * head_dim)}
    assert reader_value(reader, "phi2.attention.layer_norm_epsilon") == pytest.approx(config["layer_norm_eps"])
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    assert reader_value(reader, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    assert reader_value(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in tok["model"]["merges"]]
    ours = Tokenizer.from_pretrained(folder)
    assert reader_value(reader, "tokenizer.ggml.eos_token_id") == ours.eot_id
    assert reader_value(reader, "tokenizer.ggml.add_bos_token") is False
    # phi-2 has no chat template: the GGUF carries the plain format TinyReason trains, rendered here by Jinja itself
    template = jinja2.Environment().from_string(reader_value(reader, "tokenizer.chat_template"))
    assert ours.encode(template.render(messages=CHAT, add_generation_prompt=True)) == ours.apply_chat(CHAT)


def test_a_failed_export_leaves_no_file_and_an_earlier_one_as_it_was(merged, tmp_path, monkeypatch):
    folder, path = merged("tiny_checkpoint"), tmp_path / "model.gguf"
    real, written = gguf.GGUFWriter.write_tensor_data, []

    def full_disk_after_three(self, tensor, **kw):
        if len(written) == 3:
            raise OSError("No space left on device")
        written.append(tensor.nbytes)
        return real(self, tensor, **kw)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full_disk_after_three)
    with pytest.raises(OSError, match="No space left"):
        export.export_gguf(folder, path)
    assert written and not list(tmp_path.iterdir())
    monkeypatch.undo()
    export.export_gguf(folder, path, "q8_0")
    before, written[:] = path.read_bytes(), []
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full_disk_after_three)
    with pytest.raises(OSError, match="No space left"):
        export.export_gguf(folder, path, "f16")
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"] and path.read_bytes() == before


def test_merge_command_writes_the_folder_and_the_gguf(tiny_checkpoint, merged, tmp_path):
    adapter = merged("tiny_checkpoint").parent / "adapter"
    subprocess.run([sys.executable, str(ROOT / "lora.py"), "merge", "--model", str(tiny_checkpoint), "--adapter",
                    str(adapter), "--out", str(tmp_path / "merged"), "--gguf", str(tmp_path / "gguf" / "model.gguf"),
                    "--gguf_type", "q8_0"], check=True, cwd=ROOT, capture_output=True)
    reader = gguf.GGUFReader(tmp_path / "gguf" / "model.gguf")
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert reader_value(reader, "general.architecture") == "qwen2"
    assert reader_value(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0


@pytest.mark.parametrize("flags, message", [
    (["--gguf", "{out}/model.gguf", "--gguf_type", "q4_k"], "argument --gguf_type: invalid choice: 'q4_k'"),
    (["--gguf_type", "q8_0"], "--gguf_type needs --gguf"),
    (["--gguf", "{out}/model.bin"], "--gguf {out}/model.bin: expected the name of a file to write, ending in .gguf"),
    (["--gguf", "{model}/model.gguf"], "--gguf {model}/model.gguf is, holds or lies inside --model"),
    (["--gguf", "{adapter}/model.gguf"], "--gguf {adapter}/model.gguf is, holds or lies inside --adapter"),
])
def test_a_bad_gguf_flag_ends_in_one_line_naming_it_before_anything_is_written(tiny_checkpoint, merged, tmp_path,
                                                                               capsys, flags, message):
    paths = dict(model=tiny_checkpoint, adapter=merged("tiny_checkpoint").parent / "adapter", out=tmp_path / "merged")
    before = sorted(p.name for p in tiny_checkpoint.iterdir())
    argv = ["merge", "--model", "{model}", "--adapter", "{adapter}", "--out", "{out}", *flags]
    with pytest.raises(SystemExit) as exit:
        lora.main([a.format(**paths) for a in argv])
    err = capsys.readouterr().err
    last = str(exit.value.code) if isinstance(exit.value.code, str) else err.strip().splitlines()[-1]
    assert exit.value.code != 0 and message.format(**paths) in last and "Traceback" not in err
    assert not (tmp_path / "merged").exists() and sorted(p.name for p in tiny_checkpoint.iterdir()) == before
