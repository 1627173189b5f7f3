"""Records as chat examples: records -> formatted turns -> token ids with completion-only labels -> length-grouped,
right-padded batches; GSM8K's rendering is here, other tasks' in tasks.py. A solution becomes one assistant turn, the
only target (docs/training.md):

    <think>
    Natalia sold 48/2 = 24 clips in May. ...
    </think>

    **Final Answer:** 72<|im_end|>
"""
import json
import os
import random
import re
from pathlib import Path

import torch

from calculator import evaluate, pieces

IGNORE = -100  # label of positions that carry no loss (prompt, padding)
SYSTEM_PROMPT = "You are a helpful assistant that solves math problems step-by-step."
BOXED_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."  # Qwen2.5-Math's prompt
ANSWER_TAGS_SYSTEM = (  # the Infused Phi-2 recipe's system prompt
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively.")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
ANNOTATION = re.compile(r"<<(.*?)>>")  # GSM8K calculator annotations, e.g. <<48/2=24>>
NUMBER = re.compile(r"-?\d+(\.\d+)?")


def is_local(source: str) -> bool:
    return Path(source).suffix in LOCAL_SUFFIXES or Path(source).exists()


def load_records(source: str, split: str = "train", config: str | None = "main",
                 fields: tuple[str, ...] = ("question", "answer")) -> list[dict]:
    """Records from the hub (dataset `config`) or a .jsonl/.json/.parquet file with `fields`, errors naming the line."""
    return [record for _, record in read_records(source, split, config, fields)]


def read_records(source: str, split: str = "train", config: str | None = "main",
                 fields: tuple[str, ...] = ("question", "answer")) -> list[tuple[str, dict]]:
    """load_records' records, each with where it sits ("line 12", "record 3") for messages that name it."""
    names = " and ".join(f"'{f}'" for f in fields)
    if not is_local(source):
        try:
            import datasets
            return [(f"record {i}", r) for i, r in enumerate(datasets.load_dataset(source, config, split=split))]
        except Exception as e:  # offline, unknown repo, missing split: all end the same way for the user
            raise OSError(f"could not load dataset {source!r} (split {split!r}) from the Hugging Face hub: {e}\n"
                          f"pass --data PATH to a local .jsonl/.json/.parquet file with {names} fields "
                          "(GSM8K's train.jsonl from github.com/openai/grade-school-math, for one)") from e
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        numbered = [(f"line {n}", parse_json(line, path, n)) for n, line in enumerate(utf8(path).split("\n"), 1)
                    if line.strip()]
    elif path.suffix == ".json":
        records = parse_json(utf8(path), path)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {json.dumps(records)[:60]}")
        numbered = [(f"record {i}", r) for i, r in enumerate(records)]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq
        numbered = [(f"record {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    else:
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use one of {LOCAL_SUFFIXES}")
    for where, record in numbered:
        if not isinstance(record, dict):
            raise ValueError(f"{path}, {where}: expected an object with {names}, got {json.dumps(record)[:60]}")
    if not any(set(fields) <= r.keys() for _, r in numbered):
        raise ValueError(f"{path}: no records with {'both ' if len(fields) == 2 else ''}{names} fields "
                         f"(expected a list of {{{', '.join(f'{f!r}: ...' for f in fields)}}} objects)")
    return numbered


def utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def read_appended(path: Path, log=print) -> list[dict]:
    """The records of a JSON-lines file written by appending (metrics.jsonl, distill.py's traces). A torn last line
    (a kill mid-write, a full disk) is cut from the file, with a note; a bad line before it is an error naming it."""
    lines, records = [line for line in utf8(path).split("\n") if line.strip()], []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError):
            if n < len(lines):
                raise ValueError(f"{path}: line {n} is not JSON") from None
            log(f"{path}: dropped its last line, cut short when it was written: {line[:40]!r}")
            replace_text(path, "".join(kept + "\n" for kept in lines[:-1]))
    if bad := next((n for n, record in enumerate(records, 1) if type(record) is not dict), None):
        raise ValueError(f"{path}: line {bad} is not a JSON object")
    return records


def replace_text(path: Path, text: str):
    """Write `text` as the file `path`, by a rename over it: a kill leaves the old file or the new, never half."""
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def parse_json(text: str, path: Path, line: int = 1):
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{path}, line {line}: not valid JSON (nested too deep for the parser)") from None
    except json.JSONDecodeError as e:
        jsonl = "; one object per line is a .jsonl file" if path.suffix == ".json" and e.msg == "Extra data" else ""
        raise ValueError(f"{path}, line {line + e.lineno - 1}: not valid JSON ({e.msg}{jsonl})") from None


def split_solution(answer: str, calculator: bool = False) -> tuple[str, str] | None:
    """GSM8K solution -> (steps, answer), or None if malformed; annotations go (or stay as calls), commas go."""
    steps, delimiter, final = answer.rpartition("####")
    steps = ANNOTATION.sub(tool_call if calculator else "", steps).strip()
    final = final.strip().replace(",", "")
    return (steps, final) if delimiter and steps and NUMBER.fullmatch(final) else None


def tool_call(annotation: re.Match) -> str:
    """`<<48/2=24>>` as the tool writes it ("4.00" -> "4"); "" where it would answer otherwise or not (`560//10`)."""
    expression, _, result = annotation[1].rpartition("=")
    value = evaluate(expression)
    return f"<<{expression}={value}>>" if value is not None and evaluate(result) == value else ""


def format_example(record: dict, calculator: bool = False) -> tuple[str, str] | None:
    """(question, assistant text) for a GSM8K record, or None when the record is malformed."""
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str) or not question.strip():
        return None
    if "assistant" in record:  # a ready trajectory (distill.py) is trained as it is; an empty one is skipped
        return (question.strip(), record["assistant"]) if record["assistant"] else None
    if not (parts := split_solution(answer, calculator)):
        return None
    return question.strip(), f"<think>\n{parts[0]}\n</think>\n\n**Final Answer:** {parts[1]}"


def gold_answer(record: dict) -> str | None:
    """The reference answer after `####`, commas removed; None when the record is malformed."""
    parts = split_solution(record.get("answer") or "")
    return parts[1] if parts else None


def prompt_messages(question: str, system: str = SYSTEM_PROMPT) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


TOO_LONG = "the prompt is {} tokens, past the model's context of {:,} (max_position_embeddings, answer included)"


def prompt_ids(tokenizer, question: str, style: str = "tinyreason", system: str = SYSTEM_PROMPT,
               context: int = None) -> list[int]:
    """tinyreason: the training prompt; boxed: Qwen-math's, under Qwen's default system turn; answer_tags: Phi-2's.
    A prompt that leaves the model's `context` no room for an answer is refused (ValueError), one of more bytes than
    `context` of the longest tokens hold untokenized, so a huge paste costs nothing."""
    if context and (n := len((system + question).encode())) > context * tokenizer.max_token_bytes:
        raise ValueError(TOO_LONG.format(f"at least {-(-n // tokenizer.max_token_bytes):,}", context))
    if style == "boxed":
        ids = tokenizer.apply_chat([{"role": "user", "content": question + BOXED_SUFFIX}])
    else:
        ids = tokenizer.apply_chat(prompt_messages(question, ANSWER_TAGS_SYSTEM if style == "answer_tags" else system))
    if context and len(ids) >= context:
        raise ValueError(TOO_LONG.format(f"{len(ids):,}", context))
    return ids


def fits(tokenizer, question: str, style: str, context: int) -> bool:
    """Whether a question's prompt leaves the model's context room for an answer."""
    try:
        return bool(prompt_ids(tokenizer, question, style, context=context))
    except ValueError:
        return False


def prepare_splits(records: list[dict], num_samples: int, validation_split: float, seed: int):
    """(train, validation, n_malformed): malformed records dropped, the rest shuffled, cut to `num_samples` if > 0."""
    good = [r for r in records if format_example(r) is not None]
    n_bad = len(records) - len(good)
    random.Random(seed).shuffle(good)
    if num_samples > 0:
        good = good[:num_samples]
    n_val = round(len(good) * validation_split)
    return good[n_val:], good[:n_val], n_bad


def build_example(tokenizer, record: dict, calculator: bool = False) -> dict:
    """Token ids, and labels IGNORE on the prompt and on what the calculator writes (`24>>`). The ids are those
    generation sees: the prompt as eval.py renders it, then each piece tokenized alone, then <|im_end|>."""
    question, assistant = format_example(record, calculator)
    input_ids = tokenizer.apply_chat(prompt_messages(question), add_generation_prompt=True)
    labels = [IGNORE] * len(input_ids)
    for piece, by_tool in pieces(assistant) if calculator else [(assistant, False)]:
        ids = tokenizer.encode(piece)
        input_ids, labels = input_ids + ids, labels + ([IGNORE] * len(ids) if by_tool else ids)
    return {"input_ids": input_ids + [tokenizer.eot_id], "labels": labels + [tokenizer.eot_id]}


def build_examples(tokenizer, records: list[dict], max_seq_length: int, calculator: bool = False):
    """(examples, n_dropped): examples longer than `max_seq_length` are dropped and counted, not cut. A record whose
    text has more bytes than max_seq_length of the longest tokens hold is too long for certain: dropped untokenized."""
    bound = max_seq_length * tokenizer.max_token_bytes
    short = [r for r in records if len("".join(format_example(r, calculator)).encode()) <= bound]
    examples = [build_example(tokenizer, r, calculator) for r in short]
    kept = [ex for ex in examples if len(ex["input_ids"]) <= max_seq_length]
    return kept, len(records) - len(kept)


def load_splits(records: list[dict], tokenizer, num_samples: int, validation_split: float, max_seq_length: int,
                seed: int, log=print, calculator: bool = False) -> tuple[list[dict], list[dict]]:
    """Train and validation examples of usable `records` (Task.records names the malformed ones it skips), logging
    the over-long ones dropped."""
    train_records, val_records, _ = prepare_splits(records, num_samples, validation_split, seed)
    train, n_long = build_examples(tokenizer, train_records, max_seq_length, calculator)
    val, n_long_val = build_examples(tokenizer, val_records, max_seq_length, calculator)
    log(f"data: {len(records)} usable records, {n_long + n_long_val} longer than {max_seq_length} tokens dropped "
        f"-> {len(train)} train, {len(val)} validation")
    if not train:
        raise ValueError("no training examples left")
    return train, val


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group: int = 64):
    """One epoch of index batches: shuffled by (seed, epoch), sorted by length within `group` batches, reshuffled."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size * group):
        chunk = sorted(order[start:start + batch_size * group], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def step_batches(examples: list[dict], batch_size: int, accumulation: int, seed: int, position: tuple[int, int],
                 pad_id: int) -> tuple[list[dict], tuple[int, int]]:
    """One step's micro-batches from data position (epoch, batch) and the next position; (seed, epoch) fixes an
    epoch's order, so a saved position resumes."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    epoch, index = position
    order = length_grouped_batches(lengths, batch_size, seed, epoch)
    out = []
    while len(out) < accumulation:
        if index == len(order):
            epoch, index = epoch + 1, 0
            order = length_grouped_batches(lengths, batch_size, seed, epoch)
        out.append(collate([examples[i] for i in order[index]], pad_id))
        index += 1
    return out, (epoch, index)


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest example, each (B, T): input_ids, labels, attention_mask, and weights if present."""
    lengths = torch.tensor([len(ex["input_ids"]) for ex in examples])
    T = int(lengths.max())

    def pad(key, fill, dtype=torch.long):
        return torch.tensor([ex[key] + [fill] * (T - len(ex[key])) for ex in examples], dtype=dtype)

    batch = {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", IGNORE),
             "attention_mask": (torch.arange(T) < lengths[:, None]).long()}
    if "weights" in examples[0]:
        batch["weights"] = pad("weights", 0.0, torch.float)
    return batch
