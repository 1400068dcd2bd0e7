"""The one console table style (rich) and the Markdown tables."""

from __future__ import annotations

import io

from backdoorlab.tables import markdown, print_table


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_markdown_table_has_header_rule_and_rows():
    text = markdown(["drop", "ASR"], [["2 %", "99.1"], ["4 %", "—"]])
    assert text.splitlines() == ["| drop | ASR |", "|---|---|", "| 2 % | 99.1 |", "| 4 % | — |"]


def test_plain_output_when_not_a_terminal():
    out = io.StringIO()
    print_table(["method", "clean %", "ASR %"], [["fine-prune", "97.25", "3.1"], ["nc", "96.0", "100.0"]],
                title="all figures in %", file=out)
    text = out.getvalue()
    assert "\x1b[" not in text
    lines = text.splitlines()
    assert lines[0] == "all figures in %"
    assert all(line == line.rstrip() for line in lines)
    # numeric columns are right-aligned: the short number ends where the long one ends
    row1 = next(line for line in lines if line.startswith("fine-prune"))
    row2 = next(line for line in lines if line.startswith("nc"))
    assert row1.index("97.25") + 5 == row2.index("96.0") + 4
    assert row1.rindex("3.1") + 3 == row2.rindex("100.0") + 5


def test_wide_table_is_not_wrapped_when_captured():
    out = io.StringIO()
    long = "x" * 150
    print_table(["a", "b"], [[long, "1"]], file=out)
    assert any(long in line for line in out.getvalue().splitlines())


def test_brackets_are_kept_not_read_as_markup(monkeypatch):
    out = io.StringIO()
    print_table(["labels"], [["[3] [bold]x[/bold]"]], file=out)
    assert "[3] [bold]x[/bold]" in out.getvalue()


def test_terminal_gets_bold_header_but_not_with_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    tty = _Tty()
    print_table(["a"], [["1"]], file=tty)
    assert "\x1b[" in tty.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    tty = _Tty()
    print_table(["a"], [["1"]], file=tty)
    assert "\x1b[" not in tty.getvalue()
