"""A script's flags from its config dataclass: the one place where a command line becomes a config.

Every field is a flag, --name. The field's trailing comment in the class is the flag's --help, and a field typed
Literal[...] takes only those values, so a wrong one is an argparse error before anything loads. --config FILE.json
sets fields that flags then override. --resume (bare: latest) bases the config on the checkpoint's own
experiment_config.json, so a resumed run is the run it continues.
"""
import argparse
import inspect
import io
import json
import tokenize
import typing
from dataclasses import asdict, fields
from pathlib import Path

import checkpoint


def parse_config(cls, argv=None, fixed_on_resume=(), description=None):
    """The `cls` config of the command line `argv` (default: sys.argv[1:]). With --resume a flag given again may
    change the checkpoint's config, except the fields in `fixed_on_resume`: they would make it another run."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)  # only the flags given appear
    parser.add_argument("--config", help="JSON file of config fields, e.g. a run's experiment_config.json")
    comments = field_comments(cls)
    for f in fields(cls):
        parser.add_argument(f"--{f.name}", help=help_text(comments.get(f.name, ""), f.default), **flag_kind(f))
    values = vars(parser.parse_args(argv))
    if "config" in values:
        values = {**read_config(cls, values.pop("config"), parser.error), **values}
    if not values.get("resume"):
        return make_config(cls, values)
    folder = checkpoint.resume_folder(values["resume"], values.get("output_dir", cls.output_dir))
    saved = make_config(cls, read_config(cls, folder / checkpoint.CONFIG_FILE, parser.error))
    cfg = make_config(cls, {**asdict(saved), **values, "resume": str(folder)})
    if changed := [f"--{k} {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in fixed_on_resume
                   if getattr(cfg, k) != getattr(saved, k)]:
        parser.error(f"--resume {folder}: these would make it another run, not a continuation: {', '.join(changed)}")
    return cfg


def flag_kind(f) -> dict:
    """How argparse reads a field: a bool as --name / --no-name, a tuple as a list of values, a Literal as one of its
    values, a bare --resume as "latest"."""
    if f.type is bool:
        return {"action": argparse.BooleanOptionalAction}
    if f.type == tuple[str, ...]:
        return {"nargs": "+"}
    if typing.get_origin(f.type) is typing.Literal:
        return {"choices": typing.get_args(f.type)}
    if f.name == "resume":
        return {"nargs": "?", "const": "latest"}
    return {"type": f.type}


def field_comments(cls) -> dict[str, str]:
    """Field name -> its trailing comment in the source of the class or, failing that, of a base class; none where
    no source can be read. The tokenizer finds the comments, so a "#" inside a default string is no comment."""
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):  # object has no fields
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments |= {t.line.split(":")[0].strip(): t.string.lstrip("#").strip()
                     for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    return comments


def help_text(comment: str, default) -> str:
    """The comment and the default (none shown for an empty or unset one), with argparse's % escaped."""
    shown = " ".join(default) if isinstance(default, tuple) else default
    text = comment if shown in ("", None) else f"{comment} (default: {shown})".lstrip()
    return text.replace("%", "%%")


def read_config(cls, path, error) -> dict:
    """The fields of a JSON config file; `error` gets a missing file, invalid JSON, an unknown field, or a value
    outside a Literal field's choices."""
    path = Path(path)
    if not path.is_file():
        error(f"{path}: no such file")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        error(f"{path}: not valid JSON ({e})")
    if not isinstance(values, dict) or (unknown := sorted(set(values) - {f.name for f in fields(cls)})):
        error(f"{path}: unknown fields {unknown if isinstance(values, dict) else values!r}")
    for f in fields(cls):
        if typing.get_origin(f.type) is typing.Literal and f.name in values and \
                values[f.name] not in typing.get_args(f.type):
            error(f"{path}: {f.name} {values[f.name]!r}: expected one of {typing.get_args(f.type)}")
    return values


def numbers(text: str, n: int) -> list[float] | None:
    """The `n` comma-separated numbers of a flag such as --reward_weights 1.0,0.1,0.0; None if it holds others."""
    try:
        values = [float(w) for w in text.split(",")]
    except ValueError:
        return None
    return values if len(values) == n else None


def make_config(cls, values: dict):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})  # JSON has no tuples
