"""Qwen2's tokenizer (byte-level BPE from tokenizer.json, through the `tokenizers` library) and the ChatML
chat format, written out by hand and tested token for token against Qwen2.5's own template."""
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    """Qwen2's byte-level BPE (tokenizer.json) and the ChatML format, written out by hand."""
    DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

    def __init__(self, tok):
        self.tok = tok
        ids = {s: tok.token_to_id(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
        if None in ids.values():
            raise ValueError(f"tokenizer lacks ChatML special tokens: {[s for s, i in ids.items() if i is None]}")
        self.pad_id, self.im_start_id, self.im_end_id = ids.values()

    @classmethod
    def from_pretrained(cls, folder):
        if not (Path(folder) / "tokenizer.json").exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        return cls(HFTokenizer.from_file(str(Path(folder) / "tokenizer.json")))

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat(self, messages, add_generation_prompt=True):
        """ChatML: each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`; Qwen adds its own system turn
        when the conversation has none. Special tokens in the rendered text encode to their ids, as in HF."""
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.DEFAULT_SYSTEM}, *messages]
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return self.encode(text + ("<|im_start|>assistant\n" if add_generation_prompt else ""))
