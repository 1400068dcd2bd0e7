"""Progress bars with ETA on stderr (silent when not a terminal unless forced)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def enabled() -> bool:
    env = os.environ.get("BACKDOORLAB_PROGRESS")
    if env is not None:
        return env not in ("0", "", "no", "false")
    return sys.stderr.isatty()


def progress(it: Iterable[T], desc: str = "", total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Wrap an iterable in a tqdm bar (elapsed, rate and ETA) when progress is enabled."""
    if not enabled():
        yield from it
        return
    from tqdm import tqdm

    yield from tqdm(it, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True,
                    file=sys.stderr)
