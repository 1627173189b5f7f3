"""A merged checkpoint folder as one GGUF file, the format llama.cpp and Ollama run, written by the gguf package
(llama.cpp's own writer) the way llama.cpp's convert_hf_to_gguf.py writes the same model: the architecture's
metadata, the tokenizer (tokens and their types, merges, special token ids, chat template) and the tensors under
llama.cpp's names, the 2-D weights in f16, bf16 or q8_0 and every vector in f32.

    python lora.py merge --model M --adapter A --out merged/ --gguf model.gguf --gguf_type q8_0

The layout changes are llama.cpp's. Its llama rotates adjacent pairs of a head's dims where Hugging Face rotates
the head's two halves, so Llama's q_proj and k_proj rows are permuted to match, and Llama-3.1's rope scaling travels
as a rope_freqs tensor of per-frequency divisors. Its qwen2 and phi2 rotate halves: their tensors go as they are.
"""
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from tinyreason import Config, inv_freq
from weights import checkpoint_tensors, read_json

ARCHITECTURES = {"qwen2": "QWEN2", "llama": "LLAMA", "phi": "PHI2"}  # model_type -> gguf.MODEL_ARCH (llama.cpp's)
GGUF_TYPES = ("f16", "bf16", "q8_0")  # how the 2-D weights are stored
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")  # Llama-3 keeps up to three digits together
PRE_TOKENIZERS = {  # tokenizer.json's pre-tokenizer steps -> the name llama.cpp implements them under
    (QWEN2_SPLIT, "ByteLevel"): "qwen2",  # Qwen2, Qwen2.5
    (LLAMA3_SPLIT, "ByteLevel"): "llama-bpe",  # Llama-3.x
    ("ByteLevel, GPT-2's split",): "gpt-2",  # phi-2, SmolLM2
}
# tokenizer.py's plain format, for a checkpoint without a chat template (phi-2): llama.cpp prompts as we trained.
PLAIN_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def export_gguf(folder, path, gguf_type="f16"):
    """Write the checkpoint `folder` (a merge's) as the GGUF file `path`, under a temporary name beside it that is
    renamed into place once whole: a failed or interrupted export leaves no file (and an earlier one as it was)."""
    import gguf  # only this command needs the package
    folder, path = Path(folder), Path(path)
    raw, config = read_json(folder / "config.json"), Config.from_json(folder / "config.json")
    arch = gguf.MODEL_ARCH[ARCHITECTURES[raw["model_type"]]]
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    add_hyperparameters(writer, folder, raw, config, gguf_type)
    add_tokenizer(writer, folder, config.vocab_size)
    tensors = gguf_tensors(folder, config, arch, gguf.GGMLQuantizationType[gguf_type.upper()])
    for name, (shape, qtype, _) in tensors.items():  # logical shapes (np.float32): a uint8 dtype would mean bytes
        writer.add_tensor_info(name, shape, np.float32, math.prod(gguf.quant_shape_to_byte_shape(shape, qtype)),
                               raw_dtype=qtype)
    tmp = path.with_name(".tmp-" + path.name)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, (shape, qtype, load) in tensors.items():  # one tensor in memory at a time
            writer.write_tensor_data(gguf.quants.quantize(load().float().numpy(), qtype))
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    print(f"wrote {path} ({gguf_type}, {len(tensors)} tensors, {path.stat().st_size / 1e9:.2f} GB)")


def add_hyperparameters(writer, folder, raw: dict, c: Config, gguf_type: str):
    """The keys llama.cpp builds the model from; transformers' GGUF loader reads the same ones."""
    import gguf
    if type(raw.get("max_position_embeddings")) is not int:
        raise ValueError(f"{folder / 'config.json'}: no max_position_embeddings, the context length GGUF records")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(gguf.LlamaFileType["MOSTLY_" + gguf_type.upper()])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(raw["max_position_embeddings"])
    writer.add_vocab_size(c.vocab_size)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)  # stated, as a head_dim of its own (not hidden / heads) needs
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.rotary_dim)  # Phi rotates part of each head
    writer.add_rope_freq_base(c.rope_theta)
    (writer.add_layer_norm_rms_eps if c.norm == "rms" else writer.add_layer_norm_eps)(c.norm_eps)


def add_tokenizer(writer, folder, vocab_size: int):
    """tokenizer.json's byte-level BPE as llama.cpp's "gpt2" tokenizer: a token per embedding row, each typed as
    llama.cpp's converter types it; merges, special token ids and the chat template by the gguf package's own
    reader of a checkpoint's tokenizer files (SpecialVocab)."""
    import gguf
    tok = read_json(folder / "tokenizer.json")
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or type(model.get("vocab")) is not dict:
        raise ValueError(f"{folder / 'tokenizer.json'}: not a BPE tokenizer, the kind GGUF export writes")
    if (pre := PRE_TOKENIZERS.get(split_steps(tok))) is None:
        raise ValueError(f"{folder / 'tokenizer.json'}: its pre-tokenizer {split_steps(tok)} is not one llama.cpp "
                         f"implements here (Qwen2's, Llama-3's or GPT-2's split)")
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    text = {i: t for t, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    if max(text) >= vocab_size:
        raise ValueError(f"{folder}: token id {max(text)} has no row in the {vocab_size}-row embedding")
    T = gguf.TokenType
    types = [T.UNUSED if i not in text else T.NORMAL if i not in added  # UNUSED: a padding row past the vocabulary
             else T.CONTROL if added[i]["special"] or (text[i].startswith("<|") and text[i].endswith("|>"))
             else T.USER_DEFINED for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([text.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    special.chat_template = special.chat_template or PLAIN_TEMPLATE
    special.add_special_token.setdefault("bos", False)  # unless the tokenizer adds one (Llama-3): as in Qwen2.5's GGUF
    special.add_to_gguf(writer, quiet=True)


def split_steps(tok: dict) -> tuple:
    """The pre-tokenizer's steps as PRE_TOKENIZERS names them: a Split's regex, ByteLevel with or without its
    built-in GPT-2 split, or another step's type."""
    pre = tok.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return tuple(s.get("pattern", {}).get("Regex") if s.get("type") == "Split" else
                 "ByteLevel, GPT-2's split" if s.get("type") == "ByteLevel" and s.get("use_regex", True) else
                 s.get("type") for s in steps)


def gguf_tensors(folder, c: Config, arch, qtype) -> dict:
    """llama.cpp's name -> (shape, storage type, a function that reads the tensor as llama.cpp lays it out), from
    the checkpoint's headers: nothing is read yet."""
    import gguf
    names, tensors = gguf.get_tensor_name_map(arch, c.num_hidden_layers), {}
    for name, stored in checkpoint_tensors(folder).items():
        if (gguf_name := names.get_name(name, try_suffixes=(".weight", ".bias"))) is None:
            raise ValueError(f"{folder}: tensor {name} has no name in llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]}")
        load = stored.read
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            load = lambda read=stored.read, heads=heads: pairs_from_halves(read(), heads)  # noqa: E731
        tensors[gguf_name] = (stored.shape, storage(stored.shape, qtype), load)
    if c.llama3_rope:  # llama.cpp divides each rotary frequency by its factor
        factors = inv_freq(replace(c, llama3_rope=())) / inv_freq(c)
        tensors[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = (
            tuple(factors.shape), gguf.GGMLQuantizationType.F32, lambda: factors)
    return tensors


def storage(shape, qtype):
    """As llama.cpp's converter stores a tensor: vectors (norms, biases) in F32, and in F16 a weight whose rows do
    not fill whole blocks of the wanted type."""
    import gguf
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    return qtype if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else gguf.GGMLQuantizationType.F16


def pairs_from_halves(w, heads: int):
    """q_proj or k_proj rows (heads * head_dim, in) from Hugging Face's order (a head's first half of dims, then
    its second) to llama.cpp's (dim i beside dim i + head_dim / 2): convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
