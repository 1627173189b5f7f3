"""Step-aware reasoning (the NanoReason recipe): the think block in four tagged stages, a loss weighted by stage
(train.py --stage_weights), a second LoRA on only while the model verifies (--verify_adapter), and the metrics that
make the recipe's claims checkable (eval.py). docs/step-aware.md has a whole example.

    <think>
    UNDERSTAND
    Asked: How many clips did Natalia sell altogether in April and May?
    Given: 48
    PLAN
    1. 48/2
    2. 48+24
    EXECUTE
    Natalia sold 48/2 = 24 clips in May.
    Natalia sold 48+24 = 72 clips altogether in April and May.
    VERIFY
    48/2 = 24 ✓
    48+24 = 72 ✓
    Answer 72 = step 2 ✓
    </think>

    **Final Answer:** 72

A GSM8K record becomes this without a teacher, from its `<<a op b=c>>` annotations, each recomputed by the
calculator; a record that cannot be verified is skipped. A token's stage is that of the last tag line written up
to and including it: generation can tell a stage has begun only once its tag line is complete.
"""
import re
from pathlib import Path

import torch
from torch import nn

import lora
from calculator import evaluate
from data import IGNORE
from grade import THOUSANDS_RE, statements

STAGES = ("UNDERSTAND", "PLAN", "EXECUTE", "VERIFY")
UNDERSTAND, PLAN, EXECUTE, VERIFY = range(4)
TAGS = tuple(f"\n{s}\n" for s in STAGES)
FIELDS = tuple(s.lower() for s in STAGES)  # a trajectory record's stage fields
GATE_RULE = {"on_from_tag": TAGS[VERIFY]}  # in the verification adapter's config: eval.py and chat.py restore it
ANNOTATION = re.compile(r"<<([^<>]*)>>")
QUANTITY = re.compile(r"\d[\d,]*(?:\.\d+)?")
UPEV_RE = re.compile("".join(f"{re.escape(tag)}(?P<{f}>.*?)" for tag, f in zip(TAGS, FIELDS)) + "$", re.S)


def render(understand: str, plan: str, execute: str, verify: str, final: str) -> str:
    bodies = (understand, plan, execute, verify)
    return "<think>" + "".join(t + b for t, b in zip(TAGS, bodies)) + f"\n</think>\n\n**Final Answer:** {final}"


def from_gsm8k(question: str, solution: str) -> str | None:
    """The UPEV turn of a GSM8K record, or None when it cannot be verified."""
    if "####" not in solution:
        return None
    body, final = solution.rsplit("####", 1)
    final = final.strip().replace(",", "")
    calls = [call.rpartition("=") for call in ANNOTATION.findall(body)]  # (expression, "=", result)
    values = [evaluate(expression) for expression, _, _ in calls]
    if not calls or any(v is None or v != evaluate(result) for v, (_, _, result) in zip(values, calls)):
        return None
    if evaluate(final) not in values:
        return None
    sentences = re.split(r"(?<=[.?!])\s+", question.strip())
    asked = next((s for s in reversed(sentences) if s.endswith("?")), sentences[-1])
    given = ", ".join(dict.fromkeys(q.replace(",", "") for q in QUANTITY.findall(question))) or "none"
    step = len(values) - values[::-1].index(evaluate(final))  # the last step that computed the answer
    lines = [f"{expression} = {v} ✓" for (expression, _, _), v in zip(calls, values)]
    return render(f"Asked: {asked}\nGiven: {given}",
                  "\n".join(f"{i}. {expression}" for i, (expression, _, _) in enumerate(calls, 1)),
                  ANNOTATION.sub("", body).strip(), "\n".join(lines + [f"Answer {final} = step {step} ✓"]), final)


def upev_record(record: dict) -> dict:
    """A record for --format upev: its UPEV turn as `assistant`, "" when there is none (data.py then skips and counts
    it as malformed). A record with the four stages as fields (understand, plan, execute, verify: a teacher's) is
    rendered as it is, its final answer read after `####` in `answer`; a ready `assistant` is kept."""
    question, answer = record.get("question"), record.get("answer")
    if "assistant" in record or not isinstance(question, str) or not isinstance(answer, str):
        return record
    if all(isinstance(record.get(f), str) for f in FIELDS):
        final = answer.rsplit("####", 1)[-1].strip().replace(",", "")
        text = render(*(record[f].strip() for f in FIELDS), final) if final else None
    else:
        text = from_gsm8k(question, answer)
    return {**record, "assistant": text or ""}


def token_stages(tokenizer, ids: list[int]) -> list[int]:
    """The stage of each token of an assistant turn: that of the last tag line the text holds up to and including
    the token (UNDERSTAND before any: a plain turn is UNDERSTAND throughout)."""
    text, stages = "", []
    for t in ids:
        text += tokenizer.decode([t])
        stages.append(max((s for s, tag in enumerate(TAGS) if tag in text), default=UNDERSTAND))
    return stages


def weigh_by_stage(tokenizer, examples: list[dict], weights: list[float]) -> list[dict]:
    """Each example with `weights`, its targets' loss weights: the weight of each token's stage (the answer after
    </think> is in VERIFY's). train.py's loss is then Σ w·CE / Σ w."""
    for ex in examples:
        n_prompt = next(i for i, label in enumerate(ex["labels"]) if label != IGNORE)
        ex["weights"] = [0.0] * n_prompt + [weights[s] for s in token_stages(tokenizer, ex["input_ids"][n_prompt:])]
    return examples


def verifying(tokenizer, row: list[int], new: int) -> list[bool]:
    """For each of the last `new` tokens of a row of ids: whether the text of the row's turn (since its last
    <|im_start|>) holds the VERIFY tag up to and including that token. Training and generation both gate by it,
    so the adapter is on at the same tokens in both: from the token that completes the tag line on."""
    starts, start = [], 0  # where the turn of each token begins
    for i, t in enumerate(row):
        start = i if t == tokenizer.turn_start_id else start
        starts.append(start)
    return [TAGS[VERIFY] in tokenizer.decode(row[starts[p]:p + 1]) for p in range(len(row) - new, len(row))]


class VerifyGate:
    """The verification adapter: on every projection the first adapter wraps, a second pair verify_A, verify_B adds
    (alpha/r) B A x where the gate is on, nothing elsewhere (no output, no gradient). A forward pre-hook on the model
    sets the gate from the tokens it is given and those its KV cache holds, the same rule in training and generation.
    B starts at zero: a fresh adapter changes nothing."""

    def __init__(self, model: nn.Module, tokenizer, r: int, alpha: float):
        self.tokenizer, self.r, self.alpha, self.on = tokenizer, r, alpha, None
        self.layers = lora.lora_modules(model)
        for layer in self.layers.values():
            kw = dict(bias=False, device=layer.lora_A.weight.device, dtype=layer.lora_A.weight.dtype)
            layer.verify_A = nn.Linear(layer.base.in_features, r, **kw)
            layer.verify_B = nn.Linear(r, layer.base.out_features, **kw)
            nn.init.kaiming_uniform_(layer.verify_A.weight, a=5 ** 0.5)
            nn.init.zeros_(layer.verify_B.weight)
            layer.register_forward_hook(self.add)
        model.register_forward_pre_hook(self.set_gate, with_kwargs=True)

    def set_gate(self, model, args, kwargs):
        input_ids, cache = args[0], (args[2] if len(args) > 2 else kwargs.get("cache"))
        B, T = input_ids.shape
        rows = input_ids if cache is None else torch.cat([cache.ids[:B, :cache.len], input_ids], 1)
        self.on = torch.tensor([verifying(self.tokenizer, row, T) for row in rows.tolist()], device=input_ids.device)

    def add(self, layer, args, y):  # the forward hook of each wrapped layer: (B, T, out)
        return y + (self.alpha / self.r) * self.on[..., None] * layer.verify_B(layer.verify_A(args[0]))

    def params(self) -> dict:
        """verify_A and verify_B under the names PEFT gives a LoRA adapter of these layers."""
        return {f"base_model.model.{name}.lora_{ab}.weight": getattr(m, f"verify_{ab}").weight
                for name, m in self.layers.items() for ab in "AB"}


def add_verify_adapter(model: nn.Module, tokenizer, r: int = 16, alpha: float = 32) -> nn.Module:
    model.verify = VerifyGate(model, tokenizer, r, alpha)
    return model


def save_adapters(model: nn.Module, folder, base_model_name=None):
    """The first adapter in `folder`, the verification adapter in verify/ (PEFT's layout for a named adapter) with
    the gating rule in its config."""
    lora.save_adapter(model, folder, base_model_name)
    targets = sorted({name.rsplit(".", 1)[-1] for name in model.verify.layers})
    lora.write_adapter(Path(folder) / "verify", model.verify.params(), model.verify.r, model.verify.alpha, 0.0,
                       targets, base_model_name, tinyreason_gate=GATE_RULE)


def load_verify(model: nn.Module, tokenizer, adapter_dir) -> nn.Module:
    """The verification adapter that save_adapters wrote beside the first (already loaded), if there is one: its
    file checked against the first adapter's layers before the second pair is added (lora.read_adapter)."""
    folder = Path(adapter_dir) / "verify"
    if not folder.is_dir():
        return model
    config = lora.read_adapter_config(folder)
    if config.get("tinyreason_gate") != GATE_RULE:
        raise ValueError(f"{folder}: gating rule {config.get('tinyreason_gate')!r}, expected {GATE_RULE!r}")
    layers = {name: m.base for name, m in lora.lora_modules(model).items()}
    tensors = lora.read_adapter(folder, layers, config["r"])
    params = add_verify_adapter(model, tokenizer, config["r"], config["lora_alpha"]).verify.params()
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[key])
    return model


def parse(text: str) -> dict | None:
    """The four stage bodies of an output's think block, or None when it lacks a tag or has them out of order."""
    match = UPEV_RE.search(text.split("</think>")[0])
    return match.groupdict() if match else None


def arithmetic(text: str) -> str:
    """Text with the writing differences of one computation removed: `$`, thousands separators, x for *."""
    text = THOUSANDS_RE.sub("", text).replace("$", "")
    return text.translate(str.maketrans({"x": "*", "×": "*", "÷": "/", "−": "-"}))


def plan_faithfulness(plan: str, execute: str) -> tuple[int, int]:
    """(carried out, planned): a PLAN line `N. expression` is carried out when EXECUTE holds the expression, up to
    `arithmetic`'s differences, not inside a longer number."""
    ops = [re.sub(r"\s", "", arithmetic(op)) for op in re.findall(r"^\s*\d+\.\s*(\S.*)$", plan, re.M)]
    execute = re.sub(r"\s", "", arithmetic(execute))
    return sum(bool(re.search(rf"(?<![\d.]){re.escape(op)}(?![\d.])", execute)) for op in ops), len(ops)


def checks(text: str) -> list[tuple[str, str, bool]]:
    """grade.statements with each expression up to `arithmetic`'s differences and without spaces, so a statement
    and its re-check compare equal."""
    return [(re.sub(r"\s", "", e), c, ok) for e, c, ok in statements(arithmetic(text))]


def metrics(text: str) -> dict:
    """eval.py's per-output figures for UPEV: whether the output is UPEV; if so, the plan carried out and the false
    EXECUTE statements, and whether VERIFY flagged one of them (stated its operation with another result)."""
    row = {"upev": (stages := parse(text)) is not None}
    if stages:
        false = [(e, c) for e, c, ok in checks(stages["execute"]) if not ok]
        rechecked = checks(stages["verify"])
        row |= {"plan": list(plan_faithfulness(stages["plan"], stages["execute"])), "execute_false": len(false),
                "flagged": any(e == e2 and float(c) != float(c2) for e, c in false for e2, c2, _ in rechecked)}
    return row


def ratio(k: int, n: int) -> str:
    return f"{k / n:.4f} ({k}/{n})" if n else f"n/a ({k}/{n})"


def summary(rows: list[dict]) -> list[str]:
    """The report lines of eval.py, over rows carrying `metrics` and `correct`."""
    upev = [r for r in rows if r["upev"]]
    wrong = [r for r in upev if r["execute_false"]]
    flagged = [r for r in wrong if r["flagged"]]
    return [f"UPEV format: {ratio(len(upev), len(rows))}",
            f"plan faithfulness: {ratio(sum(r['plan'][0] for r in upev), sum(r['plan'][1] for r in upev))}",
            f"self-verification: {ratio(len(flagged), len(wrong))} of outputs with a false EXECUTE statement "
            f"flagged one in VERIFY; {ratio(sum(r['correct'] for r in flagged), len(flagged))} of those answered "
            "correctly"]
