"""Channel Lipschitzness-based Pruning (`clp`): data-free; within each conv layer the channels whose
UCLC (spectral norm of the kernel shaped (in, kh·kw), BN folded in) is above mean + u·std are
switched off exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backdoorlab.cli import main
from backdoorlab.data import ImageSet
from backdoorlab.data.csaw import write_csaw_h5
from backdoorlab.models import Classifier, InputSpec, build, save_model
from backdoorlab.poisoned import poisoned_set
from backdoorlab.repairs import DefenderData, repair


def snapshot(clf: Classifier) -> dict:
    return {k: v.detach().clone() for k, v in clf.net.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def random_data(shape, classes, n=32, seed=0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, classes, n), classes)


def uclc(weight: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """The paper's bound, independently: largest singular value of W_k as (in, kh·kw), × |γ/σ|."""
    out = np.array([np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)[0] for w in weight])
    return out if scale is None else out * np.abs(scale)


def test_the_channel_with_a_large_spectral_norm_is_pruned():
    """small_cnn, no BN: conv_2's channel 7 gets a rank-1 kernel of spectral norm 3 (the others are
    small random kernels); CLP must prune exactly that channel, by zeroing its kernel row and bias."""
    torch.manual_seed(0)
    clf = Classifier(build("small_cnn", 4, (16, 16, 1)), InputSpec(16, 16, 1), 4, "small_cnn")
    rng = np.random.default_rng(0)
    conv2 = clf.layer("conv_2")
    w = rng.normal(0, 0.05, conv2.weight.shape).astype(np.float32)
    u, v = rng.normal(size=16), rng.normal(size=9)
    w[7] = (3 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))).reshape(16, 3, 3)
    with torch.no_grad():
        conv2.weight.copy_(torch.from_numpy(w))
        conv2.bias.fill_(0.1)
    before = snapshot(clf)
    fixed, res = repair("clp", clf, DefenderData(clean=random_data((16, 16, 1), 4)), None, [])
    assert same(before, snapshot(clf))
    d = res.details
    layers = {x["layer"]: x for x in d["layers"]}
    assert set(layers) == {"conv_1", "conv_2"} and d["channels"] == 48  # dense layers are not scanned
    assert np.allclose(layers["conv_2"]["uclc"], uclc(w), rtol=1e-4, atol=1e-5)
    assert layers["conv_2"]["uclc"][7] == pytest.approx(3.0, rel=1e-4)
    for name in ("conv_1", "conv_2"):  # the rule, recomputed from the scores
        s = np.asarray(layers[name]["uclc"])
        assert layers[name]["pruned"] == np.flatnonzero(s > s.mean() + 3 * s.std(ddof=1)).tolist()
    assert d["pruned"]["conv_2"] == [7] and res.summary.startswith("pruned ")
    fw = fixed.layer("conv_2")
    assert torch.all(fw.weight[7] == 0) and fw.bias[7] == 0
    assert np.all(fixed.activations(random_data((16, 16, 1), 4).images, "conv_2")[:, 7] == 0)
    assert res.passes == 0  # no image through the network
    assert res.summary == f"pruned {d['pruned_count']}/48 channels (u=3)"


def test_batch_norm_is_folded_into_the_bound():
    """gtsrb_cnn: UCLC of conv_3 = σ_max(W_k) · |γ_k| / sqrt(var_k + eps); a channel whose γ is 40×
    the others is pruned at the BN (gamma and beta zeroed) and is 0 after the block's ReLU."""
    torch.manual_seed(1)
    clf = Classifier(build("gtsrb_cnn", 5, (16, 16, 3)), InputSpec(16, 16, 3), 5, "gtsrb_cnn")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in clf.net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 2 + 0.1)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
        bn3 = clf.layer("conv_3").bn
        bn3.weight[10] = 40.0
    fixed, res = repair("clp", clf, DefenderData(clean=random_data((16, 16, 3), 5)), None, [])
    layers = {x["layer"]: x for x in res.details["layers"]}
    assert list(layers) == [f"conv_{i}.conv" for i in range(1, 7)]
    conv3 = clf.layer("conv_3").conv
    scale = (bn3.weight / torch.sqrt(bn3.running_var + bn3.eps)).detach().numpy()
    assert np.allclose(layers["conv_3.conv"]["uclc"], uclc(conv3.weight.detach().numpy(), scale), rtol=1e-4)
    assert 10 in res.details["pruned"]["conv_3.conv"] and layers["conv_3.conv"]["zeroed_at"] == "conv_3.bn"
    fbn = fixed.layer("conv_3").bn
    assert fbn.weight[10] == 0 and fbn.bias[10] == 0
    assert np.all(fixed.activations(random_data((16, 16, 3), 5).images, "conv_3")[:, 10] == 0)


def test_data_free_on_the_digits_badnet(digits_badnet):
    """The pruned set and the weights do not depend on data.clean; the figures at the paper's u."""
    clf, art, test = digits_badnet
    sets = [poisoned_set(art["poisoned_test"][0][0])]
    other = random_data(art["valid"].shape, art["valid"].num_classes, n=len(art["valid"]), seed=5)
    results = []
    for u in (3.0, 1.0):
        a, ra = repair("clp", clf, DefenderData(clean=art["valid"]), test, sets, {"u": u})
        b, rb = repair("clp", clf, DefenderData(clean=other), test, sets, {"u": u})
        assert ra.details["pruned"] == rb.details["pruned"] and same(snapshot(a), snapshot(b))
        assert ra.passes == rb.passes == 0
        results.append(ra)
    strict, loose = results
    assert strict.details["pruned_count"] < loose.details["pruned_count"]  # a smaller u prunes more
    if strict.details["pruned_count"] == 0:  # nothing pruned: the model is unchanged
        assert strict.after.clean_accuracy == strict.before.clean_accuracy
        assert strict.after.asr == strict.before.asr


def keras_graph() -> Classifier:
    """conv(linear) → BN → relu → conv(sigmoid) → conv(relu) → pool → dense → logits."""
    from backdoorlab.models.keras_graph import KerasGraph, parse_keras_config

    def layer(cls, name, cfg, src):
        return {"class_name": cls, "name": name, "config": {"name": name, **cfg},
                "inbound_nodes": [[[src, 0, 0, {}]]] if src else []}

    conv = {"kernel_size": [3, 3], "strides": [1, 1], "padding": "same", "use_bias": True}
    chain = [("InputLayer", "in", {"batch_input_shape": [None, 8, 8, 3]}),
             ("Conv2D", "conv_a", {**conv, "filters": 6, "activation": "linear"}),
             ("BatchNormalization", "bn_a", {"axis": -1, "epsilon": 1e-3, "momentum": 0.99}),
             ("Activation", "relu_a", {"activation": "relu"}),
             ("Conv2D", "conv_b", {**conv, "filters": 5, "activation": "sigmoid"}),
             ("Conv2D", "conv_c", {**conv, "filters": 7, "activation": "relu"}),
             ("MaxPooling2D", "pool", {"pool_size": [2, 2]}), ("Flatten", "flat", {}),
             ("Dense", "out", {"units": 3, "activation": "softmax"})]
    layers, prev = [], None
    for cls, name, cfg in chain:
        layers.append(layer(cls, name, cfg, prev))
        prev = name
    options = parse_keras_config({"class_name": "Model", "config": {
        "name": "m", "layers": layers, "input_layers": [["in", 0, 0]], "output_layers": [["out", 0, 0]]}})
    torch.manual_seed(0)
    net = KerasGraph(options)
    with torch.no_grad():
        net.module("conv_c").weight[2] *= 25
    return Classifier(net, InputSpec(8, 8, 3), 3, "keras_graph", options)


@pytest.mark.parametrize("arch", ["deepid", "keras"])
def test_runs_on_deepid_and_a_keras_graph(arch):
    if arch == "keras":
        clf = keras_graph()
    else:
        torch.manual_seed(0)
        clf = Classifier(build("deepid", 5, (31, 31, 3)), InputSpec(31, 31, 3), 5, "deepid")
    before = snapshot(clf)
    data = random_data(clf.spec.shape, clf.num_classes)
    fixed, res = repair("clp", clf, DefenderData(clean=data), None, [], {"u": 1.0})
    assert same(before, snapshot(clf))
    d = res.details
    names = [x["layer"] for x in d["layers"]]
    if arch == "deepid":
        assert names == ["conv_1", "conv_2", "conv_3", "head.conv_4"] and d["channels"] == 200
        assert d["pruned_count"] > 0
    else:
        assert names == ["conv_a", "conv_c"] and "conv_b" in d["skipped"] and res.notes
        assert 2 in d["pruned"]["conv_c"] and d["layers"][0]["zeroed_at"] == "bn_a"
        assert np.all(fixed.activations(random_data((8, 8, 3), 3).images, "conv_c")[:, 2] == 0)
    changed = {k for k, v in snapshot(fixed).items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith((".weight", ".bias")) for k in changed)


def test_cli(digits_badnet, tmp_path, capsys):
    clf, art, test = digits_badnet
    save_model(clf, tmp_path / "model.safetensors")
    write_csaw_h5(art["valid"], tmp_path / "valid.h5")
    code = main(["repair", "clp", str(tmp_path / "model.safetensors"), "--valid", str(tmp_path / "valid.h5"),
                 "--out", str(tmp_path / "out"), "--u", "1.5"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["method"] == "clp" and res["options"] == {"u": 1.5}
    assert res["summary"] == f"pruned {res['details']['pruned_count']}/48 channels (u=1.5)"
    assert (tmp_path / "out" / "model.safetensors").is_file()
