"""Progress bars with ETA on stderr (silent when not a terminal unless forced), and a status file
that `run` reads to show each running cell's own progress.

``BACKDOORLAB_PROGRESS`` = 1 forces the bars on, 0 off (default: on when stderr is a terminal).
``BACKDOORLAB_STATUS`` = a file path (set by `run` in each cell): the current loop's description,
count, total and timing are written there as JSON, at most once a second.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
STATUS_ENV = "BACKDOORLAB_STATUS"
STATUS_EVERY = 1.0  # seconds between two writes of the status file


def enabled() -> bool:
    env = os.environ.get("BACKDOORLAB_PROGRESS")
    if env is not None:
        return env not in ("0", "", "no", "false")
    return sys.stderr.isatty()


def write_status(path: str, status: dict) -> None:
    """Replace the status file whole (a reader never sees half of it); never fails the work."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(status, f)
        os.replace(tmp, path)
    except OSError:
        pass


def read_status(path) -> dict | None:
    """The status a running cell wrote last, or None (not started, finished or unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            s = json.load(f)
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) else None


def status_text(s: dict | None) -> str:
    """``"train epoch 3/8 40 %, ~12 s left in it"`` from a status (``""`` for None)."""
    if not s:
        return ""
    n, total, el = s.get("n", 0), s.get("total"), s.get("elapsed", 0.0)
    text = str(s.get("desc") or "working")
    if total:
        text += f" {n}/{total} {s.get('unit', '')}".rstrip()
        if n and el > 0:
            text += f", ~{max(0.0, (total - n) * el / n):.0f} s left in it"
    elif n:
        text += f" {n} {s.get('unit', '')}".rstrip()
    return text


def _with_status(it: Iterable[T], path: str, desc: str, total: int | None, unit: str) -> Iterator[T]:
    t0 = last = time.monotonic()
    base = {"desc": desc, "total": total, "unit": unit, "pid": os.getpid()}
    write_status(path, {**base, "n": 0, "elapsed": 0.0})
    n = 0
    for item in it:
        yield item
        n += 1
        now = time.monotonic()
        if now - last >= STATUS_EVERY:
            write_status(path, {**base, "n": n, "elapsed": now - t0})
            last = now
    write_status(path, {**base, "n": n, "elapsed": time.monotonic() - t0})


def progress(it: Iterable[T], desc: str = "", total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Wrap an iterable in a tqdm bar (elapsed, rate and ETA) when progress is enabled, and keep
    the status file of ``BACKDOORLAB_STATUS`` current when it is set."""
    if total is None and hasattr(it, "__len__"):
        total = len(it)  # type: ignore[arg-type]
    status = os.environ.get(STATUS_ENV)
    if status:
        it = _with_status(it, status, desc, total, unit)
    if not enabled():
        yield from it
        return
    from tqdm import tqdm

    yield from tqdm(it, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True,
                    file=sys.stderr)
