"""The `backdoorlab` command line. It parses, calls the API and prints; it holds no algorithm.

Commands live in `backdoorlab.commands`, one module per family, each with ``register(sub)``.

Exit status (README "Exit status"): 0 success; 1 a bug (traceback); 2 bad input: an option, file or
value that cannot be used, an ``--out`` that is refused or cannot be written (permission,
read-only file system), out of memory, or a `run` with failed cells; 74 (EX_IOERR) a full disk or
an I/O error while reading or writing; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM, which
stops the work the same way as Ctrl-C). ``--debug`` shows a traceback for all of them.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import pkgutil
import re
import signal
import sys
import threading

from backdoorlab import __version__
from backdoorlab.commands.common import Parser
from backdoorlab.errors import BadInput

ORDER = ["core"]  # modules registered first (help lists commands in registration order)
EXIT_BAD_INPUT, EXIT_IO, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 74, 130, 143
DISK_FULL = {getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, n)}
CANNOT_WRITE = {getattr(errno, n) for n in ("EROFS", "EACCES", "EPERM") if hasattr(errno, n)}
BAD_PATH = {getattr(errno, n) for n in ("ENAMETOOLONG", "ELOOP", "ENOTDIR", "EISDIR", "EINVAL", "ENOENT",
                                        "EXDEV", "ENXIO", "ENODEV") if hasattr(errno, n)}
# errors of libraries that write files (safetensors, HDF5) carry only the OS message: read its number
_OS_ERROR = re.compile(r"\(os error (\d+)\)|errno = (\d+)")


def build_parser() -> Parser:
    p = Parser(prog="backdoorlab", description="Backdoor attacks and defenses for neural "
               "networks, on your own files, on a CPU.",
               epilog="Run 'backdoorlab COMMAND --help' for a command's options.")
    p.add_argument("--version", action="version", version=f"backdoorlab {__version__}")
    p.add_argument("--debug", action="store_true", help="show a traceback for every error, expected "
                   "ones too (for bug reports)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    import backdoorlab.commands as pkg

    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name != "common"]
    for name in sorted(names, key=lambda n: (n not in ORDER, ORDER.index(n) if n in ORDER else 0, n)):
        importlib.import_module(f"backdoorlab.commands.{name}").register(sub)
    return p


_terminated = False


def _on_sigterm(signum, frame) -> None:
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def _catch_sigterm() -> None:
    """SIGTERM (a plain ``kill``, a job scheduler) stops the work like Ctrl-C: outputs stay whole,
    `run` stops its workers."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        if args.command:
            parser.exit(2, f"error: name an action (see 'backdoorlab {args.command} --help')\n")
        parser.print_help()
        return 0
    if args.debug:
        os.environ["BACKDOORLAB_DEBUG"] = "1"  # nested commands and worker processes too
    from backdoorlab.io import output_scope

    _catch_sigterm()

    with output_scope() as scope:
        if os.environ.get("BACKDOORLAB_DEBUG") == "1":
            return _call(args)
        try:
            return _call(args)
        except BadInput as e:
            return _fail(f"error: {e}", EXIT_BAD_INPUT)
        except KeyboardInterrupt as e:
            if argv is None:  # the program itself (not a nested call): it only exits now
                _ignore_further_interrupts()
            why = str(e) or ("outputs are written whole or not at all, so nothing half-written was kept"
                             + (f"; the work saved in {scope.resumable} is kept and the same command "
                                "resumes it" if scope.resumable else ""))
            if _terminated:
                return _fail(f"terminated: {why}", EXIT_TERMINATED)
            return _fail(f"interrupted: {why}", EXIT_INTERRUPTED)
        except MemoryError:
            return _fail("error: out of memory (try a smaller batch or data set)", EXIT_BAD_INPUT)
        except BrokenPipeError:  # `backdoorlab list | head`: the reader has what it wanted
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except OSError as e:
            code = _os_failure(e.errno, e.strerror, _where(e))
            if code is None:
                raise
            return code
        except Exception as e:  # noqa: BLE001  (a library's wrapped OS error, else re-raised)
            m = _OS_ERROR.search(str(e))
            no = int(m.group(1) or m.group(2)) if m else None
            code = _os_failure(no, os.strerror(no) if no else "", "") if no else None
            if isinstance(e, RuntimeError) and "Symlink loop" in str(e):
                return _fail(f"error: {e} (a symbolic link that points to itself)", EXIT_BAD_INPUT)
            if code is None:
                raise
            return code


def _call(args) -> int:
    """Run the command; with ``--json`` (`commands.common.add_json_option`) its lines go to stderr
    and, when it succeeds, the results.json it wrote into ``--out`` goes to stdout."""
    name = getattr(args, "json_results", None)
    if not (name and getattr(args, "json", False)):
        return int(args.func(args) or 0)
    from pathlib import Path

    with contextlib.redirect_stdout(sys.stderr):
        code = int(args.func(args) or 0)
    results = Path(args.out) / name if args.out else None
    if code == 0 and results is not None and results.is_file():
        sys.stdout.write(results.read_text().rstrip("\n") + "\n")
    return code


def _ignore_further_interrupts() -> None:
    """Once stopped, a further Ctrl-C or SIGTERM during the exit (a large library's shutdown takes
    a moment) would kill the process by the signal instead of its exit status: ignore them."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _os_failure(no: int | None, strerror: str | None, where: str) -> int | None:
    """One line and an exit status for an expected OS failure, or None (a bug: re-raise)."""
    if no in DISK_FULL:
        return _fail(f"error: disk full{' while writing' + where if where else ''} ({strerror}); nothing "
                     "half-written was kept: free some space and run again", EXIT_IO)
    if no in CANNOT_WRITE:
        return _fail(f"error: cannot access{where} ({strerror})", EXIT_BAD_INPUT)
    if no == errno.EIO:
        return _fail(f"error: input/output error{where}", EXIT_IO)
    if no in BAD_PATH:
        return _fail(f"error: cannot use{where or ' a path'} ({strerror})", EXIT_BAD_INPUT)
    return None


def _where(e: OSError, verb: str = "") -> str:
    return f"{verb} {e.filename}" if e.filename else ""


def _fail(line: str, code: int) -> int:
    """Print the one line (line breaks in names shown as \\n) and return ``code``."""
    print(line.replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)
    return code
