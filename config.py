"""A script's flags from its config dataclass: each field is a --flag, its trailing comment the --help, a Literal
field's values its choices. --config FILE.json sets fields that flags override; --resume starts from the checkpoint's
own experiment_config.json, so a resumed run is the run it continues.
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
        default = " ".join(f.default) if isinstance(f.default, tuple) else f.default
        text = comments.get(f.name, "") + ("" if default in ("", None) else f" (default: {default})")
        parser.add_argument(f"--{f.name}", help=text.strip().replace("%", "%%"), **flag_kind(f))  # argparse formats %
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
    """A bool as --name / --no-name, a tuple as a list, a Literal as one of its values, a bare --resume as latest."""
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
    """Field name -> its trailing comment in the class's (or a base class's) source; by the tokenizer, so a "#" in a
    default string is no comment."""
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):  # object has no fields
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments |= {t.line.split(":")[0].strip(): t.string.lstrip("#").strip()
                     for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    return comments


def read_config(cls, path, error) -> dict:
    """The fields of a JSON config file; `error` gets a missing file, bad JSON, an unknown field or a value of
    the wrong type or choice."""
    path = Path(path)
    if not path.is_file():
        error(f"{path}: no such file")
    try:
        values = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, or nested too deep for the parser
        error(f"{path}: not valid JSON ({e})")
    if not isinstance(values, dict) or (unknown := sorted(set(values) - {f.name for f in fields(cls)})):
        error(f"{path}: unknown fields {unknown if isinstance(values, dict) else values!r}")
    for f in fields(cls):
        if f.name in values and (what := expected(f, values[f.name])):
            error(f"{path}: {f.name} {values[f.name]!r}: expected {what}")
    return values


KINDS = {int: ((int,), "an integer"), float: ((int, float), "a number"), str: ((str,), "a string"),
         bool: ((bool,), "true or false")}  # type(): True is an int to isinstance


def expected(f, value) -> str | None:
    """What a JSON value of the field `f` must be, None if it is that (null stands for a default of None)."""
    if value is None and f.default is None:
        return None
    if typing.get_origin(f.type) is typing.Literal:
        return None if value in typing.get_args(f.type) else f"one of {typing.get_args(f.type)}"
    if f.type == tuple[str, ...]:
        return None if type(value) is list and all(type(v) is str for v in value) else "a list of strings"
    kinds, what = KINDS[f.type]
    return None if type(value) in kinds else what


def numbers(text: str, n: int) -> list[float] | None:
    """The `n` comma-separated numbers of a flag such as --reward_weights 1.0,0.1,0.0; None if it holds others."""
    try:
        values = [float(w) for w in text.split(",")]
    except ValueError:
        return None
    return values if len(values) == n else None


def make_config(cls, values: dict):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})  # JSON has no tuples
