"""`backdoorlab report`: builds from run folders; refuses folders with nothing to report."""

import json

from backdoorlab.cli import main


def test_report_refuses_empty_and_corrupt_folders(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no backdoorlab results.json" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid JSON" in err[0]
    assert not (tmp_path / "report.html").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_report_renders_a_fine_prune_run(tmp_path, capsys):
    run = tmp_path / "fp"
    run.mkdir()
    stage = {"valid_accuracy": 0.9, "test_accuracy": 0.88, "asr": 0.5}
    (run / "results.json").write_text(json.dumps({
        "kind": "fine-prune", "pruned_channels": [1, 2], "num_channels": 8, "layer": "conv_2",
        "before": stage, "after_pruning": dict(stage, asr=0.4), "after_finetuning": dict(stage, asr=0.0123),
        "settings": {"train": {"epochs": 3}, "seed": 7}, "inputs": {"model": str(run / "none.safetensors")}}))
    assert main(["report", str(tmp_path), "--title", "T"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "## Fine-Pruning: fp" in md and "| after fine-tuning | 90.00 % | 88.00 % | 1.23 % |" in md
    assert "Seeds: 7." in md
    html = (tmp_path / "report.html").read_text()
    assert "<h1>T</h1>" in html and "Provenance" in html


def test_report_names_grid_cells_and_shows_a_mitigation_once(tmp_path, capsys):
    """A `run` cell folder is titled "attack × defense, seed N" (from its cell.json), not by its
    hashed folder name; cleanse's mitigation/ results appear once, under the scan."""
    stage = {"valid_accuracy": 0.9, "test_accuracy": 0.88, "asr": 0.5}
    cell = tmp_path / "cells" / "badnets-fp-s1-0123456789ab"
    cell.mkdir(parents=True)
    (cell / "results.json").write_text(json.dumps({
        "kind": "fine-prune", "pruned_channels": [1], "num_channels": 8, "layer": "conv_2",
        "before": stage, "after_pruning": stage, "after_finetuning": stage,
        "settings": {"train": {"epochs": 1}, "seed": 1}, "inputs": {}}))
    (cell / "cell.json").write_text(json.dumps({"cell": {"attack": "badnets", "defense": "fp", "seed": 1}}))
    nc = tmp_path / "nc"
    (nc / "mitigation").mkdir(parents=True)
    labels = [{"label": y, "stage": "full", "norm": 10.0 - 9 * (y == 0),
               "anomaly_index": 3.0 if y == 0 else 0.5, "asr": 0.99, "flagged": y == 0} for y in range(3)]
    (nc / "results.json").write_text(json.dumps({
        "kind": "cleanse", "labels": labels, "flagged": [0], "mode": "full", "seconds": 3.0, "passes": 100,
        "median": 10.0, "mad": 1.0, "threshold": 2.0}))
    (nc / "mitigation" / "results.json").write_text(json.dumps({
        "kind": "mitigate", "labels": [0], "methods": [{"method": "unlearn", "clean_accuracy": 0.9,
                                                        "asr": 0.01, "detection_rate": None}]}))
    assert main(["report", str(tmp_path)]) == 0, capsys.readouterr().err
    md = (tmp_path / "report.md").read_text()
    assert "## Fine-Pruning: badnets × fp, seed 1" in md and "0123456789ab" not in md
    assert md.count("## Neural Cleanse mitigation") == 1 and "## Neural Cleanse: nc" in md


def test_html_from_the_template_escapes_what_the_results_say(tmp_path, capsys):
    """Text read from results files (titles, folder names, cells) is escaped in report.html; only the
    report's own **bold** and `code` marks become tags. The Markdown keeps the text as it is."""
    run = tmp_path / "x<script>alert(1)"
    run.mkdir()
    stage = {"valid_accuracy": 0.9, "test_accuracy": 0.88, "asr": 0.5}
    (run / "results.json").write_text(json.dumps({
        "kind": "fine-prune", "pruned_channels": [1], "num_channels": 8, "layer": "<img src=x onerror=1>",
        "before": stage, "after_pruning": stage, "after_finetuning": stage,
        "settings": {"train": {"epochs": 1}, "seed": 1}, "inputs": {}}))
    assert main(["report", str(tmp_path), "--title", "A & B"]) == 0, capsys.readouterr().err
    html = (tmp_path / "report.html").read_text()
    assert "<script>" not in html and "<img src=x" not in html
    assert "x&lt;script&gt;alert(1)" in html and "&lt;img src=x onerror=1&gt;" in html
    assert "<title>A &amp; B</title>" in html and "<h1>A &amp; B</h1>" in html
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# A & B\n") and "of <img src=x onerror=1>" in md


def test_report_templates_ship_with_the_package():
    from importlib.resources import files

    names = {p.name for p in files("backdoorlab.report").joinpath("templates").iterdir()}
    assert {"report.html.j2", "report.md.j2"} <= names
