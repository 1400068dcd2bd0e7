"""The README's command table is checked against the CLI parser and the registry."""

from __future__ import annotations

import re
from pathlib import Path

from backdoorlab import registry
from backdoorlab.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _table() -> str:
    text = README.read_text()
    start = text.index("## Commands")
    return text[start:text.index("\n## ", start + 1)]


def test_every_command_is_in_the_table_and_every_row_is_a_command():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = set(sub.choices)
    rows = set(re.findall(r"^\| `backdoorlab ([a-z-]+)", _table(), re.M))
    assert rows == commands


def test_every_registered_method_is_named_in_its_familys_row():
    for family, command in (("repair", "repair"), ("model-detector", "detect")):
        row = next(ln for ln in _table().splitlines() if ln.startswith(f"| `backdoorlab {command}"))
        named = set(re.findall(r"`([a-z-]+)`", row))
        assert {m.name for m in registry.methods(family)} <= named, family
