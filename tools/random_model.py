"""A random-weight checkpoint of a real model's shapes, for speed and memory checks where no weights can travel (a
GPU machine without network): Qwen2.5-1.5B-Instruct's config, a tokenizer trained here on GSM8K (the vocabulary
stays 151,936 rows, so the lm_head costs what the real one does), saved by transformers in the Hugging Face layout.

    python tools/random_model.py /tmp/qwen1.5b-random
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import _train_tokenizer, make_checkpoint  # noqa: E402  the tests' own builders

QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, rope_theta=1_000_000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  vocab_size=151936)  # Qwen/Qwen2.5-1.5B-Instruct's config.json

if __name__ == "__main__":
    out = Path(sys.argv[1])
    tokenizer = out.with_name(out.name + "-tokenizer")
    tokenizer.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(tokenizer)
    make_checkpoint(out, tokenizer, tie=True, **QWEN25_15B)
    print(f"{out}: a random Qwen2.5-1.5B-shaped checkpoint")
