"""What `run` prints while a grid computes: the cached cells once, a line per finished cell, and the
running cells' own progress (read from the status files their loops keep, `backdoorlab.progress`)
with an ETA that improves as cells finish.

On a terminal the running cells show on a live bar (every second); elsewhere (a log file, CI) a
``running:`` line is printed every ``quiet_every`` seconds, the first after ``first_after``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from backdoorlab.experiment.cells import Cell, status_path
from backdoorlab.progress import enabled, read_status, status_text


def estimate_left(kinds_left: list[str], seconds_by_kind: dict[str, list[float]],
                  jobs: int) -> tuple[float | None, list[str]]:
    """(seconds still to go, kinds not timed yet). Each cell left costs the mean time of the
    finished cells of its kind (training, a pruning sweep and a Neural Cleanse scan differ by orders
    of magnitude), or the mean over all finished cells when none of its kind has finished — then
    the estimate is a guess, and the untimed kinds are returned so that it can say so. Divided by
    the parallel jobs; None when nothing is left or nothing has been timed yet."""
    every = [t for ts in seconds_by_kind.values() for t in ts]
    if not kinds_left or not every:
        return None, sorted(set(kinds_left))
    overall = sum(every) / len(every)
    mean = {k: sum(ts) / len(ts) for k, ts in seconds_by_kind.items() if ts}
    untimed = sorted({k for k in kinds_left if k not in mean})
    return sum(mean.get(k, overall) for k in kinds_left) / max(1, jobs), untimed


def _minutes(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min"


class GridProgress:
    """The `run` console: ``cached``, ``started``, ``finished`` and ``tick`` (about every second)."""

    def __init__(self, cells: list[Cell], root: Path, jobs: int, quiet_every: float = 30.0,
                 first_after: float = 5.0, live: bool | None = None):
        self.cells, self.root, self.jobs = cells, root, jobs
        self.t0 = time.perf_counter()
        self.times: dict[str, list[float]] = {}
        self.done: set[str] = set()
        self.live = enabled() if live is None else live
        self.quiet_every, self.next_quiet = quiet_every, first_after
        self.bar = None
        self.start: dict[str, float] = {}  # key -> when a running cell started

    # -- lines ---------------------------------------------------------------------------------------
    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def eta(self) -> str:
        left, untimed = estimate_left([c.kind for c in self.cells if c.key not in self.done], self.times,
                                      self.jobs)
        if left is None:
            return "" if not untimed else "ETA after the first cell"
        now, every = time.perf_counter(), [t for ts in self.times.values() for t in ts]
        for c in self.cells:  # a running cell has already done part of its expected time
            if c.key in self.start and c.key not in self.done:
                ts = self.times.get(c.kind) or every
                left -= min(now - self.start[c.key], sum(ts) / len(ts)) / max(1, self.jobs)
        left = max(0.0, left)
        guess = f" (a guess: no {', '.join(untimed)} cell timed yet)" if untimed else ""
        return f"ETA ~{_minutes(left)}{guess}"

    def cached(self, records: list[dict], total: int) -> None:
        """The cells found finished under the output folder: one line, counted once."""
        for r in records:
            self.done.add(r["key"])
        if records:
            names = [r["cell"]["label"] for r in records]
            shown = ", ".join(names[:8]) + (f", … {len(names) - 8} more" if len(names) > 8 else "")
            self._print(f"[{len(records)}/{total}] cached: {shown}")

    def started(self, cell: Cell) -> None:
        self.start[cell.key] = time.perf_counter()
        self._print(f"  started {cell.label} (log: {self.root / 'logs' / (cell.dirname + '.log')})")
        if self.live and self.bar is None:
            from tqdm import tqdm

            todo = len(self.cells) - len(self.done)
            self.bar = tqdm(total=todo, desc="cells", unit="cell", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}] {postfix}", leave=False)

    def finished(self, rec: dict, done: int, total: int) -> None:
        self.done.add(rec["key"])
        self.times.setdefault(rec["cell"]["kind"], []).append(rec["seconds"])
        el = time.perf_counter() - self.t0
        acc = "—" if rec["accuracy"] is None else f"{100 * rec['accuracy']:.2f} %"
        asr = "—" if rec["asr"] is None else f"{100 * rec['asr']:.2f} %"
        eta = self.eta()
        self._print(f"[{done}/{total}] {rec['cell']['label']}: clean acc {acc}, ASR {asr} "
                    f"({rec['seconds']:.0f} s; {el:.0f} s elapsed{', ' + eta if eta else ''})")
        if self.bar is not None:
            self.bar.update(1)

    def running_text(self, running: list[Cell]) -> str:
        parts = []
        for c in running:
            s = status_text(read_status(status_path(self.root, c)))
            parts.append(f"{c.label}: {s}" if s else f"{c.label}: starting")
        return "; ".join(parts)

    def tick(self, running: list[Cell]) -> None:
        el = time.perf_counter() - self.t0
        text = self.running_text(running)
        eta = self.eta()
        if self.bar is not None:
            self.bar.set_postfix_str(f"{eta + ' | ' if eta else ''}{text}", refresh=True)
        elif el >= self.next_quiet:
            self._print(f"  running ({el:.0f} s elapsed{', ' + eta if eta else ''}): {text}")
            self.next_quiet = el + self.quiet_every

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
