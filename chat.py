"""Ask a TinyReason model math problems: the reasoning streams token by token, then the final answer.

    python chat.py                                    # the last training's adapter (outputs/lora_adapter)
    python chat.py --adapter none --model Qwen/Qwen2.5-1.5B-Instruct
    python chat.py --prompt "A bookstore sells 15 books on Monday and twice as many on Tuesday. How many in all?"

`exit`, `quit`, Ctrl-D or Ctrl-C leave. The loading flags and defaults here are eval.py's too.
"""
import argparse
import json
from dataclasses import asdict
from pathlib import Path

import data
import lora
from tinyreason import DTYPES, Qwen2, Tokenizer, generate, resolve_checkpoint, resolve_precision
from train import TrainConfig


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


def add_model_flags(p: argparse.ArgumentParser):
    p.add_argument("--model", help="checkpoint folder or hub id (default: the adapter's base model)")
    p.add_argument("--adapter", default=TrainConfig.adapter_path, help="adapter folder, or 'none' for the base model")
    p.add_argument("--system", default=data.SYSTEM_PROMPT, help="system prompt (default: the training one)")
    p.add_argument("--quantize", choices=("nf4", "none"), help="base weights (default: as in training)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="default: bf16 where the hardware has it")


def resolve_model_flags(args) -> tuple[Path | None, dict]:
    """Check the adapter folder (cheap, before any weights load) and fill unset flags from the training run's
    experiment_config.json beside it, else from TrainConfig's defaults. Returns (adapter, that config)."""
    cfg = asdict(TrainConfig())
    adapter = None if args.adapter.lower() == "none" else Path(args.adapter)
    if adapter is not None:
        if not (adapter / "adapter_model.safetensors").is_file():
            raise SystemExit(f"--adapter: no adapter_model.safetensors in {adapter} "
                             "(train first, or pass --adapter none for the base model)")
        try:
            cfg["model"] = lora.read_adapter_config(adapter).get("base_model_name_or_path") or cfg["model"]
        except (OSError, ValueError) as e:
            raise SystemExit(f"--adapter: {e}")
        if (path := adapter / "experiment_config.json").is_file():
            cfg |= json.loads(path.read_text())
    args.model = args.model or cfg["model"]
    args.quantize = args.quantize or cfg["quantize"]
    args.device, args.dtype = resolve_precision(args.device, args.dtype)
    return adapter, cfg


def load_model(args, adapter: Path | None):
    """Base checkpoint (NF4 unless --quantize none) plus the LoRA adapter."""
    try:
        path = resolve_checkpoint(args.model)
    except (OSError, RuntimeError) as e:
        raise SystemExit(f"--model: {e}")
    model = Qwen2.from_pretrained(path, dtype=args.dtype, device=args.device,
                                  quantize=None if args.quantize == "none" else args.quantize)
    if adapter is not None:
        model = lora.load_adapter(model, adapter)
    return model.eval(), Tokenizer.from_pretrained(path)


def answer(model, tokenizer, question: str, args):
    """Stream one answer to stdout as it is generated."""
    decoder = StreamDecoder(tokenizer)
    prompt = tokenizer.apply_chat(data.prompt_messages(question, args.system))
    ids = generate(model, tokenizer, [prompt], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   on_token=lambda row, token: print(decoder.push(token), end="", flush=True))[0]
    print(decoder.flush())
    if len(ids) == args.max_new_tokens:
        print(f"[cut off at --max_new_tokens {args.max_new_tokens}]")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--temperature", type=float, default=0.1, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--prompt", help="answer this one question and exit (no REPL)")
    args = p.parse_args()
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        raise SystemExit("need --temperature >= 0, 0 < --top_p <= 1 and --max_new_tokens >= 1")
    adapter, _ = resolve_model_flags(args)
    model, tokenizer = load_model(args, adapter)
    if args.prompt is not None:
        return answer(model, tokenizer, args.prompt, args)
    print("Type a math problem; exit, quit or Ctrl-D to leave.")
    try:
        while (question := input("Problem: ").strip()).lower() not in ("exit", "quit"):
            if question:
                answer(model, tokenizer, question, args)
    except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C, at the prompt or mid-answer
        print()


if __name__ == "__main__":
    main()
