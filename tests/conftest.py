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
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512)


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


def _train_tokenizer(path: Path):
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
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "chat_template": QWEN25_TEMPLATE, "tokenizer_class": "Qwen2Tokenizer"}))
    return tok


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A folder with tokenizer.json + tokenizer_config.json (Qwen2 pre-tokenizer, ChatML specials)."""
    path = tmp_path_factory.mktemp("tokenizer")
    _train_tokenizer(path)
    return path


def make_checkpoint(path: Path, tokenizer_dir: Path, tie: bool, seed: int = 0, **overrides):
    """Save a tiny random `transformers` Qwen2ForCausalLM (fp32) plus our tokenizer files to `path`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    cfg = Qwen2Config(vocab_size=tok.get_vocab_size(), tie_word_embeddings=tie,
                      bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=tok.token_to_id("<|im_end|>"),
                      pad_token_id=tok.token_to_id("<|endoftext|>"), **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # HF zero-inits biases; random ones make the bias path testable
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((tokenizer_dir / f).read_bytes())
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_dir):
    """Untied lm_head (as Qwen2.5-1.5B-Instruct's checkpoints are not; both kinds are tested)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_untied"), tokenizer_dir, tie=False)


@pytest.fixture(scope="session")
def tiny_tied_checkpoint(tmp_path_factory, tokenizer_dir):
    return make_checkpoint(tmp_path_factory.mktemp("tiny_tied"), tokenizer_dir, tie=True, seed=1)


@pytest.fixture(scope="session")
def real_model_dir():
    return Path(os.environ["TINYREASON_REAL_MODEL"])
