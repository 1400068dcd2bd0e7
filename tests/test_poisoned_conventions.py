"""Poisoned files written the way the CSAW-HackML organisers write them (label = target for every
image, no per-image targets), several poisoned sets per command, and the label-convention rule."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from backdoorlab.cli import main
from backdoorlab.data.csaw import write_csaw_h5
from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput
from backdoorlab.models.files import save_model
from backdoorlab.poisoned import label_convention, poisoned_set, poisoned_sets


def test_conventions_unit():
    x = np.zeros((4, 2, 2, 1), np.uint8)
    csaw = ImageSet(x, np.array([3, 3, 3, 3]), 10)
    assert label_convention(csaw) == "target"
    ps = poisoned_set(csaw)
    assert ps.target == 3 and len(ps) == 4 and ps.convention == "target" and "CSAW" in ps.rule
    # the given target agrees with the labels: still the CSAW reading
    assert poisoned_set(csaw, target=3).convention == "target"
    # labels read as true labels: every label equals the target, nothing left
    with pytest.raises(BadInput, match="no poisoned inputs left"):
        poisoned_set(csaw, target=3, labels="true")
    # another target: the labels are true labels (all differ from it), everything counts
    assert poisoned_set(csaw, target=1).convention == "true"
    with pytest.raises(BadInput, match="not all 1"):
        poisoned_set(csaw, target=1, labels="target")
    mixed = ImageSet(x, np.array([0, 1, 2, 1]), 10)
    assert label_convention(mixed) == "true"
    assert len(poisoned_set(mixed, target=1)) == 2
    with pytest.raises(BadInput, match="give the attack's target"):
        poisoned_set(mixed)
    own = ImageSet(x, np.array([0, 1, 2, 1]), 10, meta={"targets": np.array([1, 1, 1, 1])})
    assert poisoned_set(own).convention == "true" and len(poisoned_set(own)) == 2
    assert poisoned_set(ImageSet(x, None, 10), target=2).convention == "none"
    with pytest.raises(BadInput, match="1 --target labels.*got 2"):
        poisoned_sets([csaw], [3, 4])
    with pytest.raises(BadInput, match="one of auto, true, target"):
        poisoned_set(csaw, labels="maybe")
    names = [s.name for s in poisoned_sets([csaw, csaw])]
    assert len(set(names)) == 2


@pytest.fixture(scope="module")
def csaw_style(digits_badnet, tmp_path_factory):
    """The digits BadNet as a model file, clean files with true labels, and two CSAW-style poisoned
    files: the real trigger (labels all 0 = target) and clean images labelled 5 (a "trigger" the
    model does not follow: its ASR must come out low)."""
    clf, art, test = digits_badnet
    d = tmp_path_factory.mktemp("csaw_style")
    save_model(clf, d / "bd.safetensors")
    valid = art["valid"]
    write_csaw_h5(valid, d / "clean_validation_data.h5")
    write_csaw_h5(test, d / "clean_test_data.h5")
    ps, _ = art["poisoned_test"][0]
    write_csaw_h5(ImageSet(ps.images, np.zeros(len(ps), np.int64), ps.num_classes),
                  d / "patch_poisoned_data.h5")
    other = test.take(200, 0)
    write_csaw_h5(ImageSet(other.images, np.full(len(other), 5, np.int64), other.num_classes),
                  d / "five_poisoned_data.h5")
    return d


def _pois(d) -> list[str]:
    return ["--poisoned", str(d / "patch_poisoned_data.h5"), "--poisoned", str(d / "five_poisoned_data.h5")]


def test_eval_reads_csaw_labels_as_targets_one_asr_per_set(csaw_style, capsys):
    d = csaw_style
    assert main(["eval", str(d / "bd.safetensors"), "--clean", str(d / "clean_test_data.h5"),
                 *_pois(d), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    a, b = res["poisoned_sets"]
    assert a["convention"] == b["convention"] == "target"
    assert a["target"] == 0 and b["target"] == 5
    assert a["counted"] == a["total"]  # every input counts
    assert a["asr"] > 0.9 and b["asr"] < 0.3
    assert res["asr"] == a["asr"]
    assert main(["eval", str(d / "bd.safetensors"), "--clean", str(d / "clean_test_data.h5"), *_pois(d)]) == 0
    out = capsys.readouterr().out
    assert out.count("attack success:") == 2
    assert "labels are the attack target (CSAW convention): every input counts" in out


def test_bad_poisoned_options_refused_with_one_line(csaw_style, capsys):
    d = csaw_style
    base = ["eval", str(d / "bd.safetensors"), "--clean", str(d / "clean_test_data.h5")]
    for extra, msg in [(_pois(d) + ["--target", "0"], "need 2 --target labels"),
                       (["--poisoned", str(d / "patch_poisoned_data.h5"), "--poisoned-labels", "true"],
                        "no poisoned inputs left"),
                       (["--target", "0"], "give --poisoned too")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_data_info_names_the_convention(csaw_style, capsys):
    assert main(["data", "info", str(csaw_style / "patch_poisoned_data.h5")]) == 0
    assert "read as the attack target (CSAW convention" in capsys.readouterr().out


def test_prune_reports_every_set(csaw_style, tmp_path, capsys):
    d = csaw_style
    out = tmp_path / "prune"
    assert main(["prune", str(d / "bd.safetensors"), "--valid", str(d / "clean_validation_data.h5"),
                 "--test", str(d / "clean_test_data.h5"), *_pois(d), "--out", str(out)]) == 0
    sw = json.loads((out / "results.json").read_text())["sweep"]
    assert [s["target"] for s in sw["poisoned_sets"]] == [0, 5]
    assert len(sw["poisoned_sets"][1]["asr"]) == len(sw["steps"]["valid_accuracy"])
    reached = [t for t in sw["thresholds"] if t["reached"]]
    assert reached and all(len(t["asr_sets"]) == 2 for t in reached)
    assert all(len(t["goodnet"]["poisoned_sets"]) == 2 for t in reached)
    table = (out / "table.md").read_text()
    assert "B' ASR patch_poisoned_data (%)" in table and "G ASR five_poisoned_data (%)" in table
    head = (out / "curve.csv").read_text().splitlines()[0]
    assert "asr_patch_poisoned_data_pct" in head and "asr_five_poisoned_data_pct" in head


def test_fine_prune_reports_every_set(csaw_style, tmp_path):
    d = csaw_style
    out = tmp_path / "fp"
    assert main(["fine-prune", str(d / "bd.safetensors"), "--valid", str(d / "clean_validation_data.h5"),
                 "--test", str(d / "clean_test_data.h5"), *_pois(d), "--epochs", "1",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    for stage in ("before", "after_pruning", "after_finetuning"):
        assert [s["name"] for s in res[stage]["asr_sets"]] == ["patch_poisoned_data", "five_poisoned_data"]
    assert res["before"]["asr_sets"][0]["asr"] > 0.9


def test_cleanse_checks_mitigation_options_before_the_scan(csaw_style, tmp_path, capsys):
    d = csaw_style
    base = ["cleanse", str(d / "bd.safetensors"), "--clean", str(d / "clean_validation_data.h5"),
            "--labels", "0,1", "--steps", "5"]
    cases = [(["--mitigate", "unlearn,bogus", "--test", str(d / "clean_test_data.h5")], "unknown method"),
             (["--mitigate", "unlearn"], "needs --test"),
             (["--mitigate", "unlearn", "--test", str(d / "clean_test_data.h5"), "--mitigate-labels", "7"],
              "not among the scanned"),
             (["--mitigate", "unlearn", "--test", str(d / "nope.h5")], "nope.h5"),
             (["--test", str(d / "clean_test_data.h5")], "give --mitigate too")]
    for i, (extra, msg) in enumerate(cases):
        out = tmp_path / f"nc{i}"
        t0 = time.perf_counter()
        assert main([*base, *extra, "--out", str(out)]) == 2
        assert time.perf_counter() - t0 < 5
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
        assert not out.exists()  # refused before any scan state was written


def test_cleanse_mitigation_with_csaw_sets(csaw_style, tmp_path, capsys):
    d = csaw_style
    out = tmp_path / "nc"
    assert main(["cleanse", str(d / "bd.safetensors"), "--clean", str(d / "clean_validation_data.h5"),
                 "--labels", "0,1,2", "--mode", "full", "--steps", "60", "--images", "200",
                 "--mitigate", "unlearn,filter", "--mitigate-labels", "0", "--mitigate-epochs", "1",
                 "--test", str(d / "clean_test_data.h5"), *_pois(d), "--out", str(out)]) == 0
    res = json.loads((out / "mitigation" / "results.json").read_text())
    assert [s["target"] for s in res["poisoned_sets"]] == [0, 5]
    assert all(len(m["asr_sets"]) == 2 for m in res["methods"])
    assert "ASR patch_poisoned_data" in (out / "mitigation" / "table.md").read_text()


def test_run_given_model_with_several_csaw_sets(csaw_style, tmp_path):
    from backdoorlab.experiment.run import run_experiment

    d = csaw_style
    toml = tmp_path / "given.toml"
    toml.write_text(f"""
[[attack]]
name = "handed"
model = "{d / 'bd.safetensors'}"
valid = "{d / 'clean_validation_data.h5'}"
test = "{d / 'clean_test_data.h5'}"
poisoned = ["{d / 'patch_poisoned_data.h5'}", "{d / 'five_poisoned_data.h5'}"]
[[defense]]
name = "pruning"
kind = "prune"
report_drop = 4
""")
    res = run_experiment(toml, tmp_path / "out", jobs=1, threads=1, report=False)
    rows = {r[1]: r for r in res["table"]["rows"]}
    assert rows["none"][-1].startswith("ASR per trigger: patch_poisoned_data ")
    assert "five_poisoned_data" in rows["none"][-1]
    pruning = next(r for name, r in rows.items() if name.startswith("pruning"))
    assert pruning[-1].startswith("ASR per trigger: patch_poisoned_data "), rows
    assert "(after)" in pruning[-1]
    bad = tmp_path / "bad.toml"
    bad.write_text(toml.read_text().replace('poisoned = [', 'target = [0]\npoisoned = ['))
    with pytest.raises(BadInput, match=r"2 poisoned set\(s\) need as many targets"):
        run_experiment(bad, tmp_path / "out2", jobs=1, threads=1, report=False)
