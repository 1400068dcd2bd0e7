"""STRIP (input detector ``strip``) on the digits BadNet, the family's calibration, and
``backdoorlab detect strip``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backdoorlab import registry
from backdoorlab.cli import main
from backdoorlab.errors import BadInput
from backdoorlab.input_detectors import auroc, calibrate, evaluate, fit_filter
from backdoorlab.input_detectors.strip import loop_scores, overlay_draws
from backdoorlab.poisoned import poisoned_set


@pytest.fixture(scope="module")
def strip_run(digits_badnet):
    """STRIP at its defaults fitted on the fixture's clean validation split (threshold at 5 %
    false alarms on its held-back 20 %), with the scores of the clean and poisoned test sets."""
    clf, art, test = digits_badnet
    ps = poisoned_set(art["poisoned_test"][0][0])  # true-label convention: target-class inputs out
    filt = fit_filter("strip", clf, art["valid"], far=0.05)
    return filt, filt.scorer.score(test.images), filt.scorer.score(ps.images), ps


def test_strip_is_registered_as_an_input_detector():
    m = registry.get("strip", "input-detector")
    assert m.needs == ("clean",) and "ACSAC 2019" in m.paper
    o = m.options()
    assert (o.copies, o.alpha) == (100, 0.5)  # the paper's N, an equal-weight blend


def test_strip_separates_digits_badnet_inputs(strip_run):
    filt, clean, pois, ps = strip_run
    assert len(pois) == len(ps) > 300
    # trojaned inputs keep more of their (target) prediction under superimposition: lower mean
    # entropy (measured 1.08 vs 1.32 bits)
    assert -pois.mean() < -clean.mean() - 0.15
    # measured: AUROC 0.884, detection 56 % at a 5 % threshold (8 % false alarms on the clean
    # test: the threshold is set on only 27 held-back clean images). The 3x3 patch is halved
    # by the equal-weight blend, so STRIP is far from perfect on this small model.
    assert auroc(clean, pois) > 0.85
    assert np.mean(pois > filt.threshold) > 0.45
    assert np.mean(clean > filt.threshold) < 0.12


def test_evaluate_reports_the_same_figures(digits_badnet, strip_run):
    clf, art, test = digits_badnet
    filt, clean, pois, ps = strip_run
    ps2 = poisoned_set(art["poisoned_test"][0][0].subset(np.arange(60)))
    res = evaluate("strip", clf, art["valid"], test.subset(np.arange(120)), [ps, ps2], far=0.05)
    assert res.threshold == filt.threshold  # same split, same draws
    assert res.far_measured == pytest.approx(np.mean(clean[:120] > filt.threshold))
    per = res.details["per_set"]
    assert list(per) == [ps.name, f"{ps.name}#2"]  # same names: kept apart
    assert res.n_poisoned == len(ps) + len(ps2) and per[f"{ps.name}#2"]["n"] == len(ps2)
    assert per[ps.name]["detection_rate"] == pytest.approx(
        np.mean(pois > filt.threshold))
    assert res.options["copies"] == 100 and res.details["clean_split"] == {"fitted_on": 109,
                                                                         "threshold_set_on": 27}
    json.dumps(res.to_dict())


def test_calibrate_gives_the_requested_far_on_clean_data(strip_run):
    _, clean, _, _ = strip_run
    n = len(clean)
    for far in (0.01, 0.05, 0.1, 0.25):
        rate = np.mean(clean > calibrate(clean, far))
        assert far - 1.0 / n - 1e-12 <= rate <= far, far
    # set on one half of the clean test scores, measured on the other half
    half = n // 2
    assert abs(np.mean(clean[half:] > calibrate(clean[:half], 0.05)) - 0.05) < 0.04
    # ties: never more than the requested share above the threshold
    tied = np.r_[np.zeros(90), np.arange(1, 11)]
    assert np.mean(tied > calibrate(tied, 0.05)) <= 0.05
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(BadInput):
            calibrate(clean, bad)


def test_strip_is_deterministic_for_a_seed(digits_badnet):
    clf, art, test = digits_badnet
    m = registry.get("strip", "input-detector")
    x = test.images[:40]
    a = m.run(clf, art["valid"], m.options(copies=30)).score(x)
    b = m.run(clf, art["valid"], m.options(copies=30)).score(x)
    c = m.run(clf, art["valid"], m.options(copies=30, seed=1)).score(x)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    d = overlay_draws(5, 50, 30, seed=3)
    assert d.shape == (5, 30) and all(len(set(r)) == 30 for r in d)  # distinct overlays per input
    assert np.array_equal(d, overlay_draws(5, 50, 30, seed=3))


def test_batched_scores_equal_the_one_input_loop(digits_badnet):
    clf, art, test = digits_badnet
    m = registry.get("strip", "input-detector")
    ps = art["poisoned_test"][0][0]
    x = np.concatenate([test.images[:7], ps.images[:6]])  # 13 inputs: a partial last batch
    ref = None
    for batch in (1, 250, 2000):  # 1 input, 2 inputs, all inputs per network batch
        score = m.run(clf, art["valid"], m.options(batch=batch)).score
        s = score(x)
        if ref is None:  # the default superimposition: the authors' add, not clipped
            assert score.options.superimpose == "add"
            ref = loop_scores(clf, x, score.pool, score.draws(len(x)), score.options.alpha, "add")
        np.testing.assert_allclose(s, ref, rtol=0, atol=1e-5)
    # float input in [0, 1] is read as pixels/255: the same scores
    np.testing.assert_allclose(score(x.astype(np.float32) / 255.0), ref, rtol=0, atol=1e-5)
    # the equal-weight mix: batched = loop, and not the add's scores
    mix = m.run(clf, art["valid"], m.options(superimpose="mix", batch=250)).score
    ref_mix = loop_scores(clf, x, mix.pool, mix.draws(len(x)), 0.5, mode="mix")
    np.testing.assert_allclose(mix(x), ref_mix, rtol=0, atol=1e-5)
    assert np.abs(ref_mix - ref).max() > 1e-2
    # the sum clipped at 255: batched = loop, and not the unclipped add's scores (the digits have
    # white strokes, so sums above 255 occur)
    raw = m.run(clf, art["valid"], m.options(superimpose="add-clip", batch=250)).score
    ref_raw = loop_scores(clf, x, raw.pool, raw.draws(len(x)), 0.5, mode="add-clip")
    np.testing.assert_allclose(raw(x), ref_raw, rtol=0, atol=1e-5)
    assert np.abs(ref_raw - ref).max() > 1e-2


@pytest.fixture(scope="module")
def cli_files(digits_badnet, tmp_path_factory):
    from backdoorlab.data.csaw import write_csaw_h5
    from backdoorlab.models import save_model

    clf, art, test = digits_badnet
    d = tmp_path_factory.mktemp("strip_cli")
    model = save_model(clf, d / "m.safetensors")
    write_csaw_h5(art["valid"], d / "clean.h5")
    write_csaw_h5(test.subset(np.arange(150)), d / "test.h5")
    write_csaw_h5(art["poisoned_test"][0][0].subset(np.arange(150)), d / "pois.h5")
    return d, str(model)


def test_cli_detect_strip_writes_results(digits_badnet, cli_files, capsys):
    clf, art, test = digits_badnet
    d, model = cli_files
    out = d / "out"
    argv = ["detect", "strip", model, "--clean", str(d / "clean.h5"), "--test", str(d / "test.h5"),
            "--poisoned", str(d / "pois.h5"), "--far", "0.05", "--copies", "50", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "detection:" in text and "AUROC:" in text and "false alarms:" in text
    r = json.loads((out / "results.json").read_text())
    assert (out / "summary.txt").read_text().startswith("statistic:")
    ps = poisoned_set(art["poisoned_test"][0][0].subset(np.arange(150)))
    assert r["kind"] == "input-detect" and r["method"] == "strip" and r["options"]["copies"] == 50
    assert r["n_clean"] == 150 and r["n_poisoned"] == len(ps)
    assert r["poisoned_sets"][0]["convention"] == "true"  # per-image targets read from the file
    ref = evaluate("strip", clf, art["valid"], test.subset(np.arange(150)), ps,
                   {"copies": 50}, far=0.05)
    assert r["detection_rate"] == pytest.approx(ref.detection_rate)
    assert r["far_measured"] == pytest.approx(ref.far_measured)
    assert r["auroc"] == pytest.approx(ref.auroc) and r["auroc"] > 0.8


@pytest.mark.parametrize("far", ["0", "1", "-0.1", "1.5", "x"])
def test_cli_bad_far_is_one_line_exit_2_before_any_work(cli_files, capsys, far):
    d, model = cli_files
    out = d / f"bad{far}"
    with pytest.raises(SystemExit) as e:
        main(["detect", "strip", model, "--clean", str(d / "clean.h5"), "--far", far,
              "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--far" in err
    assert not out.exists()


def test_cli_detect_lists_both_families(capsys):
    from backdoorlab.cli import build_parser
    from backdoorlab.commands.detect import cmd_detect, cmd_input_detect

    p = build_parser()
    a = p.parse_args(["detect", "neural-cleanse", "m.safetensors", "--clean", "c", "--out", "o"])
    b = p.parse_args(["detect", "strip", "m.safetensors", "--clean", "c", "--out", "o"])
    assert a.func is cmd_detect and b.func is cmd_input_detect and b.far == 0.05
    with pytest.raises(SystemExit):
        p.parse_args(["detect", "--help"])
    help_text = capsys.readouterr().out
    assert "neural-cleanse" in help_text and "strip" in help_text


# -- classify --filter: any input detector as the GoodNet-style filter ----------------------------

def test_cli_classify_filter_answers_class_n_for_rejected_inputs(digits_badnet, cli_files, capsys):
    clf, art, test = digits_badnet
    d, model = cli_files
    argv = ["classify", model, str(d / "pois.h5"), str(d / "test.h5"), "--filter", "strip",
            "--clean", str(d / "clean.h5"), "--far", "0.05", "--filter-option", "copies=50", "--json"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    rows = json.loads(cap.out)
    assert "filter: strip" in cap.err and "class 10 = rejected" in cap.err
    assert len(rows) == 300
    # the same filter through the API: same threshold, same rejections
    filt = fit_filter("strip", clf, art["valid"], {"copies": 50}, far=0.05)
    images = np.concatenate([art["poisoned_test"][0][0].images[:150], test.images[:150]])
    rejected = filt.reject(images)
    plain = clf.predict(images)
    for r, rej, k, s in zip(rows, rejected, plain, filt.scorer.score(images), strict=True):
        assert r["backdoored"] == bool(rej) and r["suspicion"] == pytest.approx(float(s))
        assert r["class"] == (10 if rej else int(k))
    pois_rej = np.mean([r["backdoored"] for r in rows[:150]])
    clean_rej = np.mean([r["backdoored"] for r in rows[150:]])
    # measured: 36.7 % of the poisoned and 7.3 % of the clean inputs rejected (the unclipped add
    # pushes this white patch above white; add-clip rejects 100 %, docstring of strip.py)
    assert clean_rej < 0.15 and pois_rej > clean_rej + 0.2
    # text output: the rejected ones carry the word
    assert main(argv[:-1]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.endswith("\tbackdoored") for line in lines) == int(rejected.sum())
    assert all(line.split("\t")[1] == "10" for line in lines if line.endswith("backdoored"))


@pytest.mark.parametrize("extra, msg", [
    (["--filter", "strip"], "--clean"),
    (["--clean", "CLEAN"], "only applies with --filter"),
    (["--filter", "strip", "--clean", "CLEAN", "--filter-option", "copies"], "KEY=VALUE"),
    (["--filter", "strip", "--clean", "CLEAN", "--filter-option", "kopies=3"], "kopies"),
    (["--filter", "strip", "--clean", "CLEAN", "--filter-option", "copies=0"], "copies"),
    (["--filter", "strip", "--clean", "missing.h5"], "missing.h5"),
    (["--filter", "nope", "--clean", "CLEAN"], "--filter"),
    (["--filter", "strip", "--clean", "CLEAN", "--far", "1"], "--far"),
])
def test_cli_classify_filter_bad_input_is_one_line_exit_2(cli_files, capsys, monkeypatch, extra, msg):
    d, model = cli_files
    monkeypatch.chdir(d)
    called = []
    monkeypatch.setattr("backdoorlab.input_detectors.fit_filter", lambda *a, **k: called.append(1))
    extra = [str(d / "clean.h5") if x == "CLEAN" else x for x in extra]
    try:
        code = main(["classify", model, str(d / "test.h5"), *extra])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    assert code == 2 and not called
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err, err
