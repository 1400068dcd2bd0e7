"""The fast pruning sweep against a naive reference, channel masks on weights, thresholds."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from backdoorlab.data import ImageSet
from backdoorlab.defenses.masking import apply_channel_mask, mask_from_channels, resolve_target
from backdoorlab.defenses.pruning import accuracy_drop, find_thresholds, prune_sweep
from backdoorlab.errors import BadInput
from backdoorlab.models import Classifier, InputSpec
from backdoorlab.models.architectures import deepid, gtsrb_cnn, preact_resnet18, small_cnn

ORDERS = ["increasing", "decreasing", "abs", "random"]


def he_init(net: nn.Module, seed: int) -> nn.Module:
    """Random weights with He scaling (and random BN statistics), so activations neither vanish
    nor explode and predictions spread over the classes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(1 + 0.2 * torch.rand(n, generator=g))
    return net


def blocky_images(n: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Random coarse blocks plus noise: more varied activations than uniform noise."""
    rng = np.random.default_rng(seed)
    h, w, c = shape
    coarse = rng.integers(0, 256, size=(n, 4, 4, c)).astype(np.float64)
    up = coarse.repeat(-(-h // 4), axis=1).repeat(-(-w // 4), axis=2)[:, :h, :w]
    return np.clip(up + rng.normal(0, 30, size=up.shape), 0, 255).astype(np.uint8)


def labeled(clf: Classifier, n: int, seed: int, noise: float = 0.15) -> ImageSet:
    """Images labeled by the unpruned model, with a share of random labels."""
    rng = np.random.default_rng(seed + 1000)
    x = blocky_images(n, clf.spec.shape, seed)
    y = clf.predict(x)
    flip = rng.random(n) < noise
    y[flip] = rng.integers(0, clf.num_classes, flip.sum())
    return ImageSet(x, y, clf.num_classes, name=f"set{seed}")


def tiny_deepid() -> Classifier:
    net = he_init(deepid(num_classes=7, input_shape=(31, 31, 3)), 1)
    return Classifier(net, InputSpec(31, 31, 3, scale="unit"), 7, "deepid")


def tiny_small() -> Classifier:
    net = he_init(small_cnn(num_classes=6, input_shape=(16, 16, 1)), 2)
    return Classifier(net, InputSpec(16, 16, 1, scale="unit"), 6, "small_cnn")


_NAIVE: dict = {}


def naive_curve(clf: Classifier, layer: str | None, ranking: np.ndarray, valid: ImageSet,
                test: ImageSet, poisoned: ImageSet, target: int) -> np.ndarray:
    """Reference: rebuild the pruned model by zeroing weights and run it in full at every step
    (memoised per ranking: it depends on nothing else)."""
    key = (id(clf), layer, tuple(int(c) for c in ranking), id(valid), id(test), id(poisoned), target)
    if key in _NAIVE:
        return _NAIVE[key]
    n = resolve_target(clf, layer).channels
    keep = poisoned.labels != target
    x = np.concatenate([valid.images, test.images, poisoned.images[keep]])
    a, b = len(valid), len(valid) + len(test)
    rows = []
    for k in range(len(ranking) + 1):
        pred = apply_channel_mask(clf, layer, mask_from_channels(n, ranking[:k])).predict(x)
        rows.append([(pred[:a] == valid.labels).mean(), (pred[a:b] == test.labels).mean(),
                     (pred[b:] == target).mean()])
    _NAIVE[key] = np.array(rows)
    return _NAIVE[key]


@pytest.fixture(scope="module")
def deepid_case():
    clf = tiny_deepid()
    return clf, labeled(clf, 70, 1), labeled(clf, 50, 2), labeled(clf, 40, 3)


@pytest.fixture(scope="module")
def small_case():
    clf = tiny_small()
    return clf, labeled(clf, 150, 4), labeled(clf, 120, 5), labeled(clf, 100, 6)


def _check_against_naive(case, layer, methods, slow_methods=(), slow_orders=("increasing", "random")):
    clf, v, t, p = case
    target = int(np.bincount(clf.predict(p.images)).argmax())  # so that the ASR moves
    for order in ORDERS:
        ref = None
        for method in [*methods, *(slow_methods if order in slow_orders else ())]:
            r = prune_sweep(clf, v, t, p, target=target, layer=layer, order=order, method=method, seed=3)
            assert r.method == method
            got = np.stack([r.valid_accuracy, r.test_accuracy, r.asr], axis=1)
            if ref is None:
                ref = naive_curve(clf, layer, r.ranking, v, t, p, target)
                # the test is only meaningful if pruning changes the predictions
                assert np.ptp(ref[:, 0]) > 0.1 and np.ptp(ref[:, 2]) > 0.1
            assert got.shape == ref.shape
            np.testing.assert_allclose(got, ref, atol=1e-6, err_msg=f"{order} {method}")


def test_deepid_sweep_matches_naive_every_order(deepid_case):
    _check_against_naive(deepid_case, None, ["incremental", "cached"], slow_methods=["hook"])


def test_small_cnn_sweep_matches_naive_every_order(small_case):
    _check_against_naive(small_case, None, ["cached", "hook"])


def test_other_layers_match_naive(small_case, deepid_case):
    # a stage measured after its pool (conv_1 -> pool_1), and a layer nested in DeepID's head
    assert resolve_target(small_case[0], "conv_1").point == "pool_1"
    clf, v, t, p = small_case
    r = prune_sweep(clf, v, t, p, target=1, layer="conv_1")
    ref = naive_curve(clf, "conv_1", r.ranking, v, t, p, 1)
    np.testing.assert_allclose(r.valid_accuracy, ref[:, 0], atol=1e-6)
    clf, v, t, p = deepid_case
    target = resolve_target(clf, "conv_4")
    assert target.point is None and target.channels == 80
    r = prune_sweep(clf, v, t, p, target=1, layer="conv_4", order="random", stop="max_drop",
                    drops=(5,))
    assert r.method == "hook"
    ref = naive_curve(clf, "conv_4", r.ranking[: r.steps - 1], v, t, p, 1)
    np.testing.assert_allclose(np.stack([r.valid_accuracy, r.test_accuracy, r.asr], 1), ref, atol=1e-6)


def test_skipping_inactive_rows_changes_nothing(deepid_case):
    clf, v, t, p = deepid_case
    a = prune_sweep(clf, v, t, p, target=2, skip_inactive=True)
    b = prune_sweep(clf, v, t, p, target=2, skip_inactive=False)
    assert a.timings["rows_rerun"] < b.timings["rows_rerun"]
    np.testing.assert_array_equal(a.valid_accuracy, b.valid_accuracy)
    np.testing.assert_array_equal(a.asr, b.asr)


@pytest.mark.parametrize("make", [tiny_deepid, tiny_small,
                                  lambda: Classifier(he_init(gtsrb_cnn(5, (16, 16, 3)), 3),
                                                     InputSpec(16, 16, 3), 5, "gtsrb_cnn"),
                                  lambda: Classifier(he_init(preact_resnet18(4, (8, 8, 3)), 4),
                                                     InputSpec(8, 8, 3), 4, "preact_resnet18")],
                         ids=["deepid", "small_cnn", "gtsrb_cnn", "preact_resnet18"])
def test_masked_weights_equal_masked_activations(make):
    """Zeroing a channel's weights (conv+bias, or BN gamma+beta) = zeroing it at the measure point."""
    clf = make()
    layer, point = clf.default_prune_layer()
    tgt = resolve_target(clf, None)
    assert (tgt.layer, tgt.point) == (layer, point)
    x = blocky_images(24, clf.spec.shape, 9)
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        h = clf.net.forward_to(point, clf.to_tensor(x))
    before = make_logits(clf, x)
    weights = {k: v.clone() for k, v in clf.net.state_dict().items()}
    for k in (0, 1, tgt.channels // 3, tgt.channels - 1, tgt.channels):
        mask = mask_from_channels(tgt.channels, rng.permutation(tgt.channels)[:k])
        pruned = apply_channel_mask(clf, None, mask)
        keep = torch.from_numpy(~mask).float().view(1, -1, 1, 1)
        with torch.inference_mode():
            ref = clf.net.forward_from(point, h * keep).numpy()
        got = pruned.logits(x)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))
        assert pruned.provenance["pruned"]["channels"] == np.flatnonzero(mask).tolist()
    # the original is untouched: its weights and its logits as before the masking
    after = clf.net.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], v) for k, v in weights.items())
    np.testing.assert_array_equal(make_logits(clf, x), before)


def make_logits(clf: Classifier, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return clf.net(clf.to_tensor(x)).numpy()


def test_mean_activation_is_the_documented_mean(deepid_case):
    clf, v, t, p = deepid_case
    r = prune_sweep(clf, v, stop="max_drop", drops=(1,))
    act = clf.activations(v.images, "pool_3")  # (N, 60, h, w), post-ReLU, after pooling
    np.testing.assert_allclose(r.mean_activation, act.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-7)
    assert r.ranking.tolist() == np.argsort(act.mean(axis=(0, 2, 3)), kind="stable").tolist()
    dec = prune_sweep(clf, v, order="decreasing", stop="max_drop", drops=(1,))
    assert dec.ranking[0] == int(np.argmax(r.mean_activation))


def test_find_thresholds_hand_made_curve():
    acc = [0.5, 0.49, 0.48, 0.46, 0.45, 0.40, 0.2]
    # points: 0, 1, 2, 4, 5, 10, 30     relative (% of 0.5): 0, 2, 4, 8, 10, 20, 60
    assert find_thresholds(acc, (2, 4, 10, 30), "points") == [2, 3, 5, 6]
    assert find_thresholds(acc, (2, 4, 10, 30), "relative") == [1, 2, 4, 6]
    assert find_thresholds(acc, (31, 70), "points") == [None, None]
    np.testing.assert_allclose(accuracy_drop(acc, "relative"), [0, 2, 4, 8, 10, 20, 60], atol=1e-9)
    # first crossing counts even if accuracy recovers later
    assert find_thresholds([0.9, 0.85, 0.9, 0.5], (4, 30), "points") == [1, 3]
    with pytest.raises(BadInput):
        accuracy_drop(acc, "percent")


def test_sweep_thresholds_bookkeeping(small_case):
    clf, v, t, p = small_case
    for unit in ("points", "relative"):
        r = prune_sweep(clf, v, t, p, target=1, drops=(2, 4, 10, 30), drop_unit=unit)
        base = r.valid_accuracy[0]
        drop = (base - r.valid_accuracy) * 100 if unit == "points" else (base - r.valid_accuracy) / base * 100
        for th in r.thresholds:
            first = np.flatnonzero(drop >= th.drop - 1e-9)
            assert th.reached == bool(len(first))
            if th.reached:
                assert th.step == first[0] and th.pruned == th.step
                assert th.unit == unit
                np.testing.assert_array_equal(np.flatnonzero(th.mask), np.sort(r.ranking[: th.step]))
                assert th.valid_accuracy == r.valid_accuracy[th.step]
                assert th.asr == r.asr[th.step]
                assert th.step in r.predictions
        assert any(th.reached for th in r.thresholds)
        d = r.to_dict()
        assert d["drop_unit"] == unit
        assert ("points" in d["units"]["drop"]) == (unit == "points")


def test_stop_at_max_drop_is_a_prefix(small_case):
    clf, v, t, p = small_case
    full = prune_sweep(clf, v, t, p, target=1)
    short = prune_sweep(clf, v, t, p, target=1, drops=(2, 10), stop="max_drop")
    k = short.steps
    assert k < full.steps
    np.testing.assert_array_equal(short.valid_accuracy, full.valid_accuracy[:k])
    assert short.thresholds[-1].step == k - 1


def test_target_inferred_and_target_rows_excluded(small_case):
    clf, v, t, p = small_case
    r = prune_sweep(clf, v, poisoned=p, stop="max_drop", drops=(1,))
    pred = clf.predict(p.images)
    assert r.target == int(np.bincount(pred).argmax())
    assert r.counts["poisoned"] == int((p.labels != r.target).sum())
    assert r.asr[0] == pytest.approx((pred[p.labels != r.target] == r.target).mean())
    assert any("target not given" in n for n in r.notes)


def test_bad_inputs(small_case):
    clf, v, t, p = small_case
    with pytest.raises(BadInput, match="unknown layer"):
        prune_sweep(clf, v, layer="conv_9")
    wrong = ImageSet(np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4, np.int64), 6, name="small")
    with pytest.raises(BadInput, match="expects images of shape"):
        prune_sweep(clf, wrong)
    many = ImageSet(v.images, v.labels, 43, name="gtsrb-like")
    with pytest.raises(BadInput, match="43 classes"):
        prune_sweep(clf, many)
    with pytest.raises(BadInput, match="order"):
        prune_sweep(clf, v, order="sideways")
    with pytest.raises(BadInput, match="drops"):
        prune_sweep(clf, v, drops=(2, -1))
    with pytest.raises(BadInput, match="cannot be pruned"):
        prune_sweep(clf, v, layer="pool_1")
    with pytest.raises(BadInput, match="channel mask"):
        apply_channel_mask(clf, None, np.zeros(5, bool))


def test_real_sunglasses_weights(csaw_dir):
    """The real CSAW sunglasses BadNet: incremental path = generic cached path = weights masking."""
    from backdoorlab.models import load_model

    clf = load_model(csaw_dir / "sunglasses_bd_weights.h5", arch="deepid")
    rng = np.random.default_rng(0)

    def rand(n):
        x = rng.integers(0, 256, size=(n, 55, 47, 3), dtype=np.uint8)
        return ImageSet(x, clf.predict(x), 1283)

    v, t, p = rand(200), rand(150), rand(150)
    fast = prune_sweep(clf, v, t, p, target=0)
    assert fast.method == "incremental" and (fast.layer, fast.point) == ("conv_3", "pool_3")
    assert fast.steps == 61 and fast.valid_accuracy[0] == 1.0
    generic = prune_sweep(clf, v, t, p, target=0, method="cached")
    np.testing.assert_array_equal(fast.ranking, generic.ranking)
    for a, b in [(fast.valid_accuracy, generic.valid_accuracy), (fast.test_accuracy, generic.test_accuracy),
                 (fast.asr, generic.asr)]:
        np.testing.assert_allclose(a, b, atol=1e-6)
    for step in (20, 45):
        m = apply_channel_mask(clf, "conv_3", fast.mask_at(step))
        assert (m.predict(v.images) == v.labels).mean() == pytest.approx(fast.valid_accuracy[step], abs=1e-9)


def test_plain_module_falls_back_to_a_hook(small_case):
    """A network without forward_to/forward_from (plain nn.Sequential) is masked by a hook."""
    from collections import OrderedDict

    staged, v, t, p = small_case
    plain = nn.Sequential(OrderedDict((k, copy.deepcopy(m)) for k, m in staged.net.stages.items()))
    clf = Classifier(plain, staged.spec, staged.num_classes, "custom")
    assert not clf.staged
    with pytest.raises(BadInput, match="pass --layer"):
        prune_sweep(clf, v)
    target = int(np.bincount(clf.predict(p.images)).argmax())
    r = prune_sweep(clf, v, t, p, target=target, layer="conv_2")
    assert r.method == "hook" and r.point is None
    ref = naive_curve(clf, "conv_2", r.ranking, v, t, p, target)
    np.testing.assert_allclose(np.stack([r.valid_accuracy, r.test_accuracy, r.asr], 1), ref, atol=1e-6)
    # measured at conv_2's own output (not after pooling) the same sweep is still exact
    assert np.ptp(ref[:, 0]) > 0.1
