"""Method options as dataclasses: one description gives the CLI flags, the TOML keys of `run`,
their validation and the help text.

A method's options are a dataclass whose fields are made with `opt` (default, one help line,
bounds or choices)::

    @dataclass
    class Options:
        drop: float = opt(4.0, "prune until validation accuracy drops this much", low=0, low_open=True)
        order: str = opt("increasing", "channel order", choices=("increasing", "decreasing"))

Field types: ``int``, ``float``, ``str``, ``bool`` and their ``| None`` forms. `add_arguments`
turns them into ``--drop``/``--order`` flags, `from_args` reads them back, `from_mapping` checks
a TOML table (unknown keys, wrong types and values out of range are `BadInput`), `describe` lists
them for ``backdoorlab list``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from backdoorlab.errors import BadInput

MISSING = dataclasses.MISSING


def opt(default: Any, help: str, *, low: float | None = None, high: float | None = None,
        low_open: bool = False, high_open: bool = False, choices: tuple | None = None) -> Any:
    """A dataclass field with its help line, bounds (``low``/``high``, ``*_open``: excluded) or
    ``choices``."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "choices": tuple(choices) if choices else None}
    return dataclasses.field(default=default, metadata=meta)


# -- bounded values (shared with the commands' own options) ---------------------------------------

def _fmt(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def bounds_text(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"expected {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"expected {'>' if low_open else '>='} {_fmt(low)}"
    if high is not None:
        return f"expected {'<' if high_open else '<='} {_fmt(high)}"
    return "expected a finite number"


def in_bounds(v: float, low, high, low_open: bool = False, high_open: bool = False) -> bool:
    if isinstance(v, float) and not math.isfinite(v):
        return False
    if low is not None and (v < low or (low_open and v == low)):
        return False
    return not (high is not None and (v > high or (high_open and v == high)))


def integer(low: int | None = None, high: int | None = None, what: str = ""):
    """argparse type: an integer within ``[low, high]`` (a bad value is one ``error:`` line, exit 2;
    ``what`` names the quantity in it)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not in_bounds(v, low, high):
            raise argparse.ArgumentTypeError(f"{what + ' ' if what else ''}{v} is out of range "
                                             f"({bounds_text(low, high)})")
        return v
    parse.__name__ = "integer"
    return parse


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False):
    """argparse type: a finite number within ``low``..``high`` (``*_open``: that end excluded)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not in_bounds(v, low, high, low_open, high_open):
            raise argparse.ArgumentTypeError(
                f"{text} is out of range ({bounds_text(low, high, low_open, high_open)})")
        return v
    parse.__name__ = "number"
    return parse


def parse_labels(text: str | None, num_classes: int, opt: str = "--labels") -> list[int] | None:
    """``all`` / None → None (every label); ``0,3,5`` and ranges ``10-19`` → sorted labels
    (``opt`` names the option in messages)."""
    if text is None or text.strip().lower() == "all":
        return None
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.update(range(int(lo), int(hi) + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise BadInput(f"{opt}: {part!r} is not a label, a range A-B or 'all'") from None
    bad = sorted(y for y in out if not 0 <= y < num_classes)
    if bad:
        raise BadInput(f"{opt}: {bad[:5]} out of range for a model with {num_classes} classes "
                       f"(0..{num_classes - 1})")
    if not out:
        raise BadInput(f"{opt}: no label given")
    return sorted(out)


# -- option dataclasses ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OptionInfo:
    name: str
    type: type          # int, float, str or bool
    optional: bool      # None allowed
    default: Any
    help: str
    low: float | None
    high: float | None
    low_open: bool
    high_open: bool
    choices: tuple | None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.low is None and self.high is None:
            return ""
        return bounds_text(self.low, self.high, self.low_open, self.high_open).removeprefix("expected ")


def infos(cls: type) -> list[OptionInfo]:
    """The options of a dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t, optional = hints[f.name], False
        args = typing.get_args(t)
        if typing.get_origin(t) in (typing.Union, types.UnionType) and type(None) in args:
            rest = [a for a in args if a is not type(None)]
            t, optional = rest[0], True
        if t not in (int, float, str, bool):
            raise TypeError(f"{cls.__name__}.{f.name}: option type {t} is not int, float, str or bool")
        m = f.metadata
        default = f.default if f.default is not MISSING else None
        out.append(OptionInfo(f.name, t, optional, default, m.get("help", ""), m.get("low"),
                              m.get("high"), m.get("low_open", False), m.get("high_open", False),
                              m.get("choices")))
    return out


def _check_value(info: OptionInfo, v: Any, where: str) -> Any:
    """``v`` as the option's type, or `BadInput`."""
    if v is None:
        if info.optional:
            return None
        raise BadInput(f"{where}: {info.name} needs a value")
    if info.type is bool:
        if not isinstance(v, bool):
            raise BadInput(f"{where}: {info.name} must be true or false, got {v!r}")
        return v
    if info.type is str:
        if not isinstance(v, str):
            raise BadInput(f"{where}: {info.name} must be a string, got {v!r}")
    elif isinstance(v, bool) or not isinstance(v, int | float) or (info.type is int and
                                                                    not float(v).is_integer()):
        kind = "an integer" if info.type is int else "a number"
        raise BadInput(f"{where}: {info.name} must be {kind}, got {v!r}")
    else:
        v = info.type(v)
        if not in_bounds(v, info.low, info.high, info.low_open, info.high_open):
            raise BadInput(f"{where}: {info.name} = {v!r} is out of range ({info.range_text()})")
    if info.choices and v not in info.choices:
        raise BadInput(f"{where}: {info.name} must be {info.range_text()}, got {v!r}")
    return v


def from_mapping(cls: type, mapping: Mapping[str, Any], where: str) -> Any:
    """An options instance from a TOML table (every key checked)."""
    known = {i.name: i for i in infos(cls)}
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise BadInput(f"{where}: unknown option(s) {', '.join(unknown)} (options: "
                       f"{', '.join(known) or 'none'})")
    values = {k: _check_value(known[k], v, where) for k, v in mapping.items()}
    try:
        return cls(**values)  # the options' own __post_init__ checks (alternatives, combinations)
    except BadInput as e:
        raise BadInput(f"{where}: {e}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type, title: str = "method options") -> None:
    """One flag per option; bounds and choices are checked by argparse (one line, exit 2)."""
    g = parser.add_argument_group(title)
    for i in infos(cls):
        help_text = i.help.replace("%", "%%")  # the default is shown by the CLI's help formatter
        if i.type is bool:
            g.add_argument(i.flag, dest=i.name, action=argparse.BooleanOptionalAction, default=i.default,
                           help=help_text)
            continue
        if i.choices:
            g.add_argument(i.flag, dest=i.name, choices=i.choices, default=i.default, help=help_text)
        elif i.type is str:
            g.add_argument(i.flag, dest=i.name, default=i.default, help=help_text)
        elif i.type is int:
            g.add_argument(i.flag, dest=i.name, default=i.default, help=help_text,
                           type=integer(None if i.low is None else int(i.low + i.low_open),
                                        None if i.high is None else int(i.high - i.high_open)))
        else:
            g.add_argument(i.flag, dest=i.name, default=i.default, help=help_text,
                           type=number(i.low, i.high, low_open=i.low_open, high_open=i.high_open))


def from_args(cls: type, ns: argparse.Namespace) -> Any:
    return cls(**{i.name: getattr(ns, i.name) for i in infos(cls)})


def to_flags(cls: type, values: Mapping[str, Any]) -> list[str]:
    """The command-line flags that set ``values`` (the inverse of `add_arguments`)."""
    by_name = {i.name: i for i in infos(cls)}
    out: list[str] = []
    for k, v in values.items():
        i = by_name[k]
        if i.type is bool:
            out.append(i.flag if v else "--no-" + i.flag[2:])
        elif v is not None:
            out += [i.flag, str(v)]
    return out


def describe(cls: type) -> list[dict]:
    """[{name, type, default, help, range}] for ``backdoorlab list``."""
    return [{"name": i.name, "type": i.type.__name__, "default": i.default, "help": i.help,
             "range": i.range_text()} for i in infos(cls)]
