"""Tasks: what a dataset means to every script (nanochat's tasks/ is the model). A task says where its records come
from (a hub id, or a local .jsonl/.json/.parquet of the same fields), a record's question and gold answer, the
assistant turn SFT trains on, how an answer is read from an output (strict: where the prompt style puts it, for the
rewards; flexible: for eval), how it is judged against the gold, and the rewards built from that judgement.

    task = load_task("math")                     # or "gsm8k", or your own: "path/to/task.py" (docs/tasks.md)
    records = task.records("", "test")           # the hub's MATH-500; malformed records skipped and named
    task.judge(task.extract(output), task.gold(records[0]))

One grader per task: eval.py, rl.py's rewards and distill.py's selection all call the same `judge`.
"""
import functools
import importlib
import importlib.util
import sys
from pathlib import Path

import data
import grade


class Task:
    """The defaults a task of your own starts from: records with `question`, `answer` and optionally `solution`
    fields, the answer read where the prompt style puts it and judged equal as text. Override what differs."""
    hub = None  # the hub dataset used when --data is not given; None: --data is needed
    hub_config = None  # its config ("main" for GSM8K)
    fields = ("question", "answer")  # a local file must have records with these
    needs = "a 'question' and an 'answer'"  # what a usable record has, for the messages that skip or refuse one
    answer_hint = "the answer alone"  # distill.py's teacher writes this after **Final Answer:**
    group_by = ()  # record fields eval.py also reports accuracy by (MATH: level, subject)

    def source(self, split: str) -> str:
        """Where the records of `split` come from when --data is empty."""
        if self.hub is None:
            raise ValueError(f"{type(self).__name__} has no default data: pass --data FILE")
        return self.hub

    def load(self, source: str, split: str) -> list[tuple[str, dict]]:
        """(where, record) pairs of `source`, `where` naming the record in messages ("line 12")."""
        return data.read_records(source, split, self.hub_config, self.fields)

    def records(self, source: str, split: str, log=print, keep=None) -> list[dict]:
        """The records of `source` (empty: the task's own for `split`) that `keep` accepts (default: `usable`); the
        others are skipped, counted and named in the log."""
        source = source or self.source(split)
        numbered, keep = self.load(source, split), keep or self.usable
        if bad := [where for where, record in numbered if not keep(record)]:
            log(f"data: {len(bad)} of {len(numbered)} records of {source} skipped as malformed "
                f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): a record needs {self.needs}")
        return [record for _, record in numbered if keep(record)]

    def usable(self, record: dict) -> bool:
        return self.question(record) is not None and self.gold(record) is not None

    def question(self, record: dict) -> str | None:
        question = record.get("question")
        return question if isinstance(question, str) and question.strip() else None

    def gold(self, record: dict) -> str | None:
        answer = record.get("answer")
        return str(answer).strip() if answer is not None and str(answer).strip() else None

    def solution(self, record: dict, calculator: bool = False) -> str | None:
        """The assistant turn SFT trains on: a distilled trace as it is, else the record's `solution` as the think
        block and the gold as the final answer; None when there is neither."""
        if "assistant" in record:
            return record["assistant"] or None
        steps, gold = record.get("solution"), self.gold(record)
        if not isinstance(steps, str) or not steps.strip() or gold is None:
            return None
        return f"<think>\n{steps.strip()}\n</think>\n\n**Final Answer:** {self.final(gold)}"

    def sft_record(self, record: dict, calculator: bool = False) -> dict:
        """The record as data.py trains it: question and assistant turn ("" when it has none: skipped)."""
        return {"question": self.question(record), "answer": "", "assistant": self.solution(record, calculator) or ""}

    def final(self, gold: str) -> str:
        """The gold as the trained format writes it after **Final Answer:**."""
        return gold

    def extract(self, text: str, style: str = None) -> str | None:
        """The answer of an output: with a prompt `style`, only where that style puts it (strict, for the rewards);
        without, read flexibly (eval)."""
        return grade.answer_span(text, style) if style else grade.extract_answer(text)

    def normalize(self, answer: str | None) -> str:
        """The answer as eval.py's --out lines show it (`normalized`, and the gold)."""
        return "" if answer is None else answer.strip()

    def judge(self, answer: str | None, gold: str) -> bool:
        return self.normalize(answer) != "" and self.normalize(answer) == self.normalize(gold)

    def rewards(self, text: str, gold: str, style: str, stopped: bool) -> dict[str, float]:
        """RL's reward parts (grade.rewards) with this task's strict reading and judgement."""
        return grade.rewards(text, gold, style, stopped, self.extract, self.judge)


class GSM8K(Task):
    """Grade-school math (Cobbe et al. 2021): the answer after `####`, read flexibly and compared as a number."""
    hub, hub_config = "openai/gsm8k", "main"
    needs = "a 'question' and an 'answer' ending in '#### N'"
    answer_hint = "the number alone"

    def gold(self, record):
        return data.gold_answer(record)

    def solution(self, record, calculator=False):
        example = data.format_example(record, calculator)
        return example[1] if example else None

    def normalize(self, answer):
        return grade.normalize(answer)

    def judge(self, answer, gold):
        return grade.is_correct(grade.normalize(answer), grade.normalize(gold))


MATH_500 = "HuggingFaceH4/MATH-500"  # 500 problems of MATH's test split (Lightman et al. 2023)
HENDRYCKS = "EleutherAI/hendrycks_math"  # the 7,500 training problems, one config per subject, no answer field
SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra",
            "precalculus")


class MATH(Task):
    """Competition math (Hendrycks et al. 2021): problem/solution/answer records, the answer in the last \\boxed{}
    (nested braces included), equivalence judged by math-verify, which reads LaTeX into sympy: \\dfrac{3}{4}, 3/4 and
    0.75 are one answer, and so are x=3 and 3, (1,-2) and \\left( 1, -2 \\right)."""
    fields = ("problem",)
    needs = "a 'problem' and a non-empty 'answer'"
    answer_hint = "the final answer in \\boxed{}"
    group_by = ("level", "subject")
    timeout = 5  # seconds for each parse and each comparison; past it the answer is wrong

    def source(self, split):
        return MATH_500 if split == "test" else HENDRYCKS

    def load(self, source, split):
        if source != HENDRYCKS:
            return data.read_records(source, split, None, self.fields)
        return [(f"{subject} {where}", {"problem": r["problem"], "solution": r["solution"],
                                        "answer": grade.last_boxed(r["solution"]), "subject": r["type"],
                                        "level": r["level"].removeprefix("Level ")})
                for subject in SUBJECTS for where, r in data.read_records(source, split, subject)]

    def question(self, record):
        problem = record.get("problem")
        return problem if isinstance(problem, str) and problem.strip() else None

    def solution(self, record, calculator=False):
        """The reference solution as the think block, its boxes unboxed, then the gold boxed as the final answer."""
        if "assistant" in record:
            return record["assistant"] or None
        steps, gold = record.get("solution"), self.gold(record)
        if not isinstance(steps, str) or grade.last_boxed(steps) is None or gold is None:
            return None
        return f"<think>\n{grade.unbox(steps).strip()}\n</think>\n\n**Final Answer:** {self.final(gold)}"

    def final(self, gold):
        return f"\\boxed{{{gold}}}"

    def extract(self, text, style=None):
        """The last \\boxed{} content; strict: the box inside the style's answer span; flexible: the last box
        anywhere, else the text after **Final Answer:**."""
        if style is None:
            box = grade.last_boxed(text)
            return box if box is not None else grade.answer_span(text, "tinyreason")
        span = grade.answer_span(text, style)  # for the boxed style, already the last box's content
        return span if style == "boxed" or span is None else grade.last_boxed(span)

    def judge(self, answer, gold):
        """math-verify's verdict on the two, each read as a \\boxed{} content. Its timeouts are SIGALRM alarms:
        call this from the main thread (or a worker process), never from a thread."""
        if not answer or not answer.strip() or not gold:
            return False
        from math_verify import parse, verify  # here, so a GSM8K run never imports it (nor sympy)
        parsed = [parse(f"\\boxed{{{s}}}", parsing_timeout=self.timeout) for s in (gold, answer)]
        return verify(*parsed, timeout_seconds=self.timeout)  # a timeout inside either reads as not equal

    def rewards(self, text, gold, style, stopped):
        """The format part also needs a well-formed \\boxed{} in the answer's place (the Nexus recipe's bonus)."""
        parts = super().rewards(text, gold, style, stopped)
        return parts | {"format": parts["format"] * (self.extract(text, style) is not None)}


BUILT_IN = {"gsm8k": GSM8K, "math": MATH}


@functools.cache
def load_task(spec: str) -> Task:
    """A built-in task by name, or your own: `path/to/task.py` (its `task`, an instance or a class) or
    `path/to/task.py:Name` / `package.module:Name`. Only code you name here is imported; data never runs."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]()
    where, _, name = spec.partition(":")
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise FileNotFoundError(f"--task {spec}: no such file {where}")
        module_name = f"tinyreason_task_{Path(where).stem}"
        loader = importlib.util.spec_from_file_location(module_name, where)
        module = sys.modules[module_name] = importlib.util.module_from_spec(loader)  # dataclasses look it up
        loader.loader.exec_module(module)
    elif name:
        module = importlib.import_module(where)
    else:
        raise ValueError(f"--task {spec!r}: expected one of {', '.join(BUILT_IN)}, a file path/to/task.py, or "
                         "package.module:Name")
    task = getattr(module, name or "task", None)
    task = task() if isinstance(task, type) else task
    if not isinstance(task, Task):
        raise ValueError(f"--task {spec}: {name or 'task'} should be a tasks.Task (or a subclass of it), "
                         f"got {type(task).__name__}")
    return task
