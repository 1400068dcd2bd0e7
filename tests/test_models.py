import json

import numpy as np
import pytest
import torch

from backdoorlab.errors import BadInput
from backdoorlab.models import ARCHITECTURES, Classifier, InputSpec, build, load_model, save_model

SHAPES = {"deepid": (55, 47, 3), "gtsrb_cnn": (32, 32, 3), "preact_resnet18": (32, 32, 3),
          "small_cnn": (16, 16, 1)}


def rand_images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architectures_build_and_stage_split(arch):
    torch.manual_seed(0)
    shape = SHAPES[arch]
    net = build(arch, 7, shape).eval()
    spec = InputSpec(*shape)
    x = spec.to_tensor(rand_images(4, shape))
    with torch.no_grad():
        full = net(x)
        assert full.shape == (4, 7)
        for stage in net.stage_names[:-1]:
            h = net.forward_to(stage, x)
            assert torch.allclose(net.forward_from(stage, h), full, atol=1e-5), stage


def test_deepid_layer_shapes_match_csaw():
    net = build("deepid", 1283, (55, 47, 3))
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["stages.conv_1.weight"] == (20, 3, 4, 4)
    assert shapes["stages.conv_3.weight"] == (60, 40, 3, 3)
    assert shapes["stages.head.fc_1.weight"] == (160, 1200)
    assert shapes["stages.head.conv_4.weight"] == (80, 60, 2, 2)
    assert shapes["stages.head.fc_2.weight"] == (160, 960)
    assert shapes["stages.head.output.weight"] == (1283, 160)
    x = torch.zeros(1, 3, 55, 47)
    assert net.forward_to("pool_3", x).shape == (1, 60, 5, 4)


def test_input_spec_scales():
    img = np.full((1, 2, 2, 3), 255, np.uint8)
    assert InputSpec(2, 2, 3, "unit").to_tensor(img).max().item() == pytest.approx(1.0)
    assert InputSpec(2, 2, 3, "raw").to_tensor(img).max().item() == pytest.approx(255.0)
    s = InputSpec(2, 2, 3, "unit", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert s.to_tensor(img).max().item() == pytest.approx(1.0)
    x01 = torch.ones(1, 3, 2, 2)
    assert torch.allclose(s.from_unit(x01), s.to_tensor(img))
    with pytest.raises(BadInput):
        InputSpec(2, 2, 3, "percent")


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    spec = InputSpec(16, 16, 1, "raw")
    clf = Classifier(build("small_cnn", 10, spec.shape), spec, 10, "small_cnn",
                     provenance={"note": "test"})
    path = save_model(clf, tmp_path / "m.safetensors")
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["arch"] == "small_cnn" and meta["input_spec"]["scale"] == "raw"
    back = load_model(path)
    x = rand_images(8, spec.shape)
    assert back.spec.scale == "raw"
    assert np.allclose(back.logits(x), clf.logits(x), atol=1e-6)
    assert load_model(path, input_scale="unit").spec.scale == "unit"
    # no pickle anywhere: the weights file is safetensors (header is JSON after an 8-byte length)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    json.loads(raw[8:8 + n])


def test_load_model_bad_inputs(tmp_path):
    with pytest.raises(BadInput, match="no such model file"):
        load_model(tmp_path / "none.safetensors")
    torch.manual_seed(1)
    spec = InputSpec(16, 16, 1)
    clf = Classifier(build("small_cnn", 10, spec.shape), spec, 10, "small_cnn")
    path = save_model(clf, tmp_path / "m.safetensors")
    side = tmp_path / "m.json"
    meta = json.loads(side.read_text())
    # corrupt weights
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    (tmp_path / "bad.json").write_text(json.dumps(meta))
    with pytest.raises(BadInput, match="corrupt safetensors"):
        load_model(bad)
    # class-count mismatch between sidecar and weights
    meta2 = dict(meta, num_classes=11)
    (tmp_path / "m2.json").write_text(json.dumps(meta2))
    (tmp_path / "m2.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(BadInput, match="do not fit"):
        load_model(tmp_path / "m2.safetensors")
    # unknown architecture
    (tmp_path / "m3.json").write_text(json.dumps(dict(meta, arch="transformer9000")))
    (tmp_path / "m3.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(BadInput, match="unknown architecture"):
        load_model(tmp_path / "m3.safetensors")
    # missing sidecar
    side.unlink()
    with pytest.raises(BadInput, match="missing sidecar"):
        load_model(path)


def test_classifier_layers_and_activations():
    torch.manual_seed(0)
    spec = InputSpec(55, 47, 3)
    clf = Classifier(build("deepid", 5, spec.shape), spec, 5, "deepid")
    assert {"conv_3", "pool_3", "conv_4", "fc_2", "output"} <= set(clf.layer_names())
    acts = clf.activations(rand_images(3, spec.shape), "pool_3")
    assert acts.shape == (3, 60, 5, 4) and acts.min() >= 0
    assert clf.default_prune_layer() == ("conv_3", "pool_3")
    with pytest.raises(BadInput, match="unknown layer"):
        clf.layer("conv_9")
    with pytest.raises(BadInput, match="expects images of shape"):
        clf.predict(rand_images(2, (32, 32, 3)))


def test_keras_weights_import_real_file(csaw_dir):
    clf = load_model(csaw_dir / "sunglasses_bd_weights.h5", arch="deepid")
    assert clf.num_classes == 1283 and clf.spec.scale == "unit"
    with pytest.raises(BadInput, match="--arch"):
        load_model(csaw_dir / "sunglasses_bd_weights.h5")
    with pytest.raises(BadInput, match="unknown architecture"):
        load_model(csaw_dir / "sunglasses_bd_weights.h5", arch="vgg99")
    with pytest.raises(BadInput, match="no counterpart|expects"):
        load_model(csaw_dir / "sunglasses_bd_weights.h5", arch="small_cnn")


# -- the pixel rule of Classifier (uint8; floats in [0, 1] = pixels/255; [0, 255] = raw; else refused)

def test_float_images_in_unit_range_are_read_as_pixels_over_255(digits_badnet):
    # the issue: float [0, 1] input was taken as 0-255 pixels and every image got one class
    clf, _, test = digits_badnet
    want = clf.predict(test.images)
    for x in (test.images / 255.0, (test.images / 255.0).astype(np.float32)):
        got = clf.predict(x)
        assert np.array_equal(got, want)
        assert (got == test.labels).mean() > 0.8 and len(np.unique(got)) > 5


@pytest.mark.parametrize("scale", ["unit", "raw"])
def test_every_accepted_pixel_form_gives_the_uint8_answer(scale):
    torch.manual_seed(0)
    spec = InputSpec(55, 47, 3, scale)
    clf = Classifier(build("deepid", 5, spec.shape), spec, 5, "deepid")
    x = rand_images(6, spec.shape)
    want, acts = clf.logits(x), clf.activations(x, "pool_3")
    forms = {"float64 /255": x / 255.0, "float32 /255": (x / 255.0).astype(np.float32),
             "float16 /255": (x / 255.0).astype(np.float16), "float32 raw": x.astype(np.float32),
             "int64 raw": x.astype(np.int64), "torch /255": torch.from_numpy(x / 255.0),
             "list raw": x.astype(float).tolist()}
    for name, v in forms.items():
        tol = 5e-2 if "float16" in name else 1e-4
        assert np.allclose(clf.logits(v), want, atol=tol), name
        assert np.allclose(clf.activations(v, "pool_3"), acts, atol=tol), name
    assert torch.allclose(clf.to_tensor(x / 255.0), clf.to_tensor(x), atol=1e-5)
    # one rule per call, not per batch: a dark first batch of raw floats stays raw
    dark = x.astype(np.float32)
    dark[:2] = np.minimum(dark[:2], 1.0)
    assert np.allclose(clf.logits(dark, batch_size=2), clf.logits(dark.astype(np.uint8)), atol=1e-4)


BAD_PIXELS = {  # name -> (make from uint8 images, expected message)
    "negative": (lambda x: x / 255.0 - 0.5, r"\[0, 1\].*found -0.5"),
    "above 255": (lambda x: x * 2.0, r"\[0, 255\].*found 0\.\.510"),
    "NaN": (lambda x: np.where(x > 128, np.nan, x / 255.0), "NaN"),
    "infinity": (lambda x: np.where(x > 128, np.inf, x), "NaN or infinity"),
    "int64 beyond 255": (lambda x: x.astype(np.int64) + 1000, r"found 1000\.\.1255"),
    "negative int": (lambda x: x.astype(np.int16) - 300, "found -300"),
    "bool": (lambda x: x > 128, "unsupported pixel type bool"),
    "complex": (lambda x: x.astype(np.complex64), "unsupported pixel type complex64"),
}


@pytest.mark.parametrize("name", sorted(BAD_PIXELS))
def test_other_pixel_values_are_refused_with_one_line(name):
    make, match = BAD_PIXELS[name]
    torch.manual_seed(0)
    spec = InputSpec(16, 16, 1)
    clf = Classifier(build("small_cnn", 3, spec.shape), spec, 3, "small_cnn")
    bad = make(rand_images(4, spec.shape))
    for call in (clf.predict, clf.logits, lambda v: clf.activations(v, "conv_1"), clf.to_tensor):
        with pytest.raises(BadInput, match=match) as e:
            call(bad)
        assert "\n" not in str(e.value), name


def test_architecture_names_ignore_case_and_dashes_and_errors_list_one_set():
    from backdoorlab.errors import BadInput
    from backdoorlab.models.architectures import build, canonical, known_text

    assert canonical("DeepID") == "deepid" and canonical("PreAct-ResNet18") == "preact_resnet18"
    assert canonical("ResNet18") == "preact_resnet18"
    net = build("Small-CNN", 10, (16, 16, 1))
    assert sum(p.numel() for p in net.parameters()) > 0
    with pytest.raises(BadInput, match=f"known: {known_text()}"):
        build("bogus", 10, (16, 16, 1))


def test_a_data_file_given_as_a_model_is_named_as_data(tmp_path, capsys):
    from backdoorlab.cli import main
    from backdoorlab.data import ImageSet
    from backdoorlab.data.csaw import write_csaw_h5

    rng = np.random.default_rng(0)
    write_csaw_h5(ImageSet(rng.integers(0, 256, (8, 16, 16, 1), dtype=np.uint8), np.arange(8) % 2, 2),
                  tmp_path / "clean.h5")
    assert main(["eval", str(tmp_path / "clean.h5"), "--clean", str(tmp_path / "clean.h5")]) == 2
    err = capsys.readouterr().err
    assert "a data file (datasets data, label), not a model" in err and err.count("\n") == 1
