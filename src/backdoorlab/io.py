"""Safe output: nothing half-written ever appears under its final name, and nothing of the
user's is ever replaced.

Every folder backdoorlab creates carries a marker file (``MARKER``, JSON naming the tool, its
version and the command). A command checks its ``--out`` first (`check_out_dir` /
`check_out_file`, before any loading or training); `atomic_dir` replaces only a folder that carries
the marker. Temporary names are ``.<name>.<random>.part`` (`clean_stale_parts` removes those left
by a killed run).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backdoorlab.errors import BadInput

MARKER = ".backdoorlab"


@dataclass
class _Scope:
    """What the running command writes: its name, the folders it writes into in place (they get
    the marker at their first write) and the folder holding resumable work, if any."""

    command: str | None = None
    claims: list[Path] = field(default_factory=list)
    resumable: Path | None = None
    replace: list[Path] = field(default_factory=list)  # claimed folders to empty at the first write
    # claimed folders whose marker lists what backdoorlab writes in them (`foreign_files`): the
    # sub-folders the command fills wholesale (``cells/``); its files join as they are written
    own: dict[Path, list[str]] = field(default_factory=dict)


_scope = _Scope()
CLAIMED_ENV = "BACKDOORLAB_CLAIMED"  # folders an enclosing command writes in (nested commands, workers)


@contextlib.contextmanager
def output_scope() -> Iterator[_Scope]:
    """A fresh `_Scope` for one command (the CLI wraps every command; nested calls restore)."""
    global _scope
    saved, _scope = _scope, _Scope()
    env = os.environ.get(CLAIMED_ENV)
    try:
        yield _scope
    finally:
        _scope = saved
        if env is None:
            os.environ.pop(CLAIMED_ENV, None)
        else:
            os.environ[CLAIMED_ENV] = env


def claim(folder: Path) -> None:
    """The running command writes into ``folder`` in place: nested commands and worker processes
    may write outputs inside it (`check_out_dir`)."""
    folder = Path(os.path.abspath(folder))
    _scope.claims.append(folder)
    os.environ[CLAIMED_ENV] = os.pathsep.join(filter(None, [os.environ.get(CLAIMED_ENV), str(folder)]))


def _claimed_by_enclosing(folder: Path) -> bool:
    return str(folder) in os.environ.get(CLAIMED_ENV, "").split(os.pathsep)


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of a folder backdoorlab made, or None."""
    try:
        rec = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("tool") == "backdoorlab" else None


def write_marker(folder: str | os.PathLike, command: str | None = None,
                 files: list[str] | None = None) -> None:
    """Mark ``folder`` as made by backdoorlab (atomically; no-op when already marked). ``files``:
    start the list of what backdoorlab writes in it (see `foreign_files`)."""
    from backdoorlab import __version__

    folder = Path(folder)
    if read_marker(folder) is not None:
        return
    rec = {"tool": "backdoorlab", "version": __version__, "command": command or _scope.command}
    _write_record(folder, rec if files is None else {**rec, "files": list(files)})


def _write_record(folder: Path, rec: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f"{MARKER}.", suffix=".part", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(rec, f)
        f.write("\n")
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, folder / MARKER)


def _is_part(name: str) -> bool:
    return name.startswith(".") and name.endswith(".part")


def _files_in(folder: Path) -> list[str]:
    """Relative paths (``/``-separated) of every file and link under ``folder``, the marker and
    backdoorlab's ``.part`` temporaries left out."""
    out = []
    for root, dirs, files in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        for name in [*files, *links]:
            rel = Path(os.path.relpath(os.path.join(root, name), folder)).as_posix()
            if rel != MARKER and not _is_part(name):
                out.append(rel)
        dirs[:] = [d for d in dirs if d not in links and not _is_part(d)]
    return sorted(out)


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """Files in a backdoorlab output folder that backdoorlab did not write there: those missing
    from the list its marker keeps (written when an `atomic_dir` output is complete; for an
    in-place output, grown as files are written, an entry ending in ``/`` standing for a whole
    sub-folder). Empty when the marker keeps no list (an output of an earlier version)."""
    rec = read_marker(folder)
    files = rec.get("files") if rec else None
    if not isinstance(files, list):
        return []
    return [f for f in _files_in(Path(folder)) if not _listed(f, files)]


def _listed(rel: str, files: list) -> bool:
    return rel in files or any(isinstance(e, str) and e.endswith("/") and rel.startswith(e) for e in files)


def _foreign_text(folder: Path, foreign: list[str]) -> str:
    more = f" and {len(foreign) - 1} more file(s)" if len(foreign) > 1 else ""
    return (f"holds {foreign[0]}{more}, which backdoorlab did not write; it is never deleted (move it "
            f"out of {folder} or choose another folder)")


def _mark_claimed(parent: Path) -> None:
    """Before a write into ``parent``: the claimed folder that holds it is emptied first when
    ``--overwrite`` asked for it (only now, so a command refused before its first write keeps the
    earlier output), created, and marked."""
    if not _scope.claims:
        return
    parent = Path(os.path.abspath(parent))
    for c in _scope.claims:
        if c == parent or c in parent.parents:
            if c in _scope.replace:
                _scope.replace.remove(c)
                if c.is_dir():
                    _remove_marked(c)
            c.mkdir(parents=True, exist_ok=True)
            write_marker(c, files=_scope.own.get(c))


def claim_now(folder: str | os.PathLike) -> None:
    """Write the marker of a claimed folder now (`_mark_claimed`)."""
    _mark_claimed(Path(folder))


def _has_files(p: Path) -> bool:
    """True when the folder holds any file or link (empty sub-folders do not count)."""
    for root, dirs, files in os.walk(p):
        if files or any(os.path.islink(os.path.join(root, d)) for d in dirs):
            return True
    return False


def _readonly(p: Path) -> bool:
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _check_writable(p: Path, opt: str, into: bool) -> None:
    """Refuse early when ``p`` (``into``: the folder itself) or its nearest existing ancestor
    cannot be written (read-only file system, no permission)."""
    target = p if into and p.is_dir() else p.parent
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        raise BadInput(f"{opt} {p}: {target} is a file, not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        why = "read-only file system" if _readonly(target) else "no write permission"
        raise BadInput(f"{opt} {p}: cannot write into {target} ({why})")


def _remove_marked(p: Path) -> None:
    """Delete a backdoorlab folder: renamed to a temporary name first, so a kill leaves only a
    ``.part`` that `clean_stale_parts` removes, never a half-deleted output."""
    if read_marker(p) is None:
        raise BadInput(f"{p}: not made by backdoorlab; it is never replaced")
    foreign = foreign_files(p)
    if foreign:
        raise BadInput(f"{p}: {_foreign_text(p, foreign)}")
    old = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".old.part", dir=p.parent))
    os.replace(p, old)
    shutil.rmtree(old, ignore_errors=True)


def _clean_own_parts(p: Path) -> None:
    """Remove ``.<name>.*.part`` temporaries of ``p`` that a killed earlier run left beside it."""
    with contextlib.suppress(OSError):
        for q in p.parent.glob(f".{p.name}.*.part"):
            _remove(q)


def _remove(q: Path) -> None:
    if q.is_dir() and not q.is_symlink():
        shutil.rmtree(q, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            q.unlink()


def _resolved(p: Path, opt: str) -> Path:
    try:
        return p.resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop, a name too long …
        raise BadInput(f"{opt} {p}: cannot be used as a path ({e})") from None


def _input_paths(inputs: Sequence[str | os.PathLike], opt: str = "input") -> list[Path]:
    """Resolved paths of input sources (``FORMAT:PATH`` too)."""
    out = []
    for s in inputs:
        s = str(s)
        with contextlib.suppress(BadInput):
            out.append(_resolved(Path(s), opt))
        if ":" in s:
            with contextlib.suppress(BadInput):
                out.append(_resolved(Path(s.partition(":")[2]), opt))
    return out


def check_out_dir(path: str | os.PathLike, overwrite: bool = False, command: str | None = None, *,
                  in_place: bool = False, resume: bool = False, opt: str = "--out",
                  inputs: Sequence[str | os.PathLike] = (), own: Sequence[str] | None = None) -> Path:
    """Check an output folder before any work; call it first in every command that writes one.

    Refused (`BadInput`): a file; the current folder, one of its parents, the home or root folder;
    a folder holding files that backdoorlab did not make (never replaced, even with
    ``overwrite``); an earlier backdoorlab output unless ``overwrite`` (or, with ``resume``, one
    made by the same ``command``: its saved work is picked up); an unwritable place; with
    ``overwrite``, a folder holding one of the ``inputs`` (replacing it would delete the input).
    ``in_place``: the command writes into the folder itself (not through `atomic_dir`), so with
    ``overwrite`` an earlier backdoorlab folder is deleted here, and the folder gets the marker at
    the command's first write; ``own`` (in place) names the sub-folders (``"cells/"``) it fills
    wholesale, and its marker then lists what it writes (`foreign_files`). Returns the path."""
    p = Path(path)
    real, cwd = _resolved(p, opt), Path.cwd().resolve()
    if p.is_symlink():
        raise BadInput(f"{opt} {path}: is a symbolic link; name a real folder (a link's target is "
                       "never replaced)")
    if real == cwd or real in cwd.parents:
        where = "the current folder" if real == cwd else "a parent of the current folder"
        raise BadInput(f"{opt} {path}: is {where}; name a new folder for the outputs")
    if real == Path.home().resolve() or real == Path(real.anchor):
        what = "your home folder" if real != Path(real.anchor) else "the root folder"
        raise BadInput(f"{opt} {path}: is {what}; name a new folder for the outputs")
    if p.exists() and not p.is_dir():
        raise BadInput(f"{opt} {path}: exists and is not a folder; name a new folder")
    outer = next((a for a in real.parents if read_marker(a) is not None), None)
    if outer is not None and not _claimed_by_enclosing(outer):
        what = f"backdoorlab {read_marker(outer).get('command') or ''}".rstrip()
        raise BadInput(f"{opt} {path}: is inside {outer}, the output of an earlier {what} run; name a "
                       "folder outside it")
    marker = read_marker(p) if p.is_dir() else None
    if marker is None and p.is_dir() and _has_files(p):
        raise BadInput(f"{opt} {path}: folder holds files and is not an earlier {command or 'backdoorlab'} "
                       "output (not made by backdoorlab); choose an empty or new folder (it is "
                       "never replaced, even with --overwrite)")
    resuming = marker is not None and resume and marker.get("command") == command and not overwrite
    if marker is not None and not resuming and not overwrite:
        what = f"backdoorlab {marker.get('command') or ''}".rstrip()
        raise BadInput(f"{opt} {path}: holds an earlier {what} run; pass --overwrite to replace it")
    if marker is not None and overwrite:
        for q in _input_paths(inputs, opt):
            if q == real or real in q.parents:
                raise BadInput(f"{opt} {path}: holds the input {q}; --overwrite would delete it, so "
                               "write the outputs elsewhere")
        foreign = foreign_files(p)
        if foreign:
            raise BadInput(f"{opt} {path}: {_foreign_text(p, foreign)}")
    _check_writable(p, opt, into=in_place and p.is_dir())
    _clean_own_parts(p)
    _scope.command = command or _scope.command
    if in_place:
        claim(p)
        if own is not None:
            _scope.own[Path(os.path.abspath(p))] = [f"{d.rstrip('/')}/" for d in own]
        if marker is not None and overwrite:
            _scope.replace.append(Path(os.path.abspath(p)))  # emptied at the first write
    if resume:
        _scope.resumable = p
        n = clean_stale_parts(p) if resuming else 0
        if n:
            print(f"removed {n} temporary file(s) left in {p} by an interrupted earlier run")
    return p


def check_out_file(path: str | os.PathLike | None, overwrite: bool = False, *, opt: str = "--out",
                   inputs: Sequence[str | os.PathLike] = ()) -> Path | None:
    """Check an output file before any work: not one of the ``inputs`` (sources, ``FORMAT:PATH``
    too), not a folder, an existing file only with ``overwrite``, a writable place."""
    if path is None:
        return None
    p = Path(path)
    real = _resolved(p, opt)
    if p.is_symlink():
        raise BadInput(f"{opt} {path}: is a symbolic link; name a real file (a link's target is never "
                       "replaced)")
    for q in _input_paths(inputs, opt):
        if q == real or (p.exists() and q.exists() and os.path.samefile(p, q)):
            raise BadInput(f"{opt} {path} is the input file; write the output elsewhere")
        if q.is_dir() and q in real.parents:
            raise BadInput(f"{opt} {path} is inside the input folder {q}; write the output elsewhere")
    if p.is_dir():
        raise BadInput(f"{opt} {path} is a folder; expected a file name")
    if p.exists() and not overwrite:
        raise BadInput(f"{opt} {path}: file exists; pass --overwrite to replace it")
    _check_writable(p, opt, into=False)
    return p


def clean_stale_parts(root: str | os.PathLike) -> int:
    """Remove the ``.*.part`` temporary files and folders a killed earlier run left under ``root``
    (backdoorlab's own temporary naming only); returns how many were removed."""
    n = 0
    for d, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if name.startswith(".") and name.endswith(".part"):
                _remove(Path(d) / name)
                n += 1
        dirs[:] = [x for x in dirs if not (x.startswith(".") and x.endswith(".part"))]
    return n


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    _mark_claimed(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as e:  # name the output, not the temporary (e.g. /proc refuses new files)
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    _note_written(path)


def _note_written(path: Path) -> None:
    """A file written into a finished `atomic_dir` output (``report``'s pages, ``run``'s cell.json)
    joins the list of files its marker keeps: backdoorlab wrote it."""
    for folder in list(Path(os.path.abspath(path)).parents)[:64]:
        rec = read_marker(folder)
        if rec is None:
            continue
        if isinstance(rec.get("files"), list):
            rel = Path(os.path.relpath(os.path.abspath(path), folder)).as_posix()
            if not _listed(rel, rec["files"]):
                with contextlib.suppress(OSError):
                    _write_record(folder, {**rec, "files": sorted([*rec["files"], rel])})
        return


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory (already holding the marker); on success it takes the place of
    ``path``. An existing ``path`` is replaced only when it is empty or carries the marker
    (`BadInput` otherwise, checked before the work and again before the swap)."""
    path = Path(path)
    _check_replaceable(path)
    _mark_claimed(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        write_marker(tmp)
        yield tmp
        # the marker keeps the list of what was written, so that a later --overwrite can tell the
        # user's own files apart (`foreign_files`) and never delete them
        _write_record(tmp, {**(read_marker(tmp) or {}), "files": _files_in(tmp)})
        _check_replaceable(path)
        if path.is_dir() and read_marker(path) is not None:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old.part", dir=path.parent))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if path.is_dir():  # only empty sub-folders (checked): nothing to lose
                shutil.rmtree(path)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_replaceable(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise BadInput(f"{path}: exists and is not a folder; it is never replaced")
    if path.is_dir() and read_marker(path) is None and _has_files(path):
        raise BadInput(f"{path}: folder holds files not made by backdoorlab; it is never replaced")
    foreign = foreign_files(path) if path.is_dir() else []
    if foreign:
        raise BadInput(f"{path}: {_foreign_text(path, foreign)}")


def file_sha256(path: str | os.PathLike) -> str | None:
    """Hex SHA-256 of a file's bytes, or None when ``path`` is not a file."""
    import hashlib

    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def h5_bytes(fill: Callable[[Any], None]) -> bytes:
    """The bytes of an HDF5 file that ``fill(h5py.File)`` builds, made in memory. Written with
    `write_bytes`, a full disk is a plain ``OSError`` (ENOSPC) of that write: HDF5 failing inside
    its own writes can leave the library in a state that crashes the interpreter."""
    import io as _io

    import h5py

    buf = _io.BytesIO()
    with h5py.File(buf, "w") as f:
        fill(f)
    return buf.getvalue()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        fill_file(tmp, data, path)


def fill_file(tmp: str | os.PathLike, data: bytes, name: str | os.PathLike) -> None:
    """Write ``data`` into the temporary ``tmp``; an OS error (a full disk) names ``name``."""
    try:
        with open(tmp, "wb") as f:
            f.write(data)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(name)) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")
