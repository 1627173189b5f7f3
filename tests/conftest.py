"""Shared tiny fixtures: a tokenizer trained here with `tokenizers`, and tiny random Qwen2
checkpoints saved by `transformers` in the Hugging Face layout. Nothing touches the network.

    python -m pytest            # the fast offline suite
    TINYREASON_REAL_MODEL=/path/to/qwen2-folder python -m pytest -m real
    python -m pytest -m cuda    # the GPU checks (skipped where torch sees no CUDA device)
"""
import json
import os
import sys
from pathlib import Path

# Tiny models gain nothing from more threads, and spinning OpenMP threads crawl when processes share 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))  # bench.py, plot.py
GSM8K = ROOT / "tests" / "data" / "gsm8k_train_head300.jsonl"  # GSM8K train, MIT licence

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5's own chat template (system/user/assistant turns; the tool-calling branches left out).
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=512)
ARCHITECTURES = {  # what each architecture's tiny checkpoint sets beyond TINY
    "qwen2": dict(rms_norm_eps=1e-6),
    # head_dim 32, not 64 / 4; Llama-3.1's rope scaling, whose original context makes every branch of it act
    "llama": dict(rms_norm_eps=1e-5, head_dim=32, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "phi": dict(layer_norm_eps=1e-5, partial_rotary_factor=0.4, num_key_value_heads=4),  # rotates 6 of 16 dims
}


def pytest_configure(config):
    config.addinivalue_line("markers", "real: needs TINYREASON_REAL_MODEL (a real Qwen2 checkpoint folder)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (python -m pytest -m cuda)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    skip = {}
    if not os.environ.get("TINYREASON_REAL_MODEL"):
        skip["real"] = pytest.mark.skip(reason="set TINYREASON_REAL_MODEL to a real Qwen2 checkpoint folder")
    if not torch.cuda.is_available():
        skip["cuda"] = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        for marker, mark in skip.items():
            if marker in item.keywords:
                item.add_marker(mark)


def gsm8k_records(n):
    with open(GSM8K) as f:
        return [json.loads(next(f)) for _ in range(n)]


def write_jsonl(path: Path, records) -> Path:
    """records as a JSON-lines file at path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _train_tokenizer(path: Path, specials=SPECIALS, config=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    # Qwen2's own pre-tokenizer (split regex + byte-level), so merges behave like the real one.
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    from tokenizers import Regex
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = [r["question"] + "\n" + r["answer"] for r in gsm8k_records(300)]
    texts += ["<think>\n</think>\n\n**Final Answer:** You are a helpful assistant that solves math problems step-by-step.",
              "système € ’ 数学 ✓"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config or {
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "chat_template": QWEN25_TEMPLATE, "tokenizer_class": "Qwen2Tokenizer"}))
    return tok


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A folder with tokenizer.json + tokenizer_config.json (Qwen2 pre-tokenizer, ChatML specials)."""
    path = tmp_path_factory.mktemp("tokenizer")
    _train_tokenizer(path)
    return path


def make_checkpoint(path: Path, tokenizer_dir: Path, tie: bool, seed: int = 0, model_type="qwen2", **overrides):
    """Save a tiny random `transformers` model of `model_type` (fp32) plus the tokenizer files to `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = next(t for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>") if tok.token_to_id(t) is not None)
    tiny = {**TINY, **ARCHITECTURES[model_type]}
    cfg = AutoConfig.for_model(model_type, **{  # a vocab_size override: rows past the vocabulary, as Qwen2.5 has
        "vocab_size": tok.get_vocab_size(), "tie_word_embeddings": tie, "eos_token_id": tok.token_to_id(eos),
        "bos_token_id": tok.token_to_id("<|endoftext|>"), "pad_token_id": tok.token_to_id("<|endoftext|>"),
        **tiny, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # HF zero-inits biases; random ones make the bias path testable
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((tokenizer_dir / f).read_bytes())
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint folder, to damage."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir):
    """Untied lm_head (as Qwen2.5-1.5B-Instruct's checkpoints are not; both kinds are tested)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_untied"), tokenizer_dir, tie=False)


@pytest.fixture(scope="session")
def tiny_tied_checkpoint(tmp_path_factory, tokenizer_dir):
    return make_checkpoint(tmp_path_factory.mktemp("tiny_tied"), tokenizer_dir, tie=True, seed=1)


# Llama-3.2's chat template (system/user/assistant turns; the tool-calling branches left out).
LLAMA32_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory):
    """Llama-3's special tokens and Llama-3.2's template."""
    path = tmp_path_factory.mktemp("llama3_tokenizer")
    _train_tokenizer(path, LLAMA3_SPECIALS, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                             "chat_template": LLAMA32_TEMPLATE})
    return path


@pytest.fixture(scope="session")
def plain_tokenizer_dir(tmp_path_factory):
    """Phi-2's: <|endoftext|> its only special token, no chat template."""
    path = tmp_path_factory.mktemp("plain_tokenizer")
    _train_tokenizer(path, ["<|endoftext|>"], {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    return path


@pytest.fixture(scope="session")
def tiny_llama_checkpoint(tmp_path_factory, llama3_tokenizer_dir):
    return make_checkpoint(tmp_path_factory.mktemp("tiny_llama"), llama3_tokenizer_dir, tie=False, model_type="llama")


@pytest.fixture(scope="session")
def tiny_phi_checkpoint(tmp_path_factory, plain_tokenizer_dir):
    return make_checkpoint(tmp_path_factory.mktemp("tiny_phi"), plain_tokenizer_dir, tie=False, model_type="phi")


@pytest.fixture(scope="session")
def real_model_dir():
    return Path(os.environ["TINYREASON_REAL_MODEL"])
