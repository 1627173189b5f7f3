"""A checkpoint's tokenizer (its tokenizer.json, through the `tokenizers` library) and its chat format, written out
by hand and tested token for token against the checkpoint's own template: ChatML (Qwen, SmolLM2), Llama-3's headers,
or, for a checkpoint without a template (Phi-2), the plain <|system|>/<|user|>/<|assistant|> lines of the Infused
card. The template is read only for which format it is and its default system prompt: it never runs.
"""
import re
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from weights import inside, read_json

# format -> (the token that closes a turn: the loss's last target and a stop; the token that opens one)
TURN_TOKENS = {"chatml": ("<|im_end|>", "<|im_start|>"), "llama3": ("<|eot_id|>", "<|start_header_id|>"),
               "plain": (None, None)}  # plain: a turn ends with the checkpoint's end-of-sequence token
CHATML_SYSTEM = re.compile(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}<]+)<\|im_end\|>")  # the template's default


class Tokenizer:
    def __init__(self, tok, template: str = "", eos_tokens=(), pad_token=None):
        self.tok = tok
        self.format = ("chatml" if "<|im_start|>" in template else "llama3" if "<|start_header_id|>" in template
                       else "plain" if not template.strip() else None)
        if self.format is None:
            raise ValueError("its chat template is neither ChatML nor Llama-3's headers, the formats TinyReason writes")
        eot, start = TURN_TOKENS[self.format]
        eot = eot or next(iter(eos_tokens), "<|endoftext|>")
        ids = {s: tok.token_to_id(s) for s in (eot, start, *eos_tokens, pad_token) if s}
        if missing := [s for s in (eot, start) if s and ids[s] is None]:
            raise ValueError(f"its vocabulary lacks the {self.format} format's special tokens {missing}")
        self.eot_id, self.turn_start_id = ids[eot], ids.get(start)
        end_of_text = tok.token_to_id("<|endoftext|>")  # where a base model's text ends, in all of these
        self.stop_ids = list(dict.fromkeys(i for i in (self.eot_id, *map(ids.get, eos_tokens), end_of_text)
                                           if i is not None))
        self.pad_id = ids.get(pad_token) if ids.get(pad_token) is not None else self.eot_id  # padding is masked
        self.default_system = m[1] if (m := CHATML_SYSTEM.search(template)) else None
        self.dated = "Cutting Knowledge Date" in template  # Llama-3.1 and later: a dated system turn, always
        self.today = "strftime_now" in template  # Llama-3.2: the date of today, else the template's fixed one
        self.max_token_bytes = max(len(t.encode()) for t in tok.get_vocab())  # no token covers more text than this

    @classmethod
    def from_pretrained(cls, folder):
        """The tokenizer of a checkpoint folder: tokenizer.json, its chat template (tokenizer_config.json or
        chat_template.jinja) and the end-of-sequence tokens of its configs."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(inside(folder, "tokenizer.json")))
        except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
            raise ValueError(f"{folder / 'tokenizer.json'}: not a tokenizer file the tokenizers library reads ({e})")
        config = optional_json(inside(folder, "tokenizer_config.json"))
        template = config.get("chat_template") or ""
        if isinstance(template, list):  # named templates
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            "")
        if (folder / "chat_template.jinja").exists():
            template = inside(folder, "chat_template.jinja").read_text()
        if not isinstance(template, str) or not all(isinstance(text(config.get(k)), (str, type(None)))
                                                    for k in ("eos_token", "pad_token")):
            raise ValueError(f"{folder / 'tokenizer_config.json'}: chat_template, eos_token and pad_token must be text")
        eos = [text(config.get("eos_token"))]
        for name in ("config.json", "generation_config.json"):
            ids = optional_json(inside(folder, name)).get("eos_token_id")
            eos += [tok.id_to_token(i) for i in (ids if isinstance(ids, list) else [ids]) if isinstance(i, int)]
        try:
            return cls(tok, template, [e for e in dict.fromkeys(eos) if e], text(config.get("pad_token")))
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from None

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat(self, messages, add_generation_prompt=True):
        """The token ids of `messages` ({"role", "content"} dicts) as the checkpoint's template renders them, then
        the assistant's opening when add_generation_prompt. Special tokens in the text encode to their ids."""
        turns = [(m["role"], m["content"]) for m in messages]
        if self.format == "chatml":  # <|im_start|>{role}\n{content}<|im_end|>\n
            if self.default_system and (not turns or turns[0][0] != "system"):
                turns.insert(0, ("system", self.default_system))
            text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
            return self.encode(text + "<|im_start|>assistant\n" * add_generation_prompt)
        if self.format == "plain":  # <|{role}|>\n{content}\n
            text = "".join(f"<|{role}|>\n{content}\n" for role, content in turns)
            return self.encode(text + "<|assistant|>\n" * add_generation_prompt)
        turns = [(role, content.strip()) for role, content in turns]  # llama3 trims every turn
        if self.dated:
            system, turns = (turns[0][1], turns[1:]) if turns and turns[0][0] == "system" else ("", turns)
            date = datetime.now().strftime("%d %b %Y") if self.today else "26 Jul 2024"
            turns.insert(0, ("system", f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{system}"))
        text = "".join(f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>" for role, content in turns)
        return self.encode("<|begin_of_text|>" + text + "<|start_header_id|>assistant<|end_header_id|>\n\n"
                           * add_generation_prompt)


def optional_json(path: Path) -> dict:
    """A config file's JSON object (weights.read_json names a bad one), or {} when the checkpoint has none."""
    return read_json(path) if path.exists() else {}


def text(token) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or {"content": ...} in older files."""
    return token.get("content") if isinstance(token, dict) else token
