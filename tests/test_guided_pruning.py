"""Guided pruning: channels ranked by backdoored-minus-clean activation, pruned first."""

import json

import numpy as np
import pytest

from backdoorlab.cli import main
from backdoorlab.data.csaw import write_csaw_h5
from backdoorlab.defenses.guided_pruning import guided_ranking, stamp_reversed_triggers
from backdoorlab.defenses.pruning import prune_sweep
from backdoorlab.errors import BadInput
from backdoorlab.models import save_model


@pytest.fixture(scope="module")
def badnet(digits_badnet):
    clf, art, test = digits_badnet
    return clf, art["valid"], art["poisoned_valid"][0][0], test, art["poisoned_test"][0][0]


def test_guided_ranking_is_the_activation_difference(badnet):
    clf, valid, pv, _, _ = badnet
    ranking, score = guided_ranking(clf, valid, pv)
    a_b = clf.activations(pv.images, "pool_2").mean(axis=(0, 2, 3))
    a_c = clf.activations(valid.images, "pool_2").mean(axis=(0, 2, 3))
    assert np.allclose(score, a_b - a_c, atol=1e-5)
    assert sorted(ranking.tolist()) == list(range(32))
    assert np.all(np.diff(score[ranking]) <= 1e-7)


def test_guided_removes_the_backdoor_sooner_than_dormant_first(badnet):
    clf, valid, pv, test, ps = badnet
    ranking, _ = guided_ranking(clf, valid, pv)
    guided = prune_sweep(clf, valid, test, ps, ranking=ranking, order="guided")
    plain = prune_sweep(clf, valid, test, ps, order="increasing")
    assert guided.asr[0] > 0.9

    def first_below(res, level=0.2):
        hit = np.flatnonzero(res.asr <= level)
        return int(hit[0]) if len(hit) else 10**9

    assert first_below(guided) < first_below(plain)
    assert first_below(guided) < 16  # fewer than half the channels carry the backdoor


def test_custom_ranking_is_validated(badnet):
    clf, valid, *_ = badnet
    with pytest.raises(BadInput, match="each of the 32 channels once"):
        prune_sweep(clf, valid, ranking=np.arange(31))


def test_prune_cli_guided_with_data_and_with_reversed_triggers(tmp_path, badnet, capsys):
    clf, valid, pv, test, ps = badnet
    save_model(clf, tmp_path / "m.safetensors")
    for name, s in (("v", valid), ("pv", pv), ("t", test), ("p", ps)):
        write_csaw_h5(s, tmp_path / f"{name}.h5")
    base = ["prune", str(tmp_path / "m.safetensors"), "--valid", str(tmp_path / "v.h5"), "--test",
            str(tmp_path / "t.h5"), "--poisoned", str(tmp_path / "p.h5"), "--order", "guided"]
    assert main(base + ["--guide", str(tmp_path / "pv.h5"), "--out", str(tmp_path / "g1")]) == 0
    r1 = json.loads((tmp_path / "g1" / "results.json").read_text())
    assert r1["sweep"]["order"] == "guided"
    # a reversed trigger that is the true 3x3 patch: stamping it equals the real trigger
    mask = np.zeros((16, 16), np.float32)
    mask[-4:-1, -4:-1] = 1.0
    pattern = np.ones((16, 16, 1), np.float32)
    np.savez(tmp_path / "triggers.npz", labels=np.array([0]), masks=mask[None], patterns=pattern[None],
             norms=np.array([9.0]))
    stamped = stamp_reversed_triggers(valid, tmp_path / "triggers.npz")
    assert len(stamped) == int((valid.labels != 0).sum())
    npz = str(tmp_path / "triggers.npz")
    assert main(base + ["--guide-triggers", npz, "--out", str(tmp_path / "g2")]) == 0
    r2 = json.loads((tmp_path / "g2" / "results.json").read_text())
    assert r2["sweep"]["ranking"][:3] == r1["sweep"]["ranking"][:3]
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "g3")]) == 2
    assert "needs exactly one" in capsys.readouterr().err
    assert not (tmp_path / "g3").exists()
