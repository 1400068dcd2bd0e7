"""Keras HDF5 import/export of the real CSAW-HackML-2020 DeepID files, with Keras 3 as the oracle.

Keras 3 (torch backend, no TensorFlow) builds the DeepID with the same layer names and loads each
weights file with ``load_weights``; our import must give the same probabilities and logits. A plain
numpy forward pass written here is a second, independent oracle.
"""
# ruff: noqa: E402  (keras needs KERAS_BACKEND set before it is imported)

import os

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported; the only backend installed here

import h5py
import numpy as np
import pytest
import torch
from conftest import CSAW_FILES

from backdoorlab.cli import main
from backdoorlab.data import ImageSet
from backdoorlab.data.csaw import write_csaw_h5
from backdoorlab.errors import BadInput
from backdoorlab.models import load_model
from backdoorlab.models.keras_h5 import save_keras_weights

keras = pytest.importorskip("keras")
layers = keras.layers
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SCALE = {f: ("raw" if f == "lab3" else "unit") for f in CSAW_FILES}


def csaw_path(csaw_dir, name):
    return csaw_dir / f"{name}_bd_weights.h5"


def keras_deepid(final_activation: str):
    """The CSAW DeepID in Keras 3, layer names and creation order as in the CSAW files."""
    inp = keras.Input((55, 47, 3), name="input")
    x = layers.Conv2D(20, (4, 4), activation="relu", name="conv_1")(inp)
    x = layers.MaxPooling2D((2, 2), name="pool_1")(x)
    x = layers.Conv2D(40, (3, 3), activation="relu", name="conv_2")(x)
    x = layers.MaxPooling2D((2, 2), name="pool_2")(x)
    x = layers.Conv2D(60, (3, 3), activation="relu", name="conv_3")(x)
    p3 = layers.MaxPooling2D((2, 2), name="pool_3")(x)
    c4 = layers.Conv2D(80, (2, 2), activation="relu", name="conv_4")(p3)
    f1 = layers.Flatten(name="flatten_1")(p3)
    f2 = layers.Flatten(name="flatten_2")(c4)
    a = layers.Dense(160, name="fc_1")(f1)
    b = layers.Dense(160, name="fc_2")(f2)
    h = layers.Activation("relu", name="activation_1")(layers.Add(name="add_1")([a, b]))
    return keras.Model(inp, layers.Dense(1283, activation=final_activation, name="output")(h))


@pytest.fixture(scope="module")
def keras_models():
    return keras_deepid("softmax"), keras_deepid("linear")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (64, 55, 47, 3), dtype=np.uint8)


def keras_input(images, scale):
    x = images.astype(np.float32)
    return x / 255.0 if scale == "unit" else x


def keras_predict(model, x):
    return np.asarray(model.predict(x, batch_size=64, verbose=0))


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def assert_keras_holds(model, path):
    """Guard against the oracle itself mis-loading: Keras' kernels equal the file's arrays."""
    with h5py.File(path, "r") as f:
        for name in ("conv_1", "conv_4", "fc_1", "fc_2", "output"):
            np.testing.assert_array_equal(model.get_layer(name).get_weights()[0],
                                          f[name][name]["kernel:0"][()])


@pytest.mark.parametrize("name", CSAW_FILES)
def test_csaw_file_matches_keras(csaw_dir, keras_models, images, name):
    path = csaw_path(csaw_dir, name)
    probs_model, logits_model = keras_models
    probs_model.load_weights(str(path))
    logits_model.load_weights(str(path))
    assert_keras_holds(probs_model, path)
    clf = load_model(path, arch="deepid", input_scale=SCALE[name])
    ours = clf.logits(images)
    x = keras_input(images, SCALE[name])
    want_logits = keras_predict(logits_model, x)
    want_probs = keras_predict(probs_model, x)
    assert ours.shape == (64, 1283)
    assert np.abs(ours - want_logits).max() <= 1e-4
    assert np.abs(softmax(ours) - want_probs).max() <= 1e-4
    assert (ours.argmax(1) == want_probs.argmax(1)).all()
    assert ours.std() > 1e-3  # a non-degenerate network: the comparison means something


def numpy_deepid(path, x):
    """DeepID forward pass in plain numpy (NHWC, HWIO kernels read straight from the file)."""
    with h5py.File(path, "r") as f:
        w = {n: (f[n][n]["kernel:0"][()].astype(np.float64), f[n][n]["bias:0"][()].astype(np.float64))
             for n in ("conv_1", "conv_2", "conv_3", "conv_4", "fc_1", "fc_2", "output")}

    def conv(a, name):
        k, b = w[name]
        kh, kw = k.shape[:2]
        n, h, wd, _ = a.shape
        out = np.zeros((n, h - kh + 1, wd - kw + 1, k.shape[3]))
        for i in range(kh):
            for j in range(kw):
                out += np.einsum("nhwc,co->nhwo", a[:, i:i + h - kh + 1, j:j + wd - kw + 1, :], k[i, j])
        return np.maximum(out + b, 0)

    def pool(a):
        n, h, wd, c = a.shape
        a = a[:, :h // 2 * 2, :wd // 2 * 2, :].reshape(n, h // 2, 2, wd // 2, 2, c)
        return a.max(axis=(2, 4))

    def dense(a, name):
        k, b = w[name]
        return a.reshape(len(a), -1) @ k + b

    p3 = pool(conv(pool(conv(pool(conv(x, "conv_1")), "conv_2")), "conv_3"))
    h = np.maximum(dense(p3, "fc_1") + dense(conv(p3, "conv_4"), "fc_2"), 0)
    return dense(h, "output")


def test_csaw_matches_numpy_forward(csaw_dir, images):
    path = csaw_path(csaw_dir, "sunglasses")
    clf = load_model(path, arch="deepid")
    want = numpy_deepid(path, images[:3].astype(np.float64) / 255.0)
    assert np.abs(clf.logits(images[:3]) - want).max() <= 1e-4


def test_export_round_trip_is_exact_and_mirrors_the_file(csaw_dir, tmp_path, images):
    src = csaw_path(csaw_dir, "sunglasses")
    clf = load_model(src, arch="deepid")
    out = save_keras_weights(clf, tmp_path / "deepid.h5")
    assert [p.name for p in tmp_path.iterdir()] == ["deepid.h5"]  # no temporary left behind
    np.testing.assert_array_equal(load_model(out, arch="deepid").logits(images), clf.logits(images))
    with h5py.File(src, "r") as a, h5py.File(out, "r") as b:
        assert list(a.attrs["layer_names"]) == list(b.attrs["layer_names"])
        assert a.attrs["keras_version"] == b.attrs["keras_version"]
        assert a.attrs["backend"] == b.attrs["backend"]
        for layer in a.attrs["layer_names"]:
            layer = layer.decode()
            wa, wb = a[layer].attrs["weight_names"], b[layer].attrs["weight_names"]
            assert list(wa) == list(wb) and wa.dtype == wb.dtype, layer
            for wn in wa:
                np.testing.assert_array_equal(a[layer][wn.decode()][()], b[layer][wn.decode()][()])


def test_exported_pruned_model_loads_in_keras(csaw_dir, tmp_path, keras_models, images):
    """Change the network (prune conv_3 channels), export, and let Keras load the result."""
    clf = load_model(csaw_path(csaw_dir, "anonymous_1"), arch="deepid")
    with torch.no_grad():
        conv = clf.layer("conv_3")
        conv.weight[:30] = 0
        conv.bias[:30] = 0
    out = save_keras_weights(clf, tmp_path / "pruned.h5")
    _, logits_model = keras_models
    logits_model.load_weights(str(out))
    want = keras_predict(logits_model, keras_input(images, "unit"))
    assert np.abs(clf.logits(images) - want).max() <= 1e-4
    original = load_model(csaw_path(csaw_dir, "anonymous_1"), arch="deepid").logits(images)
    assert np.abs(original - want).max() > 1e-2  # the export carries the change


def test_keras_full_model_deepid_loads_without_arch(csaw_dir, tmp_path, images):
    """A full-model .h5 written by Keras 3 is rebuilt as a KerasGraph with DeepID's pruning default."""
    path = csaw_path(csaw_dir, "sunglasses")
    model = keras_deepid("softmax")
    model.load_weights(str(path))
    full = tmp_path / "deepid_full.h5"
    model.save(str(full))
    g = load_model(full)
    ref = load_model(path, arch="deepid")
    assert g.arch == "keras_graph" and g.num_classes == 1283 and g.spec.shape == (55, 47, 3)
    assert np.abs(g.logits(images) - ref.logits(images)).max() <= 1e-5
    assert g.default_prune_layer() == ("conv_3", "pool_3")
    assert "conv_4" not in g.net.stage_names and "pool_3" in g.net.stage_names
    assert isinstance(g.layer("conv_3"), torch.nn.Conv2d)
    np.testing.assert_allclose(g.activations(images[:8], "pool_3"),
                               ref.activations(images[:8], "pool_3"), atol=1e-5)
    exported = save_keras_weights(g, tmp_path / "graph_export.h5")
    np.testing.assert_array_equal(load_model(exported, arch="deepid").logits(images), g.logits(images))


# -- bad input ------------------------------------------------------------------------------
def test_bad_model_files(csaw_dir, tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not an hdf5 file\n")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)))
    for p in (text, junk):
        with pytest.raises(BadInput, match="not a readable HDF5"):
            load_model(p, arch="deepid")
    with pytest.raises(BadInput, match="--arch"):
        load_model(csaw_path(csaw_dir, "sunglasses"))
    with pytest.raises(BadInput, match="unknown architecture 'deepidd'"):
        load_model(csaw_path(csaw_dir, "sunglasses"), arch="deepidd")
    bad = tmp_path / "wrong_shape.h5"
    with h5py.File(csaw_path(csaw_dir, "sunglasses"), "r") as src, h5py.File(bad, "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        for k in src:
            src.copy(src[k], dst, name=k)
        del dst["conv_2/conv_2/kernel:0"]
        dst["conv_2/conv_2"].create_dataset("kernel:0", data=np.zeros((3, 3, 20, 41), np.float32))
    with pytest.raises(BadInput, match="conv_2.*shape"):
        load_model(bad, arch="deepid")
    empty = tmp_path / "empty.h5"
    with h5py.File(empty, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(BadInput, match="not a Keras HDF5 weights file"):
        load_model(empty, arch="deepid")


def test_cli_bad_model_is_one_line(csaw_dir, tmp_path, capsys):
    data = tmp_path / "clean.h5"
    write_csaw_h5(ImageSet(np.zeros((2, 55, 47, 3), np.uint8), np.array([0, 1]), 1283), data)
    assert main(["eval", str(csaw_path(csaw_dir, "lab3")), "--clean", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--arch" in err[0]


# -- the CLI on every real file ---------------------------------------------------------------
@pytest.mark.parametrize("name", CSAW_FILES)
def test_cli_eval_on_csaw_files(csaw_dir, tmp_path, capsys, name):
    rng = np.random.default_rng(2)
    clean = ImageSet(rng.integers(0, 256, (24, 55, 47, 3), dtype=np.uint8),
                     rng.integers(0, 1283, 24).astype(np.int64), 1283, name="random")
    data = tmp_path / "clean.h5"
    write_csaw_h5(clean, data)
    argv = ["eval", str(csaw_path(csaw_dir, name)), "--arch", "deepid", "--clean", str(data),
            "--input-scale", SCALE[name]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "deepid: 1283 classes" in out and "(24 images)" in out
