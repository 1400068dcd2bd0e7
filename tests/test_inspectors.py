"""Data inspectors (spectral signatures, activation clustering) and `backdoorlab inspect`.

One small_cnn is trained on the digits training split with a 3x3 white patch stamped on 5 % of
the split (67 images, relabelled 0; a third of label 0 is then poisoned). The floors below are the
figures measured on this set, less a margin. Why 5 % and not 10 %: at 10 % of the digits split
the poisoned images are half of label 0, outside both methods' premise (a poisoned minority of
the class): activation clustering's split of label 0 then lands at a relative size of 0.33-0.41
depending on the ICA seed, on either side of the 0.35 rule.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from backdoorlab.errors import BadInput

RATE, TARGET = 0.05, 0


@pytest.fixture(scope="module")
def poisoned():
    """(model, poisoned training set, poisoned row indices, clean training split)."""
    import torch

    from backdoorlab.attacks.poison import poison_training_set
    from backdoorlab.data.digits import load_digits
    from backdoorlab.models.architectures import build
    from backdoorlab.models.classifier import Classifier
    from backdoorlab.models.spec import InputSpec
    from backdoorlab.train import TrainConfig, seeded_init, train
    from backdoorlab.triggers import make_trigger

    torch.set_num_threads(2)
    clean, _ = load_digits().split(0.25, seed=3)
    data, info = poison_training_set(clean, make_trigger("patch:size=3", clean.shape), TARGET, RATE,
                                     seed=0)
    seeded_init(0)
    clf = Classifier(build("small_cnn", 10, clean.shape), InputSpec(*clean.shape, scale="unit"), 10,
                     "small_cnn")
    train(clf, data, None, TrainConfig(epochs=6, batch_size=64, lr=2e-3, seed=0))
    return clf, data, info.indices, clean


def _in_target(res, data, truth) -> tuple[int, int]:
    """(flagged rows labelled TARGET, poisoned among them)."""
    rows = np.intersect1d(res.inspection.flagged, np.flatnonzero(data.labels == TARGET))
    return len(rows), len(np.intersect1d(rows, truth))


# -- spectral signatures ----------------------------------------------------------------------------

def test_spectral_score_finds_a_planted_direction():
    from backdoorlab.inspectors.spectral import top_direction_scores

    rng = np.random.default_rng(0)
    # both branches (D <= n, D > n); with D > n the noise's own top direction is large
    # ((sqrt(n) + sqrt(D))^2 ~ 600 here), so the planted offset must beat it
    for n, d, shift in ((500, 20, 8.0), (60, 300, 20.0)):
        x = rng.normal(size=(n, d))
        u = rng.normal(size=d)
        u /= np.linalg.norm(u)
        bad = rng.choice(n, size=n // 10, replace=False)
        x[bad] += shift * u  # the poisoned tenth sits `shift` sigma away along u
        tau, sv, share = top_direction_scores(x)
        m = x - x.mean(axis=0)
        v = np.linalg.svd(m, full_matrices=False)[2][0]
        assert np.allclose(tau, (m @ v) ** 2, rtol=1e-6, atol=1e-8)
        sing = np.linalg.svd(m, compute_uv=False)
        assert sv == pytest.approx(sing[0], rel=1e-6)
        assert share == pytest.approx(sing[0] ** 2 / (sing ** 2).sum(), rel=1e-6)
        assert abs(v @ u) > 0.9  # measured 0.99 and 0.93
        top = np.argsort(-tau)[:int(1.5 * 0.1 * n + 0.5)]
        assert set(bad) <= set(top.tolist())  # every planted sample is in the top 1.5 eps n
    assert top_direction_scores(np.ones((5, 3)))[0].tolist() == [0.0] * 5  # no variance at all


def test_spectral_on_a_poisoned_training_set(poisoned):
    from backdoorlab.inspectors import inspect

    clf, data, truth, _ = poisoned
    res = inspect("spectral", clf, data, {"epsilon": 0.1}, truth=truth)
    ins = res.inspection
    n0 = int((data.labels == TARGET).sum())
    k0 = int(1.5 * 0.1 * n0 + 0.5)
    flagged0, hits0 = _in_target(res, data, truth)
    # measured: 30 removed in label 0, all 30 poisoned; recall 0.448 (the cap 30/67), precision 0.149
    assert ins.per_class[TARGET]["removed"] == flagged0 == k0 == 30
    assert hits0 >= 27
    assert res.recall >= 0.40 and res.precision >= 0.13
    assert len(ins.flagged) == sum(v["removed"] for v in ins.per_class.values())
    assert ins.scores.shape == (len(data),) and res.passes == len(data)
    assert ins.details["representation"] == "input of 'output' (penultimate)"
    again = inspect("spectral", clf, data, {"epsilon": 0.1}, truth=truth)
    assert np.array_equal(again.inspection.flagged, ins.flagged)


# -- activation clustering --------------------------------------------------------------------------

def test_activation_clustering_on_a_poisoned_training_set(poisoned):
    from backdoorlab.inspectors import inspect

    clf, data, truth, _ = poisoned
    res = inspect("ac", clf, data, truth=truth)  # PCA to 10, 2-means, relative size <= 0.35
    pc = res.inspection.per_class[TARGET]
    flagged0, hits0 = _in_target(res, data, truth)
    # measured: label 0 split 44 / 157 (relative size 0.219), all 44 poisoned; recall 0.657,
    # precision 0.253 (small clusters of the clean labels 1, 2, 4, 9 are flagged too)
    assert pc["poisoned"] and pc["relative_size"] <= 0.35 and "ica_converged" not in pc
    assert TARGET in res.inspection.details["poisoned_labels"]
    assert hits0 >= 0.9 * flagged0 and flagged0 == pc["flagged"]
    assert res.recall >= 0.55 and res.precision >= 0.18
    assert -1.0 <= pc["silhouette"] <= 1.0
    s = res.inspection.scores
    assert np.all(s[res.inspection.flagged] >= 1 - 0.35) and s.min() >= 0 and s.max() < 1
    ica = inspect("ac", clf, data, {"reduce": "ica"}, truth=truth)  # the paper's FastICA, seed 0
    # FastICA's answer depends on its seed and on the scikit-learn release, which is why PCA is the
    # default. Measured with scikit-learn 1.9.1, seeds 0-3: label 0 judged poisoned for seeds 0 and
    # 3 only (recall 0.57 / 0.52, precision 0.44 / 0.22), labels 1 or 3 alone for seeds 1 and 2;
    # an earlier release gave seed 0 recall 0.70. So only what holds for every seed is asserted:
    # each label records whether FastICA converged, the findings agree with the per-label
    # verdicts, and a seed gives the same answer twice.
    assert all(isinstance(v["ica_converged"], bool) for v in ica.inspection.per_class.values())
    assert set(ica.inspection.details["poisoned_labels"]) == {
        y for y, v in ica.inspection.per_class.items() if v["poisoned"]}
    again = inspect("ac", clf, data, {"reduce": "ica"}, truth=truth)
    assert np.array_equal(again.inspection.flagged, ica.inspection.flagged)


# -- the family's helpers ---------------------------------------------------------------------------

def test_precision_recall_and_truth_checks(poisoned):
    from backdoorlab.inspectors import check_truth, inspect, precision_recall

    assert precision_recall(np.array([1, 2, 3, 4]), np.array([2, 4, 9])) == (0.5, 2 / 3)
    assert precision_recall(np.array([], dtype=np.int64), np.array([1])) == (None, 0.0)
    assert precision_recall(np.array([1]), np.array([], dtype=np.int64)) == (0.0, None)
    assert check_truth([3, 1, 3], 5).tolist() == [1, 3]
    for bad in ([5], [-1], [[1, 2]], [1.5]):
        with pytest.raises(BadInput):
            check_truth(bad, 5)
    clf, data, _, _ = poisoned
    with pytest.raises(BadInput, match="out of range"):
        inspect("spectral", clf, data, truth=np.array([len(data)]))
    with pytest.raises(BadInput, match="epsilon"):
        inspect("spectral", clf, data, {"epsilon": 0.9})
    with pytest.raises(BadInput, match="unknown data-inspector"):
        inspect("nope", clf, data)


# -- the command line -------------------------------------------------------------------------------

def test_cli_inspect_reads_the_truth_from_a_poison_h5(poisoned, tmp_path, capsys):
    from backdoorlab.cli import main
    from backdoorlab.data.csaw import write_csaw_h5
    from backdoorlab.inspectors import inspect
    from backdoorlab.models.files import save_model

    clf, data, truth, clean = poisoned
    save_model(clf, tmp_path / "m.safetensors")
    write_csaw_h5(clean, tmp_path / "clean.h5")
    assert main(["poison", str(tmp_path / "clean.h5"), "--trigger", "patch:size=3", "--target", "0",
                 "--rate", str(RATE), "--out", str(tmp_path / "p.h5")]) == 0
    capsys.readouterr()
    out = tmp_path / "spectral"
    assert main(["inspect", "spectral", str(tmp_path / "m.safetensors"), "--data",
                 str(tmp_path / "p.h5"), "--epsilon", "0.1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    api = inspect("spectral", clf, data, {"epsilon": 0.1}, truth=truth)
    res = json.loads((out / "results.json").read_text())
    assert f"{len(truth):,} poisoned rows, from the poisoning record in p.h5" in text
    assert res["flagged"] == api.inspection.flagged.tolist()
    assert res["precision"] == api.precision and res["recall"] == api.recall
    assert res["n_poisoned"] == len(truth) and res["cost"]["image_passes"] == len(data)
    assert f"recall:     {api.recall:.2%}" in text and "label 0: 30 of 201 flagged" in text
    assert np.load(out / "flagged.npy").tolist() == res["flagged"]
    assert np.load(out / "scores.npy").shape == (len(data),)

    # --truth (a .json list) overrides the record in the file
    (tmp_path / "t.json").write_text(json.dumps(truth[:10].tolist()))
    assert main(["inspect", "spectral", str(tmp_path / "m.safetensors"), "--data",
                 str(tmp_path / "p.h5"), "--truth", str(tmp_path / "t.json"), "--epsilon", "0.1",
                 "--out", str(tmp_path / "given")]) == 0
    text = capsys.readouterr().out
    given = json.loads((tmp_path / "given" / "results.json").read_text())
    assert "10 poisoned rows, from --truth" in text and given["n_poisoned"] == 10
    assert given["flagged"] == res["flagged"]
    assert given["recall"] == len(np.intersect1d(api.inspection.flagged, truth[:10])) / 10

    # no truth known: no precision or recall
    assert main(["inspect", "spectral", str(tmp_path / "m.safetensors"), "--data",
                 str(tmp_path / "clean.h5"), "--out", str(tmp_path / "none")]) == 0
    text = capsys.readouterr().out
    assert "truth:      unknown" in text and "precision" not in text
    assert json.loads((tmp_path / "none" / "results.json").read_text())["precision"] is None


@pytest.mark.parametrize("truth, extra, message", [
    ("[100000]", [], "out of range for a training set of 1,347 rows"),
    ("[1, 2.5]", [], "expected a JSON list of row indices"),
    (None, ["--epsilon", "0.9"], "argument --epsilon"),
    (None, ["--layer", "nope"], "unknown layer 'nope'"),
])
def test_cli_inspect_bad_input_is_one_line(poisoned, tmp_path, capsys, truth, extra, message):
    from backdoorlab.cli import main
    from backdoorlab.data.csaw import write_csaw_h5
    from backdoorlab.models.files import save_model

    clf, data, _, _ = poisoned
    save_model(clf, tmp_path / "m.safetensors")
    write_csaw_h5(data, tmp_path / "d.h5")
    args = ["inspect", "spectral", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "d.h5"),
            "--out", str(tmp_path / "o"), *extra]
    if truth is not None:
        (tmp_path / "t.json").write_text(truth)
        args += ["--truth", str(tmp_path / "t.json")]
    try:
        code = main(args)
    except SystemExit as e:  # argparse refuses a bad option value itself
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_inspect_help_lists_both_methods(capsys):
    from backdoorlab.cli import main

    for argv in (["inspect", "--help"], ["inspect", "ac", "--help"], ["inspect", "spectral", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    text = capsys.readouterr().out
    assert "35 % of the class" in text and "--epsilon" in text and "--truth FILE" in text
