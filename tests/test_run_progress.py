"""What `run` shows while it computes: cached cells once, running cells' own progress (from the
status files their loops write), and an ETA that says when it is a guess."""

from __future__ import annotations

from backdoorlab.experiment.cells import Cell, status_path
from backdoorlab.experiment.display import GridProgress
from backdoorlab.progress import STATUS_ENV, progress, read_status, status_text


def cell(label: str, kind: str = "attack") -> Cell:
    return Cell(label, label, kind, "a", None, 0, {}, None)


def test_a_loop_keeps_its_status_file_current(tmp_path, monkeypatch):
    path = tmp_path / "x.status"
    monkeypatch.setenv(STATUS_ENV, str(path))
    seen = []
    for i in progress(range(5), desc="train epoch 2/8", unit="batch"):
        if i == 0:
            seen.append(read_status(path))  # written before the first item
    first, last = seen[0], read_status(path)
    assert first["n"] == 0 and first["total"] == 5 and first["desc"] == "train epoch 2/8"
    assert last["n"] == 5 and last["elapsed"] >= 0
    assert status_text(last).startswith("train epoch 2/8 5/5 batch")
    assert status_text(None) == "" and read_status(tmp_path / "missing") is None


def test_cached_cells_are_listed_once_and_running_cells_show_their_progress(tmp_path, capsys):
    cells = [cell("a-s0"), cell("b-s0"), cell("a-prune-s0", "prune")]
    (tmp_path / "logs").mkdir()
    con = GridProgress(cells, tmp_path, jobs=1, quiet_every=30, first_after=0, live=False)
    con.cached([{"key": "a-s0", "cell": {"label": "a-s0"}}], total=3)
    out = capsys.readouterr().out
    assert out.count("cached") == 1 and out.startswith("[1/3] cached: a-s0")
    con.started(cells[1])
    from backdoorlab.progress import write_status

    write_status(str(status_path(tmp_path, cells[1])), {"desc": "train epoch 3/8", "n": 2, "total": 10,
                                                        "unit": "batch", "elapsed": 4.0})
    con.tick([cells[1]])
    out = capsys.readouterr().out
    assert "b-s0: train epoch 3/8 2/10 batch, ~16 s left in it" in out and "ETA after the first cell" in out
    con.tick([cells[1]])  # the next quiet line comes quiet_every seconds later
    assert capsys.readouterr().out == ""
    con.finished({"key": "b-s0", "cell": {"label": "b-s0", "kind": "attack"}, "seconds": 20.0,
                  "accuracy": 0.9, "asr": 0.95}, done=2, total=3)
    out = capsys.readouterr().out
    assert out.startswith("[2/3] b-s0: clean acc 90.00 %, ASR 95.00 %")
    assert "a guess: no prune cell timed yet" in out  # the prune left is costed at the training mean
