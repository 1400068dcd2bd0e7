"""One table style for the console and one for Markdown files.

The console tables are drawn by `rich` (header rule, numbers right-aligned, no outer frame so a row
can be copied as it is). Bold headers only appear on a terminal and never when ``NO_COLOR`` is set;
piped or captured output is plain text with the table at its natural width (no wrapping at 80 columns).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import TextIO

_NUMBER = re.compile(r"^[−+-]?[\d,]*\.?\d+( ?%)?( ± [\d.]+)?$")
_MARKERS = {"", "—", "not reached"}  # cells that say there is no figure; they do not decide alignment


def _numeric(column: list[str]) -> bool:
    body = [c for c in column if c not in _MARKERS]
    return bool(body) and all(_NUMBER.match(c) for c in body)


def markdown(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown (GitHub) table; cells are written with ``str``."""
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(head: Sequence[str], rows: Sequence[Sequence[object]], *, title: str | None = None,
                file: TextIO | None = None) -> None:
    """Print a table to ``file`` (standard output by default) in the project's one console style."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    f = file if file is not None else sys.stdout
    tty = hasattr(f, "isatty") and f.isatty()
    styled = tty and not os.environ.get("NO_COLOR")
    console = Console(file=f, width=None if tty else 100_000, highlight=False, soft_wrap=False,
                      no_color=not styled or None, emoji=False, force_terminal=None if styled else False)
    cells = [[str(c) for c in r] for r in rows]
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", show_edge=False, pad_edge=False,
                  header_style="bold" if styled else "", title_style="")
    for i, h in enumerate(head):
        col = [r[i] if i < len(r) else "" for r in cells]
        table.add_column(Text(str(h)), justify="right" if _numeric(col) else "left", overflow="fold")
    for r in cells:
        table.add_row(*(Text(c) for c in r + [""] * (len(head) - len(r))))
    with console.capture() as cap:
        console.print(table)
    f.write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))
