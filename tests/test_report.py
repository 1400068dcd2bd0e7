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
