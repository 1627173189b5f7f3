"""Multi-digit multiplication, a task of your own in one file: the records are made here (nothing to download), each
solution works the product out in three checkable lines for SFT, and an answer is right when its only number is the
product. docs/tasks.md walks through it.

    python train.py --task examples/multiplication.py --max_steps 50
    python rl.py --task examples/multiplication.py --max_steps 20         # from that SFT adapter
    python eval.py --adapter outputs/rl_adapter --limit 200               # the adapter's task, its test problems
"""
import random
import re

from tasks import Task

PROBLEMS = 2000  # per split


class Multiplication(Task):
    """a * b for a of 2 to 4 digits and b of 2, drawn from a generator seeded by the split: train and test differ."""
    answer_hint = "the product alone"  # what distill.py's teacher is told to write after **Final Answer:**

    def source(self, split):
        return f"multiplication-{split}"  # no --data: load makes the records

    def load(self, source, split):
        if not source.startswith("multiplication-"):
            return super().load(source, split)  # --data FILE: your own question/answer/solution records
        rng = random.Random(source)
        return [(f"problem {i}", problem(rng.randint(10, 9999), rng.randint(10, 99))) for i in range(PROBLEMS)]

    def judge(self, answer, gold):
        """"1,234" and "1234." are 1234; "12 or 1234" is no answer."""
        return re.findall(r"\d+", re.sub(r"(?<=\d),(?=\d{3})", "", answer or "")) == [gold]


def problem(a: int, b: int) -> dict:
    """A record: the question, the gold, and a solution whose lines are `x * y = z` statements (the reasoning
    reward checks each)."""
    tens, ones = divmod(b, 10)
    steps = f"{a} * {ones} = {a * ones}\n{a} * {10 * tens} = {a * 10 * tens}\n{a * ones} + {a * 10 * tens} = {a * b}"
    return {"question": f"What is {a} * {b}?", "answer": str(a * b), "solution": steps}


task = Multiplication()
