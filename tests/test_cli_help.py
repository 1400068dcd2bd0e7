"""Every (sub)command's ``--help``: each option has a help line, and a default that says something
is shown by the one help formatter (`commands.common.HelpFormatter`), once. The parsers are walked
from `build_parser`, so commands and registered methods added later are checked too.

Run as a script (``python tests/test_cli_help.py``) it prints the audit: options without help,
defaults not shown, defaults stated twice."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from backdoorlab.cli import build_parser, main
from backdoorlab.commands.common import HelpFormatter

WIDE = "1000"  # COLUMNS: one line per option, so a default is never split by the wrapping
NO_VALUE = (argparse._StoreConstAction, argparse._CountAction, argparse._HelpAction,  # store_true too
            argparse._VersionAction, argparse._SubParsersAction)


def walk(p: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of the program and every sub-command, depth first."""
    yield path, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, q in a.choices.items():
                yield from walk(q, (*path, name))


PARSERS = dict(walk(build_parser()))
IDS = [" ".join(path) or "backdoorlab" for path in PARSERS]


def has_default(a: argparse.Action) -> bool:
    """A default worth showing: a value, not None / nothing, nor the off state of a plain switch
    (a --x/--no-x pair shows False too: which of the two is the default)."""
    if isinstance(a, NO_VALUE) or a.default in (None, argparse.SUPPRESS, "", []):
        return False
    return a.option_strings != [] or a.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


def name(a: argparse.Action) -> str:
    return "/".join(a.option_strings) or a.dest


def problems(p: argparse.ArgumentParser, shown: str) -> list[str]:
    """What is wrong with the help of ``p``; ``shown`` is its --help output."""
    out = []
    f = p._get_formatter()
    shown = " ".join(shown.split())  # the layout (help column, line breaks) aside
    for a in p._actions:
        if a.help is argparse.SUPPRESS:
            continue
        if isinstance(a, argparse._SubParsersAction):
            out += [f"{c.dest}: no help" for c in a._choices_actions if not (c.help or "").strip()]
            continue
        if not (a.help or "").strip():
            out.append(f"{name(a)}: no help")
            continue
        block = " ".join(f._format_action(a).split())
        if block not in shown:
            out.append(f"{name(a)}: not in --help as formatted")
        if has_default(a):
            if f"(default: {a.default})" not in block:
                out.append(f"{name(a)}: default {a.default!r} not shown: {block}")
            elif len(re.findall(r"\bdefault\b", block, re.I)) > 1:
                out.append(f"{name(a)}: default stated twice: {block}")
    return out


def help_text(path: tuple[str, ...], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", WIDE)


def test_every_command_is_walked():
    assert len(PARSERS) > 20  # the programme, its commands and every registered method
    for family, command in (("repair", "repair"), ("model-detector", "detect"),
                            ("input-detector", "detect"), ("data-inspector", "inspect")):
        from backdoorlab import registry

        for m in registry.methods(family):
            assert (command, m.name) in PARSERS


@pytest.mark.parametrize("path", list(PARSERS), ids=IDS)
def test_help_exits_0(path, capsys):
    assert "usage: backdoorlab" in help_text(path, capsys)


@pytest.mark.parametrize("path", list(PARSERS), ids=IDS)
def test_every_option_has_help_and_shows_its_default(path, capsys):
    p = PARSERS[path]
    assert p.formatter_class is HelpFormatter  # the one formatter, on every parser
    assert problems(p, help_text(path, capsys)) == []


def test_an_option_without_help_or_default_fails_the_audit(capsys):
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--bare", default=3)
    p.add_argument("--stated", default=3, help="three (default 3)")
    p.add_argument("--plain", default=3, help="three")
    p.add_argument("--flag", action="store_true", help="a switch")
    shown = p.format_help()
    assert problems(p, shown) == ["--bare: no help", "--stated: default stated twice: --stated STATED "
                                  "three (default 3) (default: 3)"]
    plain = argparse.ArgumentParser()
    plain.add_argument("--plain", default=3, help="three")
    assert problems(plain, plain.format_help()) == ["--plain: default 3 not shown: --plain PLAIN three"]


def test_method_options_show_their_description_and_default(capsys):
    """Flags generated from a method's options dataclass: the help is its own description."""
    from backdoorlab import registry
    from backdoorlab.options import infos

    m = registry.get("prune", "repair")
    shown = " ".join(help_text(("repair", "prune"), capsys).split())
    for i in infos(m.options):
        assert " ".join(i.help.split()) in shown
        if i.default is not None:
            assert f"{' '.join(i.help.split())} (default: {i.default})" in shown


def test_text_written_with_line_breaks_is_kept(capsys):
    shown = help_text(("poison",), capsys)
    assert "\n  image:FILE.png[,scale=1,pos=X,Y,margin=0,alpha=1]      picture with alpha mask\n" in shown
    assert "\n  --rate R   training set: round(R x N) images" in shown


def test_help_of_the_installed_program():
    r = subprocess.run([sys.executable, "-m", "backdoorlab", "repair", "prune", "--help"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "(default: " in r.stdout, r.stderr


if __name__ == "__main__":
    import os

    os.environ["COLUMNS"] = WIDE
    failed = 0
    for path, p in PARSERS.items():
        found = problems(p, p.format_help())
        failed += len(found)
        for line in found:
            print(f"backdoorlab {' '.join(path)} {line}")
    print(f"{len(PARSERS)} parsers, {failed} problems")
    sys.exit(1 if failed else 0)
