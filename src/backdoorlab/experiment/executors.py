"""Run the cells of a grid: locally in worker processes, or as tasks on a Ray cluster.

Both executors submit a cell as soon as the attack model it starts from is finished, skip cells
already finished (see ``cells.finished``), and call the same ``cells.run_cell``. Each cell gets a
fixed number of torch threads (``threads``), so a grid gives the same numbers whichever executor
ran it, provided the thread count is the same (float sums depend on how work is split).
With Ray, every worker must see the output folder (one machine, or a shared filesystem).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from backdoorlab.errors import BadInput
from backdoorlab.experiment.cells import Cell, finished, run_cell


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("BACKDOORLAB_PROGRESS", "0")


class LocalBackend:
    name = "local"

    def __init__(self, jobs: int, threads: int):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                        initializer=_init_worker, initargs=(threads,))

    def submit(self, *args):
        return self.pool.submit(run_cell, *args)

    def wait_any(self, handles: list) -> list:
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(handles, return_when=FIRST_COMPLETED)
        return list(done)

    @staticmethod
    def result(handle) -> dict:
        return handle.result()

    def close(self, cancel: bool = False) -> None:
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


class RayBackend:
    """Cells as Ray tasks (``pip install 'backdoorlab[ray]'``); connects to ``address`` or starts Ray."""

    name = "ray"

    def __init__(self, threads: int, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise BadInput("--executor ray needs Ray: pip install 'backdoorlab[ray]'") from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads),
                                               "BACKDOORLAB_PROGRESS": "0"}})
            self.started = True
        self.remote = ray.remote(num_cpus=threads)(run_cell)

    def submit(self, *args):
        return self.remote.remote(*args)

    def wait_any(self, handles: list) -> list:
        done, _ = self.ray.wait(handles, num_returns=1)
        return done

    def result(self, handle) -> dict:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, BadInput):
                raise BadInput(str(cause).splitlines()[0]) from None
            raise

    def close(self, cancel: bool = False) -> None:
        if self.started:
            self.ray.shutdown()


Reporter = Callable[[dict, bool, int, int], None]


def execute(cells: list[Cell], root: Path, backend, threads: int, report: Reporter | None = None,
            on_start: Callable[[Cell], None] | None = None) -> tuple[dict[str, dict], list[str]]:
    """Compute every unfinished cell; returns ({key: record}, [error lines])."""
    records: dict[str, dict] = {}
    errors: list[str] = []
    todo = []
    for c in cells:
        rec = finished(root, c)
        if rec is not None:
            records[c.key] = {**rec, "cached": True}
        else:
            todo.append(c)
    total = len(cells)
    if report:
        for rec in records.values():
            report(rec, True, len(records), total)
    failed: set[str] = set()
    pending: dict = {}
    waiting = list(todo)

    def submit_ready() -> None:
        for c in list(waiting):
            if c.parent is not None and c.parent in failed:
                waiting.remove(c)
                failed.add(c.key)
                errors.append(f"{c.label}: skipped, its attack model failed")
            elif c.parent is None or c.parent in records:
                waiting.remove(c)
                parent_dir = records[c.parent]["dir"] if c.parent else None
                pending[backend.submit(c.to_dict(), str(root), parent_dir, threads)] = c
                if on_start:
                    on_start(c)

    try:
        submit_ready()
        while pending:
            for h in backend.wait_any(list(pending)):
                c = pending.pop(h)
                try:
                    rec = backend.result(h)
                except Exception as e:  # one failed cell does not stop the others
                    failed.add(c.key)
                    what = str(e).splitlines()[0] if isinstance(e, BadInput) else f"{type(e).__name__}: {e}"
                    errors.append(f"{c.label}: {what} (log: {root / 'logs' / (c.dirname + '.log')})")
                    continue
                records[c.key] = {**rec, "cached": False}
                if report:
                    report(records[c.key], False, len(records), total)
            submit_ready()
    except BaseException:
        backend.close(cancel=True)
        raise
    backend.close()
    return records, errors


def make_backend(executor: str, jobs: int, threads: int, address: str | None = None):
    if executor == "local":
        return LocalBackend(jobs, threads)
    if executor == "ray":
        return RayBackend(threads, address)
    raise BadInput(f"unknown executor {executor!r} (local, ray)")


def default_jobs_threads(jobs: int | None, threads: int | None) -> tuple[int, int]:
    cpus = os.cpu_count() or 1
    jobs = jobs or max(1, cpus // (threads or 1))
    threads = threads or max(1, cpus // jobs)
    if jobs < 1 or threads < 1:
        raise BadInput(f"--jobs and --threads must be at least 1 (got {jobs}, {threads})")
    return jobs, threads

