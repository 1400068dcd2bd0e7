"""KerasGraph: full-model Keras .h5 files (Keras 3 and Keras 2 config dialects) rebuilt in torch.

Keras 3 on the torch backend writes the files and is the oracle for every supported layer type;
Keras 2 files (no Keras 2 here) are produced by rewriting a Keras 3 config into the Keras 2 dialect.
"""
# ruff: noqa: E402  (keras needs KERAS_BACKEND set before it is imported)

import copy
import json
import os

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported; the only backend installed here

import h5py
import numpy as np
import pytest
import torch

from backdoorlab.cli import main
from backdoorlab.data import ImageSet
from backdoorlab.data.csaw import write_csaw_h5
from backdoorlab.errors import BadInput
from backdoorlab.models import Classifier, InputSpec, build, load_model, save_model
from backdoorlab.models.keras_graph import ACTIVATIONS, KerasGraph, parse_keras_config
from backdoorlab.models.keras_h5 import save_keras_weights

keras = pytest.importorskip("keras")
L = keras.layers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SHAPE = (21, 19, 3)  # odd sizes: 'same' padding with strides pads asymmetrically


def rand_images(n, shape=SHAPE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def randomise_batch_norms(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if i in (0, 3) else
                               rng.normal(0, 0.3, w.shape).astype(np.float32)
                               for i, w in enumerate(layer.get_weights())])


def all_layers_model():
    """A functional model touching every supported layer type and option."""
    keras.utils.set_random_seed(0)
    inp = L.Input(SHAPE, name="image")
    c1 = L.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="conv_1")(inp)
    b1 = L.BatchNormalization(epsilon=1e-2, name="bn_1")(c1)
    c2 = L.Conv2D(6, 4, padding="same", use_bias=False, name="conv_2")(b1)  # even kernel
    added = L.Add(name="add_1")([b1, c2])
    r = L.ReLU(max_value=2.0, negative_slope=0.1, threshold=0.05, name="relu_1")(added)
    cat = L.Concatenate(name="concat_c")([r, c1])
    p1 = L.MaxPooling2D(3, strides=2, padding="same", name="pool_1")(cat)
    p2 = L.AveragePooling2D(2, padding="same", name="avg_1")(p1)
    t = L.Activation("tanh", name="act_tanh")(p2)
    d = L.Dropout(0.5, name="drop_1")(t)
    c3 = L.Conv2D(8, 2, activation="relu", name="conv_3")(d)
    p3 = L.MaxPooling2D(2, name="pool_3")(c3)
    ch = L.Dense(5, activation="sigmoid", name="dense_pix")(c3)  # Dense on an image tensor
    ch2 = L.Dense(5, name="dense_pix2")(c3)
    hcat = L.Concatenate(axis=1, name="concat_h")([ch, ch2])  # along height: (4, 2, 5)
    gap = L.GlobalAveragePooling2D(name="gap")(c3)
    gmp = L.GlobalMaxPooling2D(name="gmp")(p3)
    v = L.Concatenate(name="concat_v")([L.Flatten(name="flat")(hcat), gap, gmp])
    v = L.Dense(16, activation="elu", name="fc_1")(v)
    v = L.BatchNormalization(name="bn_2")(v)
    out = L.Dense(7, activation="softmax", name="output")(L.Dropout(0.2, name="drop_2")(v))
    model = keras.Model(inp, out)
    randomise_batch_norms(model)
    return model


def activations_model():
    keras.utils.set_random_seed(1)
    inp = L.Input((6, 5, 2), name="x")
    c = L.Conv2D(3, 3, padding="same", name="c")(inp)
    acts = [a for a in ACTIVATIONS if a != "softmax"]
    branches = [L.Activation(a, name=f"act_{a}")(c) for a in acts]
    branches.append(L.Activation("softmax", name="act_softmax_mid")(c))  # kept mid-graph
    v = L.Flatten(name="f")(L.Concatenate(name="all")(branches))
    return keras.Model(inp, L.Dense(4, name="out")(v))


def sequential_model():
    keras.utils.set_random_seed(2)
    return keras.Sequential([
        L.Input(SHAPE), L.Conv2D(4, 3, activation="relu", name="c1"), L.MaxPooling2D(name="p1"),
        L.Conv2D(8, 3, padding="same", name="c2"), L.BatchNormalization(name="bn"),
        L.Activation("relu", name="a"), L.Flatten(name="f"), L.Dense(6, activation="softmax", name="d")])


def keras_probs(model, images, scale=1 / 255):
    return np.asarray(model.predict(images.astype(np.float32) * scale, verbose=0))


def keras_logits(model, images, name="output"):
    """The model's output with the final softmax switched off."""
    layer = model.get_layer(name)
    old = layer.activation
    layer.activation = keras.activations.linear
    try:
        return keras_probs(model, images)
    finally:
        layer.activation = old


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("keras")
    model = all_layers_model()
    model.save(str(d / "all.h5"))
    return model, d / "all.h5"


def test_all_layer_types_match_keras(saved):
    model, path = saved
    clf = load_model(path)  # no --arch: the config describes the graph
    assert clf.arch == "keras_graph" and clf.num_classes == 7 and clf.spec.shape == SHAPE
    assert clf.provenance["dropped_softmax"] == "output"
    x = rand_images(32)
    ours = clf.logits(x)
    assert np.abs(softmax(ours) - keras_probs(model, x)).max() <= 1e-5
    assert np.abs(ours - keras_logits(model, x)).max() <= 1e-4
    # intermediate layers too (channels and Keras' NHWC order)
    for name in ("concat_c", "avg_1", "concat_h", "bn_2"):
        sub = keras.Model(model.input, model.get_layer(name).output)
        want = keras_probs(sub, x[:8])
        got = clf.activations(x[:8], name)
        if got.ndim == 4:
            got = got.transpose(0, 2, 3, 1)
        assert np.abs(got - want).max() <= 1e-4, name


def test_activations_match_keras(tmp_path):
    model = activations_model()
    path = tmp_path / "acts.h5"
    model.save(str(path))
    clf = load_model(path)
    x = rand_images(16, (6, 5, 2))
    want = keras_probs(model, x)  # no final softmax here: these are logits
    assert np.abs(clf.logits(x) - want).max() <= 1e-4


def test_sequential_keras3(tmp_path):
    model = sequential_model()
    randomise_batch_norms(model, 3)
    path = tmp_path / "seq.h5"
    model.save(str(path))
    clf = load_model(path)
    x = rand_images(16)
    assert np.abs(softmax(clf.logits(x)) - keras_probs(model, x)).max() <= 1e-5
    assert clf.default_prune_layer() == ("c2", "c2")  # c2 feeds a batch norm: measured at itself


def to_keras2(config: dict) -> dict:
    """Rewrite a Keras 3 functional config in the Keras 2 dialect (as Keras 2.2.4 wrote it)."""
    def refs(obj):
        if isinstance(obj, dict):
            if obj.get("class_name") == "__keras_tensor__":
                return [obj["config"]["keras_history"]]
            return [r for v in obj.values() for r in refs(v)]
        if isinstance(obj, list):
            return [r for v in obj for r in refs(v)]
        return []

    layers = []
    for layer in config["config"]["layers"]:
        cfg = dict(layer["config"])
        cfg.pop("dtype", None)
        if layer["class_name"] == "InputLayer":
            cfg = {"batch_input_shape": cfg["batch_shape"], "dtype": "float32", "sparse": False,
                   "name": cfg["name"]}
        inbound = [[[n, i, t, {}] for n, i, t in refs(node["args"])] for node in layer["inbound_nodes"]]
        layers.append({"name": layer["name"], "class_name": layer["class_name"], "config": cfg,
                       "inbound_nodes": inbound})
    return {"class_name": "Model", "config": {
        "name": "model_1", "layers": layers,
        "input_layers": [config["config"]["input_layers"]],
        "output_layers": [config["config"]["output_layers"]]}}


def rewrite_config(src, dst, config):
    with h5py.File(src, "r") as a, h5py.File(dst, "w") as b:
        a.copy(a["model_weights"], b, name="model_weights")
        b.attrs["keras_version"] = "2.2.4"
        b.attrs["backend"] = "tensorflow"
        b.attrs["model_config"] = json.dumps(config).encode()


def test_keras2_dialects(saved, tmp_path):
    model, path = saved
    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["model_config"])
    k2 = tmp_path / "keras2.h5"
    rewrite_config(path, k2, to_keras2(config))
    x = rand_images(16)
    np.testing.assert_array_equal(load_model(k2).logits(x), load_model(path).logits(x))
    # Keras 2.2.4 Sequential: a bare list of layers, no InputLayer, batch_input_shape on the first
    seq = sequential_model()
    randomise_batch_norms(seq, 4)
    seq.save(str(tmp_path / "seq3.h5"))
    with h5py.File(tmp_path / "seq3.h5", "r") as f:
        layers = json.loads(f.attrs["model_config"])["config"]["layers"]
    first = layers[1]
    first["config"]["batch_input_shape"] = layers[0]["config"]["batch_shape"]
    seq2 = tmp_path / "seq2.h5"
    rewrite_config(tmp_path / "seq3.h5", seq2, {"class_name": "Sequential", "config": layers[1:]})
    clf = load_model(seq2)
    assert clf.layer_names()[0] == "c1_input"
    assert np.abs(softmax(clf.logits(x)) - keras_probs(seq, x)).max() <= 1e-5


def test_forward_to_from_equal_full_forward(saved):
    clf = load_model(saved[1])
    net: KerasGraph = clf.net
    x = clf.to_tensor(rand_images(4))
    with torch.no_grad():
        full = net(x)
        assert {"image", "concat_c", "pool_1", "conv_3", "fc_1", "output"} <= set(net.stage_names)
        for name in net.stage_names:
            h = net.forward_to(name, x)
            assert torch.allclose(net.forward_from(name, h), full, atol=1e-5), name
        assert torch.allclose(net.forward_to("output", x), full)
        for not_cut in ("conv_2", "bn_1", "add_1", "pool_3", "gap", "dense_pix"):
            assert not_cut not in net.stage_names
            with pytest.raises(BadInput, match=f"cannot run the model from layer '{not_cut}'"):
                net.forward_from(not_cut, net.forward_to(not_cut, x))
        with pytest.raises(BadInput, match="unknown layer"):
            net.forward_to("nope", x)
    assert clf.default_prune_layer() == ("conv_3", "conv_3")  # conv_3 feeds 4 layers: measured at itself


def test_save_load_round_trip(saved, tmp_path):
    clf = load_model(saved[1])
    out = save_model(clf, tmp_path / "graph.safetensors")
    back = load_model(out)
    x = rand_images(16)
    assert back.arch == "keras_graph" and back.layer_names() == clf.layer_names()
    np.testing.assert_array_equal(back.logits(x), clf.logits(x))
    assert back.default_prune_layer() == clf.default_prune_layer()
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["arch_options"]["nodes"][1]["class"] == "Conv2D"


def test_exported_graph_loads_in_keras(saved, tmp_path):
    model, path = saved
    clf = load_model(path)
    with torch.no_grad():  # change it, so the export is not just the file it came from
        clf.layer("conv_3").weight.mul_(0.5)
        clf.layer("bn_2").running_mean.add_(0.25)
    out = save_keras_weights(clf, tmp_path / "graph_weights.h5")
    with h5py.File(path, "r") as a, h5py.File(out, "r") as b:  # Keras loads by layer order
        assert [n.decode() for n in b.attrs["layer_names"]] == list(a["model_weights"].attrs["layer_names"])
    fresh = all_layers_model()
    fresh.load_weights(str(out))
    x = rand_images(16)
    assert np.abs(softmax(clf.logits(x)) - keras_probs(fresh, x)).max() <= 1e-5


def test_export_staged_net_and_refusals(tmp_path):
    torch.manual_seed(0)
    spec = InputSpec(16, 16, 1)
    clf = Classifier(build("small_cnn", 10, spec.shape), spec, 10, "small_cnn")
    out = save_keras_weights(clf, tmp_path / "small.h5")
    model = keras.Sequential([
        L.Input((16, 16, 1)), L.Conv2D(16, 3, padding="same", activation="relu", name="conv_1"),
        L.MaxPooling2D(name="pool_1"), L.Conv2D(32, 3, padding="same", activation="relu", name="conv_2"),
        L.MaxPooling2D(name="pool_2"), L.Flatten(name="flatten"), L.Dense(64, activation="relu", name="fc_1"),
        L.Dense(10, name="output")])
    model.load_weights(str(out))
    x = rand_images(8, (16, 16, 1))
    assert np.abs(clf.logits(x) - keras_probs(model, x)).max() <= 1e-4
    gtsrb = Classifier(build("gtsrb_cnn", 43, (32, 32, 3)), InputSpec(32, 32, 3), 43, "gtsrb_cnn")
    with pytest.raises(BadInput, match="cannot export layer 'conv_1' \\(ConvBNAct\\)"):
        save_keras_weights(gtsrb, tmp_path / "gtsrb.h5")
    assert not (tmp_path / "gtsrb.h5").exists()


# -- refusals -------------------------------------------------------------------------------
def lambda_file(tmp_path):
    inp = L.Input((8, 8, 3), name="i")
    x = L.Lambda(lambda t: t * 2, name="lambda_1")(inp)
    path = tmp_path / "lambda.h5"
    keras.Model(inp, L.Dense(3, name="d")(L.Flatten(name="f")(x))).save(str(path))
    return path


def test_lambda_layer_refused(tmp_path, capsys):
    path = lambda_file(tmp_path)
    with pytest.raises(BadInput, match=r"layer 'lambda_1' \(Lambda\) is not supported: model files "
                                       r"are data, never code"):
        load_model(path)
    data = tmp_path / "clean.h5"
    write_csaw_h5(ImageSet(np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]), 3), data)
    assert main(["eval", str(path), "--clean", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lambda_1" in err[0] and "Lambda" in err[0]


def test_unsupported_and_malformed_configs(tmp_path):
    inp = L.Input((8, 8, 2), name="i")
    archive = tmp_path / "model.keras"
    keras.Model(inp, L.Dense(3, name="d")(L.Flatten(name="f")(inp))).save(str(archive))
    with pytest.raises(BadInput, match="'.keras' zip archive"):
        load_model(archive)
    path = tmp_path / "zp.h5"
    x = L.Flatten(name="f")(L.ZeroPadding2D(name="zp")(inp))
    keras.Model(inp, L.Dense(3, name="d")(x)).save(str(path))
    with pytest.raises(BadInput, match=r"'zp' \(ZeroPadding2D\) is not supported"):
        load_model(path)
    good = {"class_name": "Sequential", "config": [
        {"class_name": "Flatten", "config": {"name": "f", "batch_input_shape": [None, 4, 4, 1]}},
        {"class_name": "Dense", "config": {"name": "d", "units": 3}}]}
    assert [n["name"] for n in parse_keras_config(good)["nodes"]] == ["f_input", "f", "d"]
    bad_cases = {
        "not valid JSON": "{not json",
        "model class 'Foo'": {"class_name": "Foo", "config": {}},
        "expected a fixed image shape": {"class_name": "Sequential", "config": [
            {"class_name": "Flatten", "config": {"name": "f", "batch_input_shape": [None, None, 4, 1]}}]},
        "data_format 'channels_first'": _with(good, 1, data_format="channels_first", class_name="Conv2D",
                                               filters=2, kernel_size=[1, 1]),
        "activation 'gelu'": _with(good, 1, activation="gelu"),
        "units must be": _with(good, 1, units=0),
    }
    for msg, cfg in bad_cases.items():
        with pytest.raises(BadInput, match=msg):
            parse_keras_config(cfg)
    shared = json.dumps({"class_name": "Model", "config": {
        "layers": [{"name": "i", "class_name": "InputLayer",
                    "config": {"batch_input_shape": [None, 2, 2, 1]}, "inbound_nodes": []},
                   {"name": "d", "class_name": "Dense", "config": {"units": 2},
                    "inbound_nodes": [[["i", 0, 0, {}]], [["i", 0, 0, {}]]]}],
        "input_layers": [["i", 0, 0]], "output_layers": [["d", 0, 0]]}})
    with pytest.raises(BadInput, match="shared layer"):
        parse_keras_config(shared)


def _with(config, index, class_name=None, **changes):
    cfg = copy.deepcopy(config)
    if class_name:
        cfg["config"][index]["class_name"] = class_name
    cfg["config"][index]["config"].update(changes)
    return cfg


def test_weights_must_fit_the_config(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "bad.h5"
    with h5py.File(path, "r") as a, h5py.File(bad, "w") as b:
        for k, v in a.attrs.items():
            b.attrs[k] = v
        a.copy(a["model_weights"], b, name="model_weights")
        del b["model_weights/fc_1/fc_1/kernel"]
        b["model_weights/fc_1/fc_1"].create_dataset("kernel", data=np.zeros((5, 16), np.float32))
    with pytest.raises(BadInput, match="'fc_1' kernel has shape"):
        load_model(bad)


def test_dotted_layer_names(tmp_path):
    """Keras 2 allowed '.' in layer names; torch module keys do not. Such layers are found by their
    Keras name (Classifier.layer, activations) and computed like the undotted original."""
    keras.utils.set_random_seed(0)
    inp = L.Input((8, 8, 3), name="image")
    c = L.Conv2D(4, 3, activation="relu", name="conv_1")(inp)
    out = L.Dense(3, name="logits")(L.Flatten(name="flat")(c))
    src, dotted = tmp_path / "plain.h5", tmp_path / "dotted.h5"
    keras.Model(inp, out).save(str(src))
    with h5py.File(src, "r") as a, h5py.File(dotted, "w") as b:
        a.copy(a["model_weights"], b, name="model_weights")
        w = b["model_weights"]
        w.move("conv_1", "conv.1")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in w.attrs["layer_names"]]
        w.attrs["layer_names"] = [n.replace("conv_1", "conv.1").encode() for n in names]
        for k, v in a.attrs.items():
            b.attrs[k] = v
        cfg = a.attrs["model_config"]
        cfg = cfg.decode() if isinstance(cfg, bytes) else cfg
        assert cfg.count('"conv_1"') >= 2  # its name and the reference in the next layer
        b.attrs["model_config"] = cfg.replace('"conv_1"', '"conv.1"')
    plain, dot = load_model(src), load_model(dotted)
    assert "conv.1" in dot.layer_names() and "conv_1" not in dot.layer_names()
    x = rand_images(5, (8, 8, 3))
    assert np.array_equal(dot.logits(x), plain.logits(x))
    assert np.array_equal(dot.activations(x, "conv.1"), plain.activations(x, "conv_1"))
    with pytest.raises(BadInput, match="unknown layer"):
        dot.layer("conv.9")
