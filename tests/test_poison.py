"""Poisoning plans (counts, labels, indices, seeds, modes) and the `poison` command."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from PIL import Image
from torch import nn

from backdoorlab.attacks import (
    attack_success,
    make_poisoned_test_set,
    poison_training_set,
    poison_training_set_multi,
)
from backdoorlab.cli import main
from backdoorlab.data import ImageSet
from backdoorlab.data.csaw import read_csaw_h5, write_csaw_h5
from backdoorlab.errors import BadInput
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.spec import InputSpec
from backdoorlab.triggers import TriggerStack, make_trigger

K = 5


def make_data(n=200, shape=(16, 16, 3), seed=0) -> ImageSet:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 200, (n,) + shape, dtype=np.uint8)  # < 255: a white patch always changes pixels
    y = rng.permutation(np.arange(n) % K).astype(np.int64)
    return ImageSet(x, y, K, name="toy")


def patch(data):
    return make_trigger("patch:size=3", data.shape)


def test_all2one_counts_labels_indices():
    data = make_data()
    out, info = poison_training_set(data, patch(data), target=2, rate=0.1, seed=0)
    idx = info.indices
    assert info.count == len(idx) == 20 and info.total == 200  # rate is a share of the WHOLE set
    assert np.all(np.diff(idx) > 0) and np.all(data.labels[idx] != 2)
    assert info.eligible == int((data.labels != 2).sum()) and info.label_changes == 20
    assert np.all(out.labels[idx] == 2)
    rest = np.setdiff1d(np.arange(200), idx)
    np.testing.assert_array_equal(out.labels[rest], data.labels[rest])
    np.testing.assert_array_equal(out.images[rest], data.images[rest])
    np.testing.assert_array_equal(out.images[idx], patch(data).apply(data.images[idx]))
    assert len(out) == len(data) and out.num_classes == K
    assert json.dumps(info.to_dict())
    # round(rate * N): 0.0125 * 200 = 2.5 -> 2 (ties to even), 0.0175 * 200 = 3.5 -> 4
    assert poison_training_set(data, patch(data), 2, 0.0125)[1].count == 2
    assert poison_training_set(data, patch(data), 2, 0.0175)[1].count == 4
    assert poison_training_set(data, patch(data), 2, 0.0)[1].count == 0


def test_seed_determinism():
    data = make_data()
    a = poison_training_set(data, patch(data), 1, 0.2, seed=3)
    b = poison_training_set(data, patch(data), 1, 0.2, seed=3)
    c = poison_training_set(data, patch(data), 1, 0.2, seed=4)
    np.testing.assert_array_equal(a[1].indices, b[1].indices)
    np.testing.assert_array_equal(a[0].images, b[0].images)
    assert not np.array_equal(a[1].indices, c[1].indices)


def test_all2all_and_clean_label():
    data = make_data()
    out, info = poison_training_set(data, patch(data), None, 0.3, mode="all2all", seed=1)
    idx = info.indices
    assert info.count == 60 and info.eligible == 200 and info.target is None
    np.testing.assert_array_equal(out.labels[idx], (data.labels[idx] + 1) % K)
    assert np.any(data.labels[idx] == K - 1)  # wraps around: K-1 -> 0
    out, info = poison_training_set(data, patch(data), 3, 0.1, clean_label=True, seed=1)
    idx = info.indices
    assert info.count == 20 and np.all(data.labels[idx] == 3) and info.label_changes == 0
    np.testing.assert_array_equal(out.labels, data.labels)
    assert not np.array_equal(out.images[idx], data.images[idx])
    with pytest.raises(BadInput, match="only 40 are eligible"):
        poison_training_set(data, patch(data), 3, 0.25, clean_label=True)
    with pytest.raises(BadInput, match="all-to-one"):
        poison_training_set(data, patch(data), 3, 0.1, mode="all2all", clean_label=True)
    with pytest.raises(BadInput, match=r"\[0, 1\]"):
        poison_training_set(data, patch(data), 3, 1.5)
    with pytest.raises(BadInput, match="out of range"):
        poison_training_set(data, patch(data), 7, 0.1)


def test_multi_trigger_disjoint():
    data = make_data(300)
    stack = TriggerStack.from_specs(["patch:pos=tl", "patch:pos=br", "blend:alpha=0.3"], [0, 1, 2],
                                    data.shape)
    out, info = poison_training_set_multi(data, stack, rate_each=0.1, seed=5)
    sets = [set(e.indices.tolist()) for e in info.entries]
    assert [len(s) for s in sets] == [30, 30, 30] and info.count == 90
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    for e, (trig, tgt) in zip(info.entries, stack, strict=True):
        assert np.all(data.labels[e.indices] != tgt) and np.all(out.labels[e.indices] == tgt)
        np.testing.assert_array_equal(out.images[e.indices], trig.apply(data.images[e.indices]))
    untouched = np.setdiff1d(np.arange(300), np.concatenate([e.indices for e in info.entries]))
    np.testing.assert_array_equal(out.images[untouched], data.images[untouched])
    again = poison_training_set_multi(data, stack, rate_each=0.1, seed=5)[1]
    assert all(np.array_equal(a.indices, b.indices) for a, b in zip(info.entries, again.entries,
                                                                    strict=True))
    with pytest.raises(BadInput, match="of the stack .* only .* left"):
        poison_training_set_multi(data, stack, rate_each=0.4)  # 3 x 120 > 300 rows


def test_poisoned_test_set_and_attack_success():
    data = make_data(100)
    t = patch(data)
    ps, targets = make_poisoned_test_set(data, t, target=4)
    keep = data.labels != 4
    assert len(ps) == keep.sum() and np.all(ps.labels != 4) and np.all(targets == 4)
    np.testing.assert_array_equal(ps.labels, data.labels[keep])  # TRUE labels kept
    np.testing.assert_array_equal(ps.images, t.apply(data.images[keep]))
    ps2, targets2 = make_poisoned_test_set(data, t, mode="all2all")
    assert len(ps2) == 100
    np.testing.assert_array_equal(targets2, (data.labels + 1) % K)

    class PixelNet(nn.Module):  # predicts the class written in pixel (0, 0) of channel 0
        def forward(self, x):
            return nn.functional.one_hot(x[:, 0, 0, 0].long() % K, K).float()

    clf = Classifier(PixelNet(), InputSpec(16, 16, 3, scale="raw"), K)
    imgs = ps2.images.copy()
    imgs[:, 0, 0, 0] = ps2.labels  # predicts the true label: no success
    imgs[:37, 0, 0, 0] = targets2[:37]  # 37 of 100 hit their own target
    assert attack_success(clf, ImageSet(imgs, ps2.labels, K), targets2) == pytest.approx(0.37)
    assert attack_success(clf, ImageSet(imgs, None, K), targets2) == pytest.approx(0.37)
    single = float(np.mean(clf.predict(imgs)[ps2.labels != 0] == 0))  # one target for all
    assert attack_success(clf, ImageSet(imgs, ps2.labels, K), 0) == pytest.approx(single)


# -- CLI ---------------------------------------------------------------------------------------

@pytest.fixture
def h5data(tmp_path):
    data = make_data(60)
    path = tmp_path / "clean.h5"
    write_csaw_h5(data, path)
    return data, path


def test_cli_poison_eval_set(h5data, tmp_path, capsys):
    data, src = h5data
    out = tmp_path / "out" / "bd.h5"
    prev = tmp_path / "out" / "bd.png"
    rc = main(["poison", str(src), "--trigger", "ftrojan:window=16,pos=15;15|7;7", "--target", "1",
               "--out", str(out), "--preview", str(prev)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "PSNR:      mean" in text and "true labels kept" in text
    back = read_csaw_h5(out)
    keep = data.labels != 1
    assert len(back) == keep.sum()
    np.testing.assert_array_equal(back.labels, data.labels[keep])
    trig = make_trigger("ftrojan:window=16,pos=15;15|7;7", data.shape)
    np.testing.assert_array_equal(back.images, trig.apply(data.images[keep]))
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["target"][()], np.ones(keep.sum()))
        np.testing.assert_array_equal(f["source_index"][()], np.flatnonzero(keep))
        meta = json.loads(f.attrs["backdoorlab_poison"])
    assert meta["trigger"]["kind"] == "ftrojan" and meta["quality"]["psnr_mean"] > 30
    assert Image.open(prev).size[0] > 8 * 16


def test_cli_poison_training_rate_and_multi(h5data, tmp_path, capsys):
    data, src = h5data
    out = tmp_path / "train.h5"
    assert main(["poison", str(src), "--trigger", "patch", "--target", "0", "--rate", "0.25",
                 "--seed", "3", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["poisoned"] == 15 and summary["total"] == 60
    back = read_csaw_h5(out)
    with h5py.File(out) as f:
        idx = f["poisoned_index"][()]
    expect, info = poison_training_set(data, make_trigger("patch", data.shape), 0, 0.25, seed=3)
    np.testing.assert_array_equal(idx, info.indices)
    np.testing.assert_array_equal(back.labels, expect.labels)
    np.testing.assert_array_equal(back.images, expect.images)
    out2 = tmp_path / "multi.h5"
    assert main(["poison", str(src), "--trigger", "patch:pos=tl", "--target", "1", "--trigger",
                 "patch:pos=br", "--target", "2", "--rate", "0.1", "--out", str(out2)]) == 0
    back = read_csaw_h5(out2)
    assert (back.labels != data.labels).sum() == 12


@pytest.mark.parametrize("argv, msg", [
    (["--trigger", "laser"], "unknown kind"),
    (["--trigger", "patch:size=99"], "does not fit"),
    (["--trigger", "patch", "--target", "9"], "out of range"),
    (["--trigger", "patch", "--rate", "1.5"], r"--rate: 1.5 is out of range \(expected \(0, 1\]\)"),
    (["--trigger", "patch", "--rate", "0.9"], "eligible"),
    (["--trigger", "patch", "--mode", "all2all", "--target", "1"], "drop --target"),
    (["--trigger", "patch", "--trigger", "blend", "--target", "1"], "multi-trigger"),
    (["--trigger", "patch", "--split", "train"], "--rate"),
    (["--trigger", "patch", "--preview", "p.jpg"], ".png"),
])
def test_cli_bad_input_exit2_nothing_written(h5data, tmp_path, capsys, argv, msg):
    _, src = h5data
    outdir = tmp_path / "o"
    outdir.mkdir()
    try:
        rc = main(["poison", str(src), "--out", str(outdir / "x.h5")] + argv)
    except SystemExit as e:  # refused by argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert __import__("re").search(msg, err)
    assert list(outdir.iterdir()) == []


def test_cli_bad_out_name(h5data, tmp_path, capsys):
    _, src = h5data
    assert main(["poison", str(src), "--trigger", "patch", "--out", str(tmp_path / "x.npz")]) == 2
    assert "FILE.h5" in capsys.readouterr().err
    assert main(["poison", str(src), "--trigger", "patch", "--out", str(src)]) == 2
    assert "input file" in capsys.readouterr().err


def test_cli_all2all_eval_set_keeps_true_labels(h5data, tmp_path):
    data, src = h5data
    out = tmp_path / "a2a.h5"
    assert main(["poison", str(src), "--trigger", "blend:alpha=0.1,seed=2", "--mode", "all2all",
                 "--all", "--out", str(out)]) == 0
    back = read_csaw_h5(out)
    np.testing.assert_array_equal(back.labels, data.labels)
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["target"][()], (data.labels + 1) % K)
    np.testing.assert_array_equal(back.images,
                                  make_trigger("blend:alpha=0.1,seed=2", data.shape).apply(data.images))
