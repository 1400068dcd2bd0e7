"""Write a benchmark's generated Markdown between its markers, leaving the hand-written text alone."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, body: str, begin: str, end: str, head: str = "") -> None:
    """Put ``body`` (which starts with ``begin`` and ends with ``end``) in place of the text between
    those markers in ``path``; without the markers, append it (after ``head`` for a new file).
    Written atomically: an interrupted run leaves the old file."""
    from backdoorlab.io import atomic_path

    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        text = old[: old.index(begin)] + body + old[old.index(end) + len(end):]
    elif old:
        text = old.rstrip("\n") + "\n\n" + body + "\n"
    else:
        text = head + body + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
