"""Ask a TinyReason model math problems: the reasoning streams token by token, then the final answer. A problem too
long for the model's context (max_position_embeddings in its config.json, answer included) is refused, never cut.

    python chat.py                                    # the last training's adapter (outputs/lora_adapter)
    python chat.py --adapter none --model Qwen/Qwen2.5-1.5B-Instruct
    python chat.py --prompt "A bookstore sells 15 books on Monday and twice as many on Tuesday. How many in all?"
"""
import math
import sys
from dataclasses import dataclass

import data
import stages
from config import parse_config
from generate import generate, stopped
from load import ModelFlags, context_length, load_from_flags, model_folder, resolve_model_flags
from tokenizer import Tokenizer


@dataclass
class ChatConfig(ModelFlags):
    system: str = data.SYSTEM_PROMPT  # system prompt (the training one)
    temperature: float = 0.1  # sampling temperature; 0: greedy
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens holding this much probability
    max_new_tokens: int = 512  # an answer is cut here
    prompt: str = None  # answer this one question and exit (no REPL)


class StreamDecoder:
    """Token ids in, printable text out. Byte-level BPE can split one character ("’", "€", CJK) over several tokens;
    a prefix of such a split decodes to U+FFFD, so text ending in it waits for the token that completes it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.n_shown = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        return "" if text.endswith("\ufffd") else self.flush(text)

    def flush(self, text: str | None = None) -> str:
        """The text not shown yet; at the end of an answer, even a character left incomplete."""
        text = self.tokenizer.decode(self.ids) if text is None else text
        new, self.n_shown = text[self.n_shown:], len(text)
        return new


def answer(model, tokenizer, prompt: list[int], args):
    """Stream the answer to a prompt to stdout as it is generated."""
    decoder = StreamDecoder(tokenizer)
    ids = generate(model, tokenizer, [prompt], args.max_new_tokens, args.temperature, args.top_p,
                   on_token=lambda row, token: print(decoder.push(token), end="", flush=True),
                   calculator=args.calculator, compile=args.compile)[0][0]
    print(decoder.flush())
    if not stopped(ids, tokenizer):
        print(f"[cut off at --max_new_tokens {args.max_new_tokens}]")


def main():
    args = parse_config(ChatConfig, description=__doc__)
    if not 0 <= args.temperature < math.inf or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        raise SystemExit("need a finite --temperature >= 0, 0 < --top_p <= 1 and --max_new_tokens >= 1")
    adapter, _ = resolve_model_flags(args)
    folder = model_folder(args)
    tokenizer, context = Tokenizer.from_pretrained(folder), context_length(folder)
    if args.prompt is not None:  # refused before the model loads
        prompt = data.prompt_ids(tokenizer, args.prompt, system=args.system, context=context)
    model, _ = load_from_flags(args, adapter)
    if adapter is not None:
        stages.load_verify(model, tokenizer, adapter)
    if args.prompt is not None:
        return answer(model, tokenizer, prompt, args)
    print("Type a math problem; exit, quit or Ctrl-D to leave.")
    sys.stdin.reconfigure(errors="surrogateescape")  # a bad byte stays in its line instead of ending the input
    while (question := ask()) is not None and question.lower() not in ("exit", "quit"):
        try:
            prompt = question and data.prompt_ids(tokenizer, question, system=args.system, context=context)
        except ValueError as e:  # too long: the session goes on
            print(f"[{e}]")
            continue
        if prompt:
            answer(model, tokenizer, prompt, args)


def ask() -> str | None:
    """The next problem typed; None at Ctrl-D or Ctrl-C. A line that is not UTF-8 is refused, the session goes on."""
    while True:
        try:
            question = input("Problem: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return None
        try:
            question.encode()
            return question
        except UnicodeEncodeError:
            print("[that line is not UTF-8 text: type it again]")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # mid-answer
        print()
    except (OSError, ValueError) as e:  # bad flags, files or checkpoints: the message alone says what to do
        raise SystemExit(f"chat.py: {e}")
