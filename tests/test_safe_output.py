"""`--out` never deletes or replaces what backdoorlab did not make; options are checked before any
work; expected failures are one line with a documented exit status; `run` stops cleanly on Ctrl-C.

Each refusal also checks that nothing was created, removed or changed (`snapshot`)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from backdoorlab import io
from backdoorlab.cli import main
from backdoorlab.data import load_dataset
from backdoorlab.data.csaw import write_csaw_h5
from backdoorlab.errors import BadInput
from backdoorlab.models import Classifier, InputSpec, save_model
from backdoorlab.models.architectures import small_cnn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An untrained small_cnn on 16x16 digits and a 120-image validation file (enough to run
    prune, which is all the output tests need)."""
    d = tmp_path_factory.mktemp("safe_out")
    valid = load_dataset("digits").take(120, seed=0)
    torch.manual_seed(0)
    clf = Classifier(small_cnn(10, (16, 16, 1)), InputSpec(16, 16, 1), 10, "small_cnn")
    save_model(clf, d / "m.safetensors")
    write_csaw_h5(valid, d / "valid.h5")
    return d


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(root.rglob("*"))}


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refusals
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(capsys, *argv) -> str:
    code, _, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def prune_args(files: Path, out: Path, *extra) -> list:
    return ["prune", files / "m.safetensors", "--valid", files / "valid.h5", "--stop", "max_drop",
            "--drops", "4", "--out", out, *extra]


# --- folders the user owns -----------------------------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
def test_user_folder_with_files_is_never_replaced(files, capsys, tmp_path, overwrite):
    user = tmp_path / "mine"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("my notes")
    (user / "sub" / "results.json").write_text("{}")  # looks like an output, is not marked
    before = snapshot(tmp_path)
    line = refused(capsys, *prune_args(files, user, *(["--overwrite"] if overwrite else [])))
    assert "not made by backdoorlab" in line
    assert snapshot(tmp_path) == before


def test_folder_with_results_json_but_no_marker_is_refused(files, capsys, tmp_path):
    """A folder holding results.json (an old output, or a user's) is not replaced on that alone."""
    d = tmp_path / "old"
    d.mkdir()
    (d / "results.json").write_text('{"kind": "cleanse"}')
    before = snapshot(tmp_path)
    refused(capsys, *prune_args(files, d, "--overwrite"))
    assert snapshot(tmp_path) == before


def test_existing_file_as_out_folder_is_refused(files, capsys, tmp_path):
    f = tmp_path / "report.pdf"
    f.write_bytes(b"%PDF user file")
    before = snapshot(tmp_path)
    assert "not a folder" in refused(capsys, *prune_args(files, f, "--overwrite"))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", [".", "..", "home", "/"])
def test_current_parent_home_and_root_are_refused(files, capsys, tmp_path, monkeypatch, where):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "a"))
    out = {"home": str(tmp_path / "a")}.get(where, where)
    before = snapshot(tmp_path)
    line = refused(capsys, *prune_args(files, out, "--overwrite"))
    assert "name a new folder" in line
    assert snapshot(tmp_path) == before


def test_empty_user_folder_is_used(files, capsys, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    code, _, err = run(capsys, *prune_args(files, d))
    assert code == 0, err
    assert io.read_marker(d)["command"] == "prune"
    assert (d / "results.json").is_file()


# --- backdoorlab's own outputs -------------------------------------------------------------------

def test_earlier_output_needs_overwrite_and_then_is_replaced(files, capsys, tmp_path):
    out = tmp_path / "p"
    assert run(capsys, *prune_args(files, out))[0] == 0
    marker = io.read_marker(out)
    assert {k: marker[k] for k in ("tool", "command")} == {"tool": "backdoorlab", "command": "prune"}
    assert "results.json" in marker["files"]  # what the command wrote, listed when it was complete
    first = (out / "results.json").read_bytes()
    before = snapshot(tmp_path)
    assert "--overwrite" in refused(capsys, *prune_args(files, out))
    assert snapshot(tmp_path) == before
    code, _, err = run(capsys, *prune_args(files, out, "--overwrite"))
    assert code == 0, err
    assert (out / "results.json").is_file() and (out / "results.json").read_bytes() != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no .old / .part left


@pytest.mark.parametrize("where", ["notes.txt", "sub/notes.txt"])
def test_overwrite_never_deletes_a_users_file_put_in_an_earlier_output(files, capsys, tmp_path, where):
    """A file the user put into an earlier output folder is not backdoorlab's: --overwrite is
    refused (before any work) rather than deleting it; backdoorlab's own later additions (report
    pages) do not count."""
    out = tmp_path / "p"
    assert run(capsys, *prune_args(files, out))[0] == 0
    assert run(capsys, "report", out)[0] == 0  # report.md / report.html written into the output
    assert run(capsys, *prune_args(files, out, "--overwrite"))[0] == 0
    (out / where).parent.mkdir(exist_ok=True)
    (out / where).write_text("my notes")
    before = snapshot(tmp_path)
    line = refused(capsys, *prune_args(files, out, "--overwrite"))
    assert where in line and "did not write" in line
    assert snapshot(tmp_path) == before
    with pytest.raises(BadInput, match="did not write"), io.output_scope(), io.atomic_dir(out) as tmp:
        (tmp / "x.txt").write_text("ours")  # the swap at the end checks again
    assert (out / where).read_text() == "my notes"


def test_overwrite_never_deletes_an_input(files, capsys, tmp_path):
    out = tmp_path / "p"
    assert run(capsys, *prune_args(files, out))[0] == 0
    model = out / "m.safetensors"  # e.g. a pruned model of that run, used as the next input
    model.write_bytes((files / "m.safetensors").read_bytes())
    (out / "m.json").write_bytes((files / "m.json").read_bytes())
    before = snapshot(tmp_path)
    line = refused(capsys, "prune", model, "--valid", files / "valid.h5", "--out", out, "--overwrite")
    assert "holds the input" in line
    assert snapshot(tmp_path) == before


def test_atomic_dir_checks_again_before_the_swap(tmp_path):
    """A folder that gained the user's files while the work ran is not replaced at the end."""
    out = tmp_path / "o"
    with pytest.raises(BadInput), io.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("ours")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    assert (out / "theirs.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # the temporary folder is gone


def test_stale_parts_are_cleaned_on_resume(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    io.write_marker(root, "run")
    (root / "cells").mkdir()
    (root / "cells" / ".x.abc.part").mkdir()
    (root / ".summary.md.1.part").write_text("half")
    (root / "keep.part").write_text("not ours: no leading dot")
    with io.output_scope():
        io.check_out_dir(root, command="run", in_place=True, resume=True)
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert left == [".backdoorlab", "cells", "keep.part"]


# --- output files --------------------------------------------------------------------------------

def test_poison_refuses_existing_file_and_its_input(capsys, tmp_path):
    data = tmp_path / "d.h5"
    write_csaw_h5(load_dataset("digits").take(50, seed=0), data)
    mine = tmp_path / "out.h5"
    mine.write_bytes(b"user bytes")
    before = snapshot(tmp_path)
    argv = ["poison", data, "--trigger", "patch", "--target", "0", "--all"]
    assert "file exists" in refused(capsys, *argv, "--out", mine)
    assert "input file" in refused(capsys, *argv, "--out", data, "--overwrite")
    assert snapshot(tmp_path) == before
    code, _, err = run(capsys, *argv, "--out", mine, "--overwrite")
    assert code == 0, err
    assert mine.read_bytes() != b"user bytes"


def test_poison_preview_never_replaces_an_input_and_outputs_come_together(capsys, tmp_path):
    from PIL import Image

    cf = tmp_path / "cf"
    for c in range(3):
        (cf / str(c)).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16), 40 * c + i, np.uint8)).save(cf / str(c) / f"img{i}.png")
    trig = tmp_path / "trig.png"
    Image.fromarray(np.full((3, 3, 4), 255, np.uint8)).save(trig)
    before = snapshot(tmp_path)
    argv = ["poison", f"folder:{cf}", "--trigger", "patch", "--target", "0", "--all",
            "--out", tmp_path / "p.h5"]
    inside = cf / "1" / "img0.png"
    assert "inside the input folder" in refused(capsys, *argv, "--preview", inside, "--overwrite")
    assert "input file" in refused(capsys, "poison", f"folder:{cf}", "--trigger", f"image:{trig}", "--all",
                                   "--out", tmp_path / "p.h5", "--preview", trig, "--overwrite")
    assert snapshot(tmp_path) == before
    if sys.platform == "linux":  # /proc takes no new file: the preview fails, so --out is not kept
        code, _, err = run(capsys, *argv, "--preview", "/proc/backdoorlab-test.png")
        assert code == 2 and "/proc/backdoorlab-test.png" in err and len(err.strip().splitlines()) == 1
        assert snapshot(tmp_path) == before


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE")
def test_poison_on_a_full_disk_is_one_line_and_no_file(tmp_path):
    """HDF5 failing inside its own writes could crash the interpreter: the file is built in memory
    and written with one plain write, so a full disk (here: a file-size limit) is exit 74."""
    import resource

    data = tmp_path / "d.h5"
    write_csaw_h5(load_dataset("digits").take(300, seed=0), data)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    p = subprocess.run([sys.executable, "-m", "backdoorlab", "poison", str(data), "--trigger", "patch",
                        "--all", "--out", str(tmp_path / "p.h5")], capture_output=True, text=True,
                       preexec_fn=limit, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 74 and len(lines) == 1 and "disk full while writing" in lines[0], p.stderr
    assert sorted(q.name for q in tmp_path.iterdir()) == ["d.h5"]


def test_report_never_replaces_a_users_report(capsys, tmp_path):
    (tmp_path / "report.md").write_text("my report")
    before = snapshot(tmp_path)
    assert "never replaced" in refused(capsys, "report", tmp_path)
    assert snapshot(tmp_path) == before


# --- options checked before any work -------------------------------------------------------------

BAD_OPTIONS = [
    ("attack", ["--epochs", "-1"]), ("attack", ["--epochs", "0"]), ("attack", ["--batch-size", "0"]),
    ("attack", ["--lr", "-1"]), ("attack", ["--lr", "nan"]), ("attack", ["--rate", "1.5"]),
    ("attack", ["--rate", "0"]), ("attack", ["--test-fraction", "1"]), ("attack", ["--seed", "-3"]),
    ("attack", ["--num-classes", "-1"]), ("attack", ["--size", "0"]),
    ("prune", ["--batch-size", "0"]), ("prune", ["--drops", "abc"]), ("prune", ["--drops", "-5"]),
    ("prune", ["--order", "guided", "--guide-triggers", "t.npz", "--guide-labels", "abc"]),
    ("prune", ["--guide-labels", "0"]), ("prune", ["--order", "guided"]),
    ("fine-prune", ["--epochs", "-1"]), ("fine-prune", ["--lr", "0"]), ("fine-prune", ["--drop", "-4"]),
    ("fine-prune", ["--select-fraction", "0"]), ("fine-prune", ["--batch-size", "0"]),
    ("cleanse", ["--batch", "0"]), ("cleanse", ["--steps", "-1"]), ("cleanse", ["--images", "-5"]),
    ("cleanse", ["--suspects", "-1"]), ("cleanse", ["--top-k", "-1"]),
    ("cleanse", ["--threshold", "nan"]), ("cleanse", ["--threshold", "-1"]),
    ("cleanse", ["--threshold", "inf"]), ("cleanse", ["--check-every", "0"]),
    ("cleanse", ["--check-every", "-1"]), ("attack", ["--augment", "bogus"]),
    ("cleanse", ["--mitigate", "unlearn", "--mitigate-epochs", "0"]),
    ("cleanse", ["--mitigate", "unlearn", "--mitigate-labels", "abc"]),
    ("eval", ["--num-classes", "7"]),  # the model has 10
]


@pytest.mark.parametrize(("command", "extra"), BAD_OPTIONS, ids=lambda v: " ".join(v) if
                         isinstance(v, list) else v)
def test_bad_option_is_one_line_before_any_work(files, capsys, tmp_path, command, extra):
    model, valid = files / "m.safetensors", files / "valid.h5"
    base = {
        "attack": ["attack", "--data", "digits", "--trigger", "patch", "--target", "0"],
        "prune": ["prune", model, "--valid", valid],
        "fine-prune": ["fine-prune", model, "--valid", valid],
        "cleanse": ["cleanse", model, "--clean", valid],
        "eval": ["eval", model, "--clean", valid],
    }[command]
    out = [] if command == "eval" else ["--out", tmp_path / "o"]
    t = time.perf_counter()
    refused(capsys, *base, *extra, *out)
    assert time.perf_counter() - t < 20  # refused up front, not after training or a scan
    assert list(tmp_path.iterdir()) == []


# --- one line and an exit status for expected OS failures ----------------------------------------

@pytest.mark.parametrize(("err", "code", "words"), [
    (errno.ENOSPC, 74, "disk full"), (errno.EROFS, 2, "cannot access"),
    (errno.EACCES, 2, "cannot access"), (errno.EIO, 74, "input/output error")])
def test_os_errors_map_to_one_line(capsys, monkeypatch, err, code, words):
    def boom(args):
        raise OSError(err, os.strerror(err), "/some/out/file")

    monkeypatch.setattr("backdoorlab.cli.build_parser", _parser_with(boom))
    rc, _, stderr = run(capsys, "data", "info", "digits")
    assert rc == code
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "/some/out/file" in lines[0]


def test_a_real_bug_still_shows_its_traceback(monkeypatch):
    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("backdoorlab.cli.build_parser", _parser_with(bug))
    with pytest.raises(ZeroDivisionError):
        main(["data", "info", "digits"])


def _parser_with(func):
    from backdoorlab import cli

    real = cli.build_parser

    def build():
        p = real()
        sub = next(a for a in p._actions if a.dest == "command")
        for action in sub.choices["data"]._actions:
            for choice in (getattr(action, "choices", None) or {}).values():
                if hasattr(choice, "set_defaults"):
                    choice.set_defaults(func=func)
        return p

    return build


# --- Ctrl-C in `run` -----------------------------------------------------------------------------

@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find leftover processes")
@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGINT, signal.SIGINT], [signal.SIGTERM]],
                         ids=["ctrl-c", "ctrl-c-twice", "sigterm"])
def test_run_interrupted_stops_workers_and_says_what_is_kept(tmp_path, signals):
    from backdoorlab.experiment.executors import descendants

    text = (ROOT / "examples" / "digits-quick.toml").read_text().replace("epochs = 8", "epochs = 500")
    (tmp_path / "long.toml").write_text(text)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "backdoorlab", "run", str(tmp_path / "long.toml"), "--out", str(out),
         "--jobs", "2", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:  # the workers started
        time.sleep(0.2)
    time.sleep(3)  # inside the first cells' training
    workers = descendants(proc.pid)
    assert workers, "no worker processes started"
    for i, sig in enumerate(signals):
        if sig == signal.SIGTERM:
            os.kill(proc.pid, sig)  # the parent only, as `kill PID` does
        else:
            os.killpg(proc.pid, sig)  # the terminal sends Ctrl-C to the whole group
        if i + 1 < len(signals):
            time.sleep(0.3)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (143 if signals == [signal.SIGTERM] else 130), err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert "resumes" in lines[-1] and str(out) in lines[-1]
    time.sleep(0.5)
    alive = [p for p in workers if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == [], f"processes left running: {alive}"
