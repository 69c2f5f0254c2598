"""A job's config dataclass as its command line: each field declared once with :func:`option` (help,
choices, bounds) gives both the argparse flag (:func:`add_options`) and the check that a config built
in Python passes too (:func:`check_options`, called by the configs' ``validate()``).

Flags are the field names with dashes (``max_steps`` → ``--max-steps``); a bool field that defaults
to False is a ``--name`` switch, one that defaults to True a ``--no-name`` switch; a ``list[...]``
field takes one or more values; a field without a default is a required flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import MISSING
from typing import Any, Sequence

_KEY = "fastbert.option"
# Bounds several jobs share: torch and numpy take seeds that fit in a signed 64-bit integer; a learning
# rate above 1 is a typo for AdamW and LAMB alike (and 1e300 overflows the update).
MAX_SEED = 2**63 - 1
MAX_LR = 1.0


@dataclasses.dataclass(frozen=True)
class Option:
    """How a config field appears on the command line and what values it takes."""

    help: str
    choices: tuple[str, ...] | None = None
    at_least: float | None = None  # bounds; a float option is also always finite
    above: float | None = None
    below: float | None = None
    at_most: float | None = None
    cli: bool = True               # False: checked by validate(), but not (yet) a flag


def option(default: Any = MISSING, *, help: str, choices: Sequence[str] | None = None, at_least: float | None = None,
           above: float | None = None, below: float | None = None, at_most: float | None = None,
           cli: bool = True) -> Any:
    """A dataclass field with its command-line description (use as ``name: int = option(3, help=...)``)."""
    meta = Option(help, tuple(choices) if choices is not None else None, at_least, above, below, at_most, cli)
    return dataclasses.field(default=default, metadata={_KEY: meta})


@dataclasses.dataclass(frozen=True)
class _Declared:
    field: dataclasses.Field
    option: Option
    kind: type            # int, float, str, bool (of the elements, for a list)
    is_list: bool
    optional: bool        # None allowed


def option_of(f: dataclasses.Field) -> Option | None:
    """The option a dataclass field was declared with (None: a plain field, no flag and no check)."""
    return f.metadata.get(_KEY)


def _declared(config_class) -> list[_Declared]:
    """Every option of ``config_class``, in field order."""
    hints = typing.get_type_hints(config_class)
    found = []
    for f in dataclasses.fields(config_class):
        if option_of(f) is None:
            continue
        hint = hints[f.name]
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
        if optional:
            (hint,) = [k for k in typing.get_args(hint) if k is not type(None)]  # `X | None`, nothing wider
        is_list = typing.get_origin(hint) is list
        found.append(_Declared(f, option_of(f), typing.get_args(hint)[0] if is_list else hint, is_list, optional))
    return found


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _label(declared: _Declared) -> str:
    return flag(declared.field.name) if declared.option.cli else declared.field.name


# --- checking ----------------------------------------------------------------------------------------
def _describe(kind: type, opt: Option) -> str:
    """The rule in words: 'a positive integer', 'a number in (0, 1)', 'an integer >= 8', ..."""
    noun, article = ("integer", "an") if kind is int else ("number", "a")

    def show(bound: float) -> str:
        return str(int(bound)) if kind is int else f"{bound:g}"

    low = opt.above if opt.above is not None else opt.at_least
    high = opt.below if opt.below is not None else opt.at_most
    if low is not None and high is not None:
        left, right = "(" if opt.above is not None else "[", ")" if opt.below is not None else "]"
        return f"{article} {noun} in {left}{show(low)}, {show(high)}{right}"
    if opt.above == 0 or (kind is int and opt.at_least == 1):
        return f"a positive {noun}"
    if opt.above is not None:
        return f"{article} {noun} > {show(opt.above)}"
    if opt.at_least is not None:
        return f"{article} {noun} >= {show(opt.at_least)}"
    if high is not None:
        return f"{article} {noun} {'<' if opt.below is not None else '<='} {show(high)}"
    return f"{article} {noun}"


def _in_bounds(value: float, opt: Option) -> bool:
    # Written so that NaN fails every test (each comparison with NaN is False).
    return ((opt.at_least is None or value >= opt.at_least) and (opt.above is None or value > opt.above)
            and (opt.below is None or value < opt.below) and (opt.at_most is None or value <= opt.at_most))


def _check_value(label: str, value: Any, kind: type, opt: Option) -> None:
    if kind in (int, float):
        numeric = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not numeric or (kind is float and not math.isfinite(value)) \
                or not _in_bounds(value, opt):
            raise ValueError(f"{label} must be {_describe(kind, opt)}, got {value!r}")
    elif kind is str:
        if not isinstance(value, (str, os.PathLike)):  # paths are given as either
            raise ValueError(f"{label} must be text, got {value!r}")
        if not str(os.fspath(value)).strip():  # an empty --out would write into the current folder
            raise ValueError(f"{label} must not be empty")
    elif not isinstance(value, kind):
        raise ValueError(f"{label} must be a {kind.__name__}, got {value!r}")
    if opt.choices is not None and value not in opt.choices:
        raise ValueError(f"{label} must be one of {', '.join(opt.choices)}, got {value!r}")


def check_options(config) -> None:
    """ValueError naming the first field whose value breaks its type, choices or bounds (None is allowed
    where the field's type allows it)."""
    for declared in _declared(type(config)):
        value = getattr(config, declared.field.name)
        if value is None and declared.optional:
            continue
        if declared.is_list:
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{_label(declared)} must be a list of one or more values, got {value!r}")
            for item in value:
                _check_value(_label(declared), item, declared.kind, declared.option)
        else:
            _check_value(_label(declared), value, declared.kind, declared.option)


# --- the parser --------------------------------------------------------------------------------------
def add_options(parser: argparse.ArgumentParser, config_class) -> None:
    """One flag per option of ``config_class``, in field order, with the dataclass's defaults."""
    for declared in _declared(config_class):
        f, opt, kind = declared.field, declared.option, declared.kind
        if not opt.cli:
            continue
        text = opt.help
        if kind is bool:
            negated = f.default is True
            parser.add_argument(flag(f"no_{f.name}" if negated else f.name), dest=f.name, help=text,
                                action="store_false" if negated else "store_true")
            continue
        if f.default is MISSING:
            kwargs: dict[str, Any] = {"required": True}
        else:
            kwargs = {"default": f.default}
            if f.default is not None and "default" not in text:
                text += f" (default: {f.default})"
        if declared.is_list:
            kwargs["nargs"] = "+"
        parser.add_argument(flag(f.name), dest=f.name, type=kind, choices=opt.choices, help=text, **kwargs)


def from_args(config_class, args: argparse.Namespace):
    """The config the parsed flags describe (options the parser does not have keep their defaults)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})
