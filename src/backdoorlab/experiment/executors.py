"""Run the cells of a grid: locally in worker processes, or as tasks on a Ray cluster.

Both executors submit a cell as soon as the attack model it starts from is finished, skip cells
already finished (see ``cells.finished``), and call the same ``cells.run_cell``. Each cell gets a
fixed number of torch threads (``threads``), so a grid gives the same numbers whichever executor
ran it, provided the thread count is the same (float sums depend on how work is split).
With Ray, every worker must see the output folder (one machine, or a shared filesystem).

Ctrl-C stops the workers (local: terminated with their children and waited for; Ray: tasks
cancelled) and raises `KeyboardInterrupt` with one line saying what is kept: finished cells (and
Neural Cleanse scan states) stay in the output folder, and the same command resumes from them.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from backdoorlab.errors import BadInput
from backdoorlab.experiment.cells import Cell, finished, run_cell


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("BACKDOORLAB_PROGRESS", "0")
    # Ctrl-C reaches the whole terminal process group: the parent alone decides and stops workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the parent stops a worker with SIGTERM: between cells it just exits (nothing to clean up, no
    # traceback); during a cell the command's own handler stops it cleanly (`cells._run_cli`)
    signal.signal(signal.SIGTERM, _exit_idle)


def _exit_idle(signum, frame) -> None:
    os._exit(128 + signum)


def descendants(pid: int) -> list[int]:
    """Process ids of every descendant of ``pid`` (read from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for e in entries:
        try:
            with open(f"/proc/{e}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(e))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class _SecondInterrupt:
    """While stopping: a further Ctrl-C only asks to hurry (kill at once), never a traceback."""

    def __init__(self) -> None:
        self.hurry = False
        self.saved = None

    def __enter__(self) -> _SecondInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.saved = signal.signal(signal.SIGINT, self._again)
        return self

    def _again(self, *_) -> None:
        self.hurry = True

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            signal.signal(signal.SIGINT, self.saved)


class LocalBackend:
    name = "local"

    def __init__(self, jobs: int, threads: int):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.jobs = jobs  # cells handed to the pool at once: the rest wait, in priority order
        self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                        initializer=_init_worker, initargs=(threads,))

    def submit(self, *args):
        return self.pool.submit(run_cell, *args)

    def wait_any(self, handles: list, timeout: float | None = None) -> list:
        """The finished handles, waiting for one at most ``timeout`` seconds ([] when none)."""
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
        return list(done)

    @staticmethod
    def result(handle) -> dict:
        return handle.result()

    def close(self, cancel: bool = False, handles: list | None = None) -> None:
        if not cancel:
            self.pool.shutdown(wait=True)
            return
        self.stop()

    def stop(self, grace: float = 5.0) -> int:
        """Terminate the workers and their children (SIGTERM, then SIGKILL after ``grace``
        seconds or at a second Ctrl-C) and wait for them; returns how many workers there were."""
        with _SecondInterrupt() as again:
            procs = list((getattr(self.pool, "_processes", None) or {}).values())
            pids = [q for p in procs for q in (p.pid, *descendants(p.pid))]
            self.pool.shutdown(wait=False, cancel_futures=True)
            _signal(pids, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline and not again.hurry:
                time.sleep(0.05)
            _signal([q for q in pids if _alive(q)], signal.SIGKILL)
            for p in procs:
                p.join(timeout=grace)
            for q in pids:  # reap the workers' own children if they were re-parented to us
                _reap(q)
            return len(procs)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


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
        self.threads = threads

    def submit(self, *args):
        from backdoorlab.device import gpu_count

        spec = args[0]["spec"] if isinstance(args[0], dict) else args[0].spec
        gpus = gpu_count(spec.get("compute", {}).get("device"))  # a CUDA cell asks Ray for a GPU
        if gpus:
            return self.remote.options(num_cpus=self.threads, num_gpus=gpus).remote(*args)
        return self.remote.remote(*args)

    def wait_any(self, handles: list, timeout: float | None = None) -> list:
        done, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        return done

    def result(self, handle) -> dict:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, BadInput):
                raise BadInput(str(cause).splitlines()[0]) from None
            if isinstance(cause, OSError) and cause.errno in _STOPS_ALL:
                raise OSError(cause.errno, cause.strerror, cause.filename) from None
            raise

    def close(self, cancel: bool = False, handles: list | None = None) -> None:
        with _SecondInterrupt():
            for h in handles if cancel and handles else []:
                try:
                    self.ray.cancel(h, force=True)
                except Exception:  # noqa: BLE001 (already finished or gone)
                    pass
            if self.started:
                self.ray.shutdown()


Reporter = Callable[[dict, bool, int, int], None]
TICK = 1.0  # seconds between two looks at the running cells' progress
# OS errors of a cell that stop the grid (every other cell would fail the same way): a full disk,
# an over-quota or too-large file, an I/O error; the CLI reports them with exit status 74
_STOPS_ALL = {getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG", "EIO") if hasattr(errno, n)}


def execute(cells: list[Cell], root: Path, backend, threads: int, report: Reporter | None = None,
            on_start: Callable[[Cell], None] | None = None,
            on_tick: Callable[[list[Cell]], None] | None = None) -> tuple[dict[str, dict], list[str]]:
    """Compute every unfinished cell; returns ({key: record}, [error lines]). ``report`` is called
    once with every cached record (``done`` = their count) and then per finished cell;
    ``on_tick`` about every second with the running cells."""
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
        for rec in records.values():  # each cached cell once, all counted before the first new one
            report(rec, True, len(records), total)
    failed: set[str] = set()
    pending: dict = {}
    # lower seeds first and, within a seed, the cells that start from a finished model before new
    # trainings: a grid yields whole seeds early instead of training every model first
    order = {c.key: i for i, c in enumerate(todo)}
    waiting = sorted(todo, key=lambda c: (c.seed, c.parent is None, order[c.key]))
    capacity = getattr(backend, "jobs", None)  # None: the backend schedules (Ray)

    def submit_ready() -> None:
        for c in list(waiting):
            if c.parent is not None and c.parent in failed:
                waiting.remove(c)
                failed.add(c.key)
                errors.append(f"{c.label}: skipped, the cell it starts from failed")
            elif (c.parent is None or c.parent in records) and (capacity is None or len(pending) < capacity):
                waiting.remove(c)
                parent_dir = records[c.parent]["dir"] if c.parent else None
                pending[backend.submit(c.to_dict(), str(root), parent_dir, threads)] = c
                if on_start:
                    on_start(c)

    try:
        submit_ready()
        while pending:
            done = backend.wait_any(list(pending), timeout=TICK if on_tick else None)
            if not done and on_tick:
                on_tick(list(pending.values()))
            for h in done:
                c = pending.pop(h)
                try:
                    rec = backend.result(h)
                except OSError as e:
                    if e.errno in _STOPS_ALL:  # a full disk fails every cell: stop, one line
                        raise
                    failed.add(c.key)
                    errors.append(f"{c.label}: {type(e).__name__}: {e} (log: "
                                  f"{root / 'logs' / (c.dirname + '.log')})")
                    continue
                except Exception as e:  # one failed cell does not stop the others
                    failed.add(c.key)
                    what = str(e).splitlines()[0] if isinstance(e, BadInput) else f"{type(e).__name__}: {e}"
                    errors.append(f"{c.label}: {what} (log: {root / 'logs' / (c.dirname + '.log')})")
                    continue
                records[c.key] = {**rec, "cached": False}
                if report:
                    report(records[c.key], False, len(records), total)
            submit_ready()
    except KeyboardInterrupt:
        backend.close(cancel=True, handles=list(pending))
        raise KeyboardInterrupt(
            f"stopped the running cell(s); the {len(records)} finished cell(s) of {total} and any "
            f"Neural Cleanse scan states are kept in {root}, and running the same command again "
            "resumes from them") from None
    except BaseException:
        backend.close(cancel=True, handles=list(pending))
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

