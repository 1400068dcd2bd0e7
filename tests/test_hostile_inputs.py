"""Hostile and broken input files (issue #17), through the public CLI.

Every crafted file must give exit status 2 and exactly one stderr line ``error: ...`` (no
traceback), create or remove no file, never hang on a FIFO or a device, and be refused before
any allocation far beyond its size. Hypothesis fuzzes the HDF5 and IDX readers: every outcome is
a successful read or BadInput.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import struct
import threading
import tracemalloc
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from PIL import Image

from backdoorlab.cli import main
from backdoorlab.data import ImageSet, load_dataset
from backdoorlab.data.csaw import write_csaw_h5
from backdoorlab.errors import BadInput
from backdoorlab.models import Classifier, InputSpec, build, save_model
from backdoorlab.models.keras_h5 import load_keras, save_keras_weights

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# -- running the CLI with a hang guard ------------------------------------------------------------

def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _release(fifo: Path) -> None:
    """Give a reader blocked on ``fifo`` an end of file (open and close a writer)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def run_cli(args: list, root: Path, timeout: float = 60.0) -> int:
    """``main(args)`` in a thread; fails (rather than hangs) if it blocks, e.g. on a FIFO. A warning
    that a plain ``backdoorlab`` run would print (a second stderr line) fails too."""
    box: dict = {}

    def target() -> None:
        try:
            box["rc"] = main([str(a) for a in args])
        except SystemExit as e:  # option refused by argparse (one line, status 2)
            box["rc"] = e.code
        except BaseException as e:  # noqa: BLE001  (re-raised in the test thread)
            box["exc"] = e

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join(timeout)
    shown = [w for w in caught if not issubclass(w.category, DeprecationWarning | PendingDeprecationWarning
                                                 | ResourceWarning | ImportWarning)]
    assert not shown, f"warnings would reach stderr: {[str(w.message) for w in shown]}"
    if t.is_alive():
        for fifo in (p for p in root.rglob("*") if p.is_fifo()):
            _release(fifo)
        t.join(10)
        pytest.fail(f"backdoorlab {' '.join(map(str, args))} blocked (it opened a FIFO or device)")
    if "exc" in box:
        raise box["exc"]
    return box["rc"]


def assert_refused(args: list, root: Path, capsys, match: str | None = None) -> str:
    capsys.readouterr()
    before = listing(root)
    rc = run_cli(args, root)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert rc == 2, f"exit {rc}, stderr {out.err!r}"
    assert "Traceback" not in out.err
    assert len(lines) == 1 and lines[0].startswith("error:"), out.err
    if match:
        assert re.search(match, lines[0]), lines[0]
    assert listing(root) == before, "a file was created or removed"
    return lines[0]


# -- building blocks -----------------------------------------------------------------------------

def write_png(path: Path, img: np.ndarray) -> Path:
    Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(path)
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` grey pixels (a decompression bomb's head)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def idx(arr: np.ndarray, dims: tuple[int, ...] | None = None) -> bytes:
    dims = arr.shape if dims is None else dims
    return b"\x00\x00\x08" + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + arr.tobytes()


def small_clf(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    spec = InputSpec(16, 16, 1, "unit")
    return Classifier(build("small_cnn", 10, spec.shape), spec, 10, "small_cnn")


def clean16(root: Path) -> Path:
    rng = np.random.default_rng(0)
    write_csaw_h5(ImageSet(rng.integers(0, 256, (6, 16, 16, 1), dtype=np.uint8), np.arange(6) % 10, 10),
                  root / "clean.h5")
    return root / "clean.h5"


def clean8(root: Path) -> Path:
    rng = np.random.default_rng(1)
    write_csaw_h5(ImageSet(rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8), np.arange(6) % 3, 3),
                  root / "clean8.h5")
    return root / "clean8.h5"


def keras_config(units: int = 3, shape: list | None = None, conv: dict | None = None,
                 extra_layers: int = 0) -> dict:
    """A Keras-2-dialect functional model: input 8x8x1 → conv 2@3x3 → flatten → dense ``units``."""
    def layer(cls, name, cfg, src):
        return {"class_name": cls, "name": name, "config": {"name": name, **cfg},
                "inbound_nodes": [[[src, 0, 0, {}]]] if src else []}

    layers = [layer("InputLayer", "in", {"batch_input_shape": shape or [None, 8, 8, 1]}, None),
              layer("Conv2D", "conv", {"filters": 2, "kernel_size": [3, 3], "strides": [1, 1],
                                       "padding": "valid", "activation": "relu", "use_bias": True,
                                       **(conv or {})}, "in")]
    prev = "conv"
    for i in range(extra_layers):
        layers.append(layer("Activation", f"act_{i}", {"activation": "linear"}, prev))
        prev = f"act_{i}"
    layers += [layer("Flatten", "flat", {}, prev),
               layer("Dense", "out", {"units": units, "activation": "softmax", "use_bias": True}, "flat")]
    return {"class_name": "Model", "config": {"name": "m", "layers": layers, "input_layers": [["in", 0, 0]],
                                              "output_layers": [["out", 0, 0]]}}


def keras_model_file(path: Path, config: dict | str | None = None,
                     weights: dict[str, list[tuple[str, np.ndarray]]] | None = None) -> Path:
    """A full-model Keras .h5 (``model_config`` + ``model_weights``) for `keras_config`."""
    rng = np.random.default_rng(2)
    if weights is None:
        weights = {"conv": [("kernel", rng.normal(0, .3, (3, 3, 1, 2)).astype(np.float32)),
                            ("bias", np.zeros(2, np.float32))],
                   "out": [("kernel", rng.normal(0, .3, (72, 3)).astype(np.float32)),
                           ("bias", np.zeros(3, np.float32))]}
    config = keras_config() if config is None else config
    with h5py.File(path, "w", libver="latest") as f:  # "latest": attributes above 64 KB
        f.attrs["model_config"] = config if isinstance(config, str) else json.dumps(config)
        f.attrs["keras_version"] = "2.2.4"
        g = f.create_group("model_weights")
        names = ["in", "conv", "flat", "out"]
        g.attrs["layer_names"] = np.array([n.encode() for n in names])
        for n in names:
            lg = g.create_group(n)
            ws = weights.get(n, [])
            lg.attrs["weight_names"] = np.array([f"{n}/{w}:0".encode() for w, _ in ws]) if ws \
                else np.array([], dtype=np.float64)
            for w, a in ws:
                lg.create_dataset(f"{n}/{w}:0", data=a)
    return path


def replace(f: h5py.File, name: str, **kwargs) -> None:
    del f[name]
    f.create_dataset(name, **kwargs)


# -- the hostile cases: name -> (builder(root) -> CLI args, regex the error line must match) --------

CASES: dict[str, tuple[Callable[[Path], list], str | None]] = {}


def case(name: str, match: str | None = None):
    def deco(fn):
        CASES[name] = (fn, match)
        return fn
    return deco


def _csaw(root: Path, **create) -> list:
    with h5py.File(root / "d.h5", "w") as f:
        f.create_dataset("data", **create)
    return ["data", "info", root / "d.h5"]


case("csaw_huge_unwritten", "declares")(
    lambda r: _csaw(r, shape=(10**5, 3, 55, 47), dtype="f8"))
case("csaw_huge_gzip_fill", "declares")(
    lambda r: _csaw(r, shape=(10**6, 3, 55, 47), dtype="u1", chunks=(1, 3, 55, 47), compression="gzip",
                    fillvalue=7))
case("csaw_compound_dtype", "dtype")(
    lambda r: _csaw(r, data=np.zeros((2, 1, 4, 4), dtype=[("a", "u1"), ("b", "f4")])))
case("csaw_string_dtype", "dtype")(lambda r: _csaw(r, data=np.full((2, 1, 4, 4), b"abc")))
case("csaw_complex_dtype", "dtype")(lambda r: _csaw(r, data=np.zeros((2, 1, 4, 4), np.complex64)))
case("csaw_zero_images", "no images")(lambda r: _csaw(r, data=np.zeros((0, 1, 4, 4), np.uint8)))
case("csaw_scalar", "shape|4-D")(lambda r: _csaw(r, data=np.uint8(3)))
case("csaw_zero_height", "0x16 pixels")(lambda r: _csaw(r, data=np.zeros((5, 1, 0, 16), np.uint8)))
case("csaw_zero_width_nhwc", "16x0 pixels")(lambda r: _csaw(r, data=np.zeros((5, 16, 0, 3), np.uint8)))


@case("csaw_label_above_the_largest_class_count", "largest class count")
def _(root):
    args = _csaw(root, data=np.zeros((2, 1, 4, 4), np.uint8))
    with h5py.File(root / "d.h5", "a") as f:
        f["label"] = np.array([0, 5_000_000], np.int64)
    return args


@case("csaw_external_storage", "other files")
def _(root):
    raw = root / "pixels.bin"
    raw.write_bytes(bytes(2 * 16 * 16))
    return _csaw(root, shape=(2, 1, 16, 16), dtype="u1", external=[(str(raw), 0, 2 * 16 * 16)])


@case("csaw_external_storage_beyond", "other files")
def _(root):  # external storage reaching into a file it does not own (here: /dev/zero)
    return _csaw(root, shape=(10**4, 1, 16, 16), dtype="u1", external=[("/dev/zero", 0, 10**4 * 256)])


@case("csaw_virtual_dataset", "other files")
def _(root):
    src = root / "src.h5"
    write_csaw_h5(ImageSet(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int64), 2), src)
    layout = h5py.VirtualLayout(shape=(2, 1, 4, 4), dtype="u1")
    layout[...] = h5py.VirtualSource(str(src), "data", shape=(2, 1, 4, 4))
    with h5py.File(root / "d.h5", "w") as f:
        f.create_virtual_dataset("data", layout)
    return ["data", "info", root / "d.h5"]


@case("csaw_external_link", "external link")
def _(root):
    other = root / "other.h5"
    write_csaw_h5(ImageSet(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int64), 2), other)
    with h5py.File(root / "d.h5", "w") as f:
        f["data"] = h5py.ExternalLink(str(other), "/data")
    return ["data", "info", f"csaw:{root / 'd.h5'}"]


@case("csaw_soft_link", "soft link")
def _(root):
    with h5py.File(root / "d.h5", "w") as f:
        f["pixels"] = np.zeros((2, 1, 4, 4), np.uint8)
        f["data"] = h5py.SoftLink("/pixels")
    return ["data", "info", root / "d.h5"]


@case("csaw_labels_declared_huge", "declares|labels")
def _(root):
    with h5py.File(root / "d.h5", "w") as f:
        f["data"] = np.zeros((2, 1, 4, 4), np.uint8)
        f.create_dataset("label", shape=(10**8,), dtype="i8")
    return ["data", "info", root / "d.h5"]


@case("csaw_truncated", "HDF5|read")
def _(root):
    p = root / "d.h5"
    with h5py.File(p, "w") as f:
        f["data"] = np.random.default_rng(0).integers(0, 256, (64, 1, 16, 16), dtype=np.uint8)
        f["label"] = np.zeros(64, np.int64)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return ["data", "info", f"csaw:{p}"]


@pytest.mark.parametrize("value", [-3, 2.5, "many", 10**9])
def test_csaw_bad_num_classes_attribute(tmp_path, capsys, value):
    p = tmp_path / "d.h5"
    with h5py.File(p, "w") as f:
        f["data"] = np.zeros((2, 1, 4, 4), np.uint8)
        f.attrs["num_classes"] = value
    assert_refused(["data", "info", p], tmp_path, capsys, "num_classes")


def _fifo(root: Path, name: str) -> Path:
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(p)
    return p


def _dev_zero(root: Path, name: str) -> Path:
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.symlink_to("/dev/zero")
    return p


case("csaw_fifo_bare", "FIFO")(lambda r: ["data", "info", _fifo(r, "x.h5")])
case("csaw_fifo_forced", "FIFO")(lambda r: ["data", "info", f"csaw:{_fifo(r, 'x.h5')}"])
case("csaw_dev_zero", "device")(lambda r: ["data", "info", f"csaw:{_dev_zero(r, 'x.h5')}"])


# Keras weights-only files onto --arch small_cnn

def _keras_weights(root: Path, edit: Callable[[h5py.File], None] | None = None) -> list:
    p = save_keras_weights(small_clf(), root / "w.h5")
    if edit is not None:
        with h5py.File(p, "r+") as f:
            edit(f)
    return ["eval", p, "--arch", "small_cnn", "--clean", clean16(root)]


K = "conv_1/conv_1/kernel:0"
KSHAPE = (3, 3, 1, 16)
case("kw_nan", "NaN")(
    lambda r: _keras_weights(r, lambda f: replace(f, K, data=np.full(KSHAPE, np.nan, "f4"))))
case("kw_inf", "NaN or infinite")(
    lambda r: _keras_weights(r, lambda f: replace(f, K, data=np.full(KSHAPE, np.inf, "f8"))))
case("kw_float64_overflow", "float32")(
    lambda r: _keras_weights(r, lambda f: replace(f, K, data=np.full(KSHAPE, 1e300))))
case("kw_int", "dtype")(lambda r: _keras_weights(r, lambda f: replace(f, K, data=np.ones(KSHAPE, "i4"))))
case("kw_complex", "dtype")(lambda r: _keras_weights(r, lambda f: replace(f, K, data=np.ones(KSHAPE, "c8"))))
case("kw_string", "dtype")(lambda r: _keras_weights(r, lambda f: replace(f, K, data=np.full(KSHAPE, b"w"))))
case("kw_compound", "dtype")(lambda r: _keras_weights(
    r, lambda f: replace(f, K, data=np.zeros(KSHAPE, dtype=[("a", "f4"), ("b", "f4")]))))
case("kw_wrong_shape", "conv_1.*shape")(
    lambda r: _keras_weights(r, lambda f: replace(f, K, data=np.zeros((3, 3, 1, 17), "f4"))))
case("kw_huge_unwritten", "declares")(lambda r: _keras_weights(
    r, lambda f: replace(f, "output/output/kernel:0", shape=(64, 10**7), dtype="f4")))
case("kw_huge_gzip_fill", "declares")(lambda r: _keras_weights(
    r, lambda f: replace(f, "output/output/kernel:0", shape=(64, 10**7), dtype="f4", chunks=(64, 1000),
                         compression="gzip")))
case("kw_layer_names_not_a_list", "layer_names")(
    lambda r: _keras_weights(r, lambda f: f.attrs.__setitem__("layer_names", 5)))
case("kw_missing_layer", "conv_2.*no 'conv_2/kernel:0'")(
    lambda r: _keras_weights(r, lambda f: f.__delitem__("conv_2/conv_2/kernel:0")))


@case("kw_external_storage", "other files")
def _(root):
    raw = root / "kernel.bin"
    raw.write_bytes(np.ones(KSHAPE, np.float32).tobytes())
    return _keras_weights(root, lambda f: replace(f, K, shape=KSHAPE, dtype="f4",
                                                  external=[(str(raw), 0, raw.stat().st_size)]))


@case("kw_external_link", "external link")
def _(root):
    other = root / "other.h5"
    with h5py.File(other, "w") as o:
        o["k"] = np.zeros(KSHAPE, np.float32)

    def edit(f):
        del f[K]
        f[K] = h5py.ExternalLink(str(other), "/k")
    return _keras_weights(root, edit)


@case("kw_soft_link_group", "soft link")
def _(root):
    def edit(f):
        f.move("conv_1", "real_conv_1")
        f["conv_1"] = h5py.SoftLink("/real_conv_1")
    return _keras_weights(root, edit)


@case("kw_truncated", "HDF5|read")
def _(root):
    args = _keras_weights(root)
    p = args[1]
    p.write_bytes(p.read_bytes()[:4000])
    return args


case("kw_fifo", "FIFO")(lambda r: ["eval", _fifo(r, "w.h5"), "--arch", "small_cnn", "--clean", clean16(r)])
case("kw_dev_zero", "device")(
    lambda r: ["eval", _dev_zero(r, "w.h5"), "--arch", "small_cnn", "--clean", clean16(r)])
case("kw_num_classes_negative", "class count")(lambda r: _keras_weights(r) + ["--num-classes", "-1"])
case("kw_num_classes_huge", "class count")(lambda r: _keras_weights(r) + ["--num-classes", str(2**31)])


# Keras full-model files (model_config + model_weights)

def _keras_model(root: Path, config: dict | str | None = None, weights=None) -> list:
    return ["eval", keras_model_file(root / "m.h5", config, weights), "--clean", clean8(root)]


def _lambda_config() -> dict:
    c = keras_config()
    c["config"]["layers"][1].update(class_name="Lambda")
    return c


def _custom_module_config() -> dict:
    c = keras_config()
    c["config"]["layers"][1]["module"] = "evil.layers"
    return c


case("km_lambda", "not supported")(lambda r: _keras_model(r, _lambda_config()))
case("km_custom_module", "not supported")(lambda r: _keras_model(r, _custom_module_config()))
case("km_dense_units_2_31", "parameters")(lambda r: _keras_model(r, keras_config(units=2**31)))
case("km_filters_huge", "parameters")(lambda r: _keras_model(r, keras_config(conv={"filters": 10**9})))
case("km_input_huge", "input layer")(lambda r: _keras_model(r, keras_config(shape=[None, 10**6, 10**6, 1])))
case("km_input_negative", "input layer")(lambda r: _keras_model(r, keras_config(shape=[None, -8, 8, 1])))
case("km_too_many_layers", "layers")(lambda r: _keras_model(r, keras_config(extra_layers=5000)))
case("km_not_json", "JSON")(lambda r: _keras_model(r, "{not json"))
case("km_deep_json", "JSON|malformed")(lambda r: _keras_model(r, "[" * 20_000 + "]" * 20_000))
case("km_nan_weights", "NaN")(lambda r: _keras_model(r, weights={
    "conv": [("kernel", np.full((3, 3, 1, 2), np.nan, np.float32)), ("bias", np.zeros(2, np.float32))],
    "out": [("kernel", np.zeros((72, 3), np.float32)), ("bias", np.zeros(3, np.float32))]}))
case("km_weights_missing", "no weights")(lambda r: _keras_model(r, weights={
    "out": [("kernel", np.zeros((72, 3), np.float32)), ("bias", np.zeros(3, np.float32))]}))
case("km_weight_shape", "shape")(lambda r: _keras_model(r, weights={
    "conv": [("kernel", np.zeros((3, 3, 1, 2), np.float32)), ("bias", np.zeros(2, np.float32))],
    "out": [("kernel", np.zeros((72, 4), np.float32)), ("bias", np.zeros(3, np.float32))]}))


# safetensors + JSON sidecar

def _native(root: Path, sidecar: Callable[[dict], None] | None = None,
            state: Callable[[dict], None] | None = None) -> list:
    p = save_model(small_clf(), root / "tiny.safetensors")
    side = p.with_suffix(".json")
    if sidecar is not None:
        meta = json.loads(side.read_text())
        sidecar(meta)
        side.write_text(json.dumps(meta))
    if state is not None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(p))
        state(tensors)
        save_file(tensors, str(p))
    return ["eval", p, "--clean", clean16(root)]


W = "stages.conv_1.weight"
case("st_nan", "NaN")(lambda r: _native(r, state=lambda s: s[W].fill_(float("nan"))))
case("st_int", "dtype")(lambda r: _native(r, state=lambda s: s.__setitem__(W, s[W].to(torch.int32))))
case("st_shape", "do not fit")(
    lambda r: _native(r, state=lambda s: s.__setitem__(W, torch.zeros(17, 1, 3, 3))))
case("st_extra_tensor", "do not fit")(
    lambda r: _native(r, state=lambda s: s.__setitem__("evil", torch.zeros(3))))
for _value in (-1, 0, 10.5, "10", 2**31, None, True):
    case(f"st_num_classes_{_value}", "num_classes")(
        lambda r, v=_value: _native(r, sidecar=lambda m: m.__setitem__("num_classes", v)))
case("st_input_huge", "height")(lambda r: _native(r, sidecar=lambda m: m["input_spec"].update(height=10**6)))
case("st_input_fraction", "width")(lambda r: _native(r, sidecar=lambda m: m["input_spec"].update(width=15.5)))
case("st_mean_length", "mean")(lambda r: _native(r, sidecar=lambda m: m["input_spec"].update(mean=[.5, .5])))
case("st_std_zero", "std")(lambda r: _native(r, sidecar=lambda m: m["input_spec"].update(std=[0.0])))
case("st_arch_options", "unknown option")(
    lambda r: _native(r, sidecar=lambda m: m.__setitem__("arch_options", {"width": 10**9})))
case("st_arch_not_a_name", "arch")(lambda r: _native(r, sidecar=lambda m: m.__setitem__("arch", 5)))
case("st_arch_option_unknown", "unknown architecture 'bogus'")(lambda r: [*_native(r), "--arch", "bogus"])
case("st_spec_not_a_dict", "input spec")(
    lambda r: _native(r, sidecar=lambda m: m.__setitem__("input_spec", 7)))


@case("st_sidecar_deep_json", "JSON")
def _(root):
    args = _native(root)
    args[1].with_suffix(".json").write_text("[" * 100_000 + "]" * 100_000)
    return args


@case("st_sidecar_fifo", "FIFO")
def _(root):
    args = _native(root)
    args[1].with_suffix(".json").unlink()
    _fifo(root, "tiny.json")
    return args


@case("st_weights_fifo", "FIFO")
def _(root):
    args = _native(root)
    args[1].unlink()
    _fifo(root, "tiny.safetensors")
    return args


@case("st_weights_dev_zero", "device")
def _(root):
    args = _native(root)
    args[1].unlink()
    _dev_zero(root, "tiny.safetensors")
    return args


@case("st_header_lies", "corrupt safetensors|do not fit")
def _(root):
    args = _native(root)
    head = json.dumps({W: {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}).encode()
    args[1].write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 64)
    return args


@case("st_keras_graph_options_units_2_31", "parameters")
def _(root):
    from backdoorlab.models.keras_graph import KerasGraph, parse_keras_config

    options = parse_keras_config(keras_config())
    clf = Classifier(KerasGraph(options), InputSpec(8, 8, 1), 3, "keras_graph", options)
    p = save_model(clf, root / "g.safetensors")
    meta = json.loads(p.with_suffix(".json").read_text())
    next(n for n in meta["arch_options"]["nodes"] if n["name"] == "out")["config"]["units"] = 2**31
    p.with_suffix(".json").write_text(json.dumps(meta))
    return ["eval", p, "--clean", clean8(root)]


@case("st_keras_graph_options_lambda", "not supported|not a valid layer")
def _(root):
    from backdoorlab.models.keras_graph import KerasGraph, parse_keras_config

    options = parse_keras_config(keras_config())
    clf = Classifier(KerasGraph(options), InputSpec(8, 8, 1), 3, "keras_graph", options)
    p = save_model(clf, root / "g.safetensors")
    meta = json.loads(p.with_suffix(".json").read_text())
    next(n for n in meta["arch_options"]["nodes"] if n["name"] == "conv")["class"] = "Lambda"
    p.with_suffix(".json").write_text(json.dumps(meta))
    return ["eval", p, "--clean", clean8(root)]


# GTSRB, official and Kaggle layouts

def _ppm(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    path.write_bytes(b"P6\n8 8\n255\n" + img.tobytes())
    return path


def _official(root: Path, filename: str) -> list:
    d = root / "GTSRB" / "Final_Training" / "Images" / "00000"
    _ppm(d / "00000_00000.ppm")
    _ppm(root / "secret.ppm", 1)  # a readable image outside the data folder
    (d / "GT-00000.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
                                    "00000_00000.ppm;8;8;0;0;7;7;0\n"
                                    f"{filename};8;8;0;0;7;7;0\n")
    return ["data", "info", root / "GTSRB", "--split", "train"]


def _kaggle(root: Path, path: str) -> list:
    d = root / "kaggle"
    _ppm(d / "Train" / "0" / "a.ppm")
    _ppm(root / "secret.ppm", 1)
    (d / "Train.csv").write_text("Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path\n"
                                 "8,8,0,0,7,7,0,Train/0/a.ppm\n"
                                 f"8,8,0,0,7,7,0,{path}\n")
    return ["data", "info", d, "--split", "train"]


case("gtsrb_official_dotdot", r"line 3.*outside")(lambda r: _official(r, "../../../../secret.ppm"))
case("gtsrb_official_absolute", r"line 3.*outside")(lambda r: _official(r, str(r / "secret.ppm")))
case("gtsrb_kaggle_dotdot", r"Train.csv: line 3.*outside")(lambda r: _kaggle(r, "../secret.ppm"))
case("gtsrb_kaggle_absolute", r"Train.csv: line 3.*outside")(lambda r: _kaggle(r, str(r / "secret.ppm")))


@case("gtsrb_symlink_out", "outside")
def _(root):
    args = _kaggle(root, "Train/0/link.ppm")
    (root / "kaggle" / "Train" / "0" / "link.ppm").symlink_to(root / "secret.ppm")
    return args


@case("gtsrb_image_fifo", "FIFO")
def _(root):
    args = _kaggle(root, "Train/0/b.ppm")
    _fifo(root, "kaggle/Train/0/b.ppm")
    return args


@case("gtsrb_no_rows", "lists no images")
def _(root):
    (root / "k").mkdir()
    (root / "k" / "Train.csv").write_text("Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path\n")
    return ["data", "info", root / "k", "--split", "train"]


# image folders and single images

def _folder(root: Path, bad_name: str, bad: Callable[[Path], object], classes: bool = True) -> list:
    d = root / "imgs"
    sub = d / "cat" if classes else d
    sub.mkdir(parents=True)
    write_png(sub / "good.png", np.zeros((8, 8, 3), np.uint8))
    bad(sub / bad_name)
    return ["data", "info", d]


case("folder_fifo", "FIFO")(lambda r: _folder(r, "x.png", os.mkfifo))
case("loose_fifo", "FIFO")(lambda r: _folder(r, "x.png", os.mkfifo, classes=False))
case("folder_dev_zero", "device")(lambda r: _folder(r, "z.png", lambda p: p.symlink_to("/dev/zero")))
case("loose_dev_zero", "device")(lambda r: _folder(r, "z.png", lambda p: p.symlink_to("/dev/zero"), False))
case("single_fifo_forced", "FIFO")(lambda r: ["data", "info", f"images:{_fifo(r, 'x.png')}"])
case("single_fifo_bare", "FIFO")(lambda r: ["data", "info", _fifo(r, "x.png")])
case("single_dev_zero", "device")(lambda r: ["data", "info", f"images:{_dev_zero(r, 'x.png')}"])
case("folder_bomb_png", "bomb|pixels")(
    lambda r: _folder(r, "b.png", lambda p: p.write_bytes(png_header(10**5, 10**5))))
case("folder_bomb_pillow_warns", "bomb|pixels")(
    lambda r: _folder(r, "b.png", lambda p: p.write_bytes(png_header(10_000, 10_000))))
case("folder_over_pixel_bound", "pixels")(
    lambda r: _folder(r, "b.png", lambda p: p.write_bytes(png_header(9000, 9000))))
case("folder_pnm_over_pixel_bound", "pixels")(
    lambda r: _folder(r, "b.ppm", lambda p: p.write_bytes(b"P6\n9000 9000\n255\n" + b"\0" * 16)))
case("folder_truncated_png", "decodable")(lambda r: _folder(
    r, "t.png", lambda p: p.write_bytes((write_png(p, np.full((64, 64, 3), 7, np.uint8)).read_bytes())[:60])))
case("folder_garbage_png", "decodable")(
    lambda r: _folder(r, "g.png", lambda p: p.write_bytes(b"GIF89a junk")))


case("size_huge", "image size")(lambda r: ["data", "info", "digits", "--size", "100000"])
case("size_huge_folder", "image size")(lambda r: _folder(r, "y.png", lambda p: None) + ["--size", str(10**6)])


@case("folder_zero_images", "no image files")
def _(root):
    (root / "imgs" / "cat").mkdir(parents=True)
    (root / "imgs" / "dog" / "deeper").mkdir(parents=True)
    return ["data", "info", f"folder:{root / 'imgs'}"]


# CIFAR-10 batches (pickles)

class _Reduce:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def _cifar(root: Path, batch: object, raw: bytes | None = None) -> list:
    d = root / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(raw if raw is not None else pickle.dumps(batch, protocol=2))
    return ["data", "info", d, "--split", "test"]


def _ok_data(n: int = 2) -> np.ndarray:
    return np.zeros((n, 3072), np.uint8)


case("cifar_os_system", "refused")(
    lambda r: _cifar(r, {b"data": _ok_data(), b"labels": _Reduce(os.system, f"touch {r}/pwned")}))
case("cifar_eval", "refused")(lambda r: _cifar(r, _Reduce(eval, "__import__('os').getcwd()")))
case("cifar_float_data", "uint8")(lambda r: _cifar(r, {b"data": np.zeros((2, 3072)), b"labels": [0, 1]}))
case("cifar_zero_images", "no images")(lambda r: _cifar(r, {b"data": _ok_data(0), b"labels": []}))
case("cifar_truncated", "pickle")(
    lambda r: _cifar(r, None, pickle.dumps({b"data": _ok_data(), b"labels": [0, 1]}, protocol=2)[:50]))


@case("cifar_reconstruct_huge", "larger than the pickle")
def _(root):
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _cifar(root, {b"data": _Reduce(lambda *a: None, None), b"labels": [0]}, pickle.dumps(
        {b"data": _Call(_reconstruct, (np.ndarray, (10**7, 3072), b"b")), b"labels": [0]}, protocol=2))


class _Call:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@case("cifar_shared_labels_bomb", "labels")
def _(root):
    level = [0] * 10
    for _ in range(8):  # 10^9 labels after expansion, a few hundred bytes as a pickle
        level = [level] * 10
    return _cifar(root, {b"data": _ok_data(10), b"labels": level})


# MNIST idx files

def _mnist(root: Path, images: bytes, labels: bytes, gz: bool = False) -> list:
    d = root / "mnist"
    d.mkdir()
    sfx = ".gz" if gz else ""
    (d / f"train-images-idx3-ubyte{sfx}").write_bytes(gzip.compress(images) if gz else images)
    (d / f"train-labels-idx1-ubyte{sfx}").write_bytes(gzip.compress(labels) if gz else labels)
    return ["data", "info", d, "--split", "train"]


_X, _Y = np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8)
case("mnist_lying_count", "promises")(
    lambda r: _mnist(r, idx(_X, (10**6, 28, 28)), idx(_Y, (10**6,))))
case("mnist_lying_count_gz", "promises")(
    lambda r: _mnist(r, idx(_X, (10**6, 28, 28)), idx(_Y, (10**6,)), gz=True))
case("mnist_max_count", "more than")(
    lambda r: _mnist(r, idx(_X, (2**32 - 1, 28, 28)), idx(_Y, (2**32 - 1,)), gz=True))
case("mnist_gz_bomb", "promises")(  # the header says 3 images, the stream inflates to 20 MB
    lambda r: _mnist(r, idx(_X) + b"\0" * (20 << 20), idx(_Y), gz=True))
case("mnist_zero_images", "no images")(
    lambda r: _mnist(r, idx(np.zeros((0, 28, 28), np.uint8)), idx(np.zeros(0, np.uint8))))
case("mnist_bad_type", "type")(lambda r: _mnist(r, b"\x00\x00\x0d\x03" + idx(_X)[4:], idx(_Y)))


@case("mnist_truncated_gz", "cannot read|promises")
def _(root):
    args = _mnist(root, idx(_X), idx(_Y), gz=True)
    p = root / "mnist" / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-12])
    return args


@case("mnist_fifo", "FIFO")
def _(root):
    d = root / "m"
    d.mkdir()
    (d / "train-labels-idx1-ubyte").write_bytes(idx(_Y))
    return ["data", "info", f"mnist:{_fifo(d, 'train-images-idx3-ubyte')}"]


# image triggers (poison: the output file must not appear)

def _poison(root: Path, spec: str) -> list:
    return ["poison", clean16(root), "--trigger", spec, "--all", "--out", root / "out.h5"]


def _trigger_file(root: Path, data: bytes) -> Path:
    p = root / "trig.png"
    p.write_bytes(data)
    return p


case("trigger_bomb", "bomb|pixels")(
    lambda r: _poison(r, f"image:{_trigger_file(r, png_header(10**5, 10**5))}"))
case("trigger_pillow_warns", "bomb|pixels")(
    lambda r: _poison(r, f"image:{_trigger_file(r, png_header(10_000, 10_000))}"))
case("trigger_over_pixel_bound", "pixels")(
    lambda r: _poison(r, f"image:{_trigger_file(r, png_header(9000, 9000))}"))
case("trigger_truncated", "readable image")(
    lambda r: _poison(r, f"image:{_trigger_file(r, png_header(4, 4)[:30])}"))
case("trigger_fifo", "FIFO")(lambda r: _poison(r, f"image:{_fifo(r, 't.png')}"))
case("trigger_dev_zero", "device")(lambda r: _poison(r, f"image:{_dev_zero(r, 't.png')}"))
case("trigger_scale_bomb", "pixels")(lambda r: _poison(
    r, f"image:{write_png(r / 's.png', np.zeros((8, 8, 3), np.uint8))},scale=100000"))
case("trigger_blend_bomb", "bomb|pixels")(
    lambda r: _poison(r, f"blend:{_trigger_file(r, png_header(10**5, 10**5))}"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_file_is_refused(name, tmp_path, capsys):
    build_case, match = CASES[name]
    args = build_case(tmp_path)
    assert_refused(args, tmp_path, capsys, match)
    assert not (tmp_path / "pwned").exists()


def test_good_files_pass(tmp_path, capsys):
    """The unmutated files behind the cases above are accepted (so each case fails for its reason)."""
    for args in (_keras_weights(tmp_path), _keras_model(tmp_path), _native(tmp_path),
                 _poison(tmp_path, f"image:{write_png(tmp_path / 'ok.png', np.zeros((3, 3, 3), np.uint8))}")):
        assert run_cli(args, tmp_path) == 0, capsys.readouterr().err
    for args in (_official(tmp_path / "o", "00000_00000.ppm"), _kaggle(tmp_path / "k", "Train/0/a.ppm"),
                 _cifar(tmp_path, {b"data": _ok_data(), b"labels": [0, 1]}),
                 _mnist(tmp_path, idx(_X), idx(_Y), gz=True),
                 _folder(tmp_path, "y.png", lambda p: write_png(p, np.ones((8, 8, 3), np.uint8)))):
        assert run_cli(args, tmp_path) == 0, capsys.readouterr().err


# -- memory: a tiny file that declares a huge array is refused before it is allocated -------------

def _peak_while(fn: Callable[[], object]) -> int:
    fn()  # warm up: imports and caches are not the file's doing
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["contiguous", "gzip_fill"])
def test_memory_tiny_csaw_file_declaring_gigabytes(tmp_path, kind):
    p = tmp_path / "d.h5"
    extra = {"chunks": (1, 3, 55, 47), "compression": "gzip"} if kind == "gzip_fill" else {}
    with h5py.File(p, "w") as f:
        f.create_dataset("data", shape=(10**5, 3, 55, 47), dtype="f8", **extra)  # 6.2 GB declared
        f.create_dataset("label", shape=(10**5,), dtype="f8", **({"chunks": (1000,)} if extra else {}))
    size = p.stat().st_size
    assert size < 64 << 10

    def read():
        with pytest.raises(BadInput, match="declares"):
            load_dataset(str(p))
    assert _peak_while(read) < 2 * size + (1 << 20)


def test_memory_tiny_keras_file_declaring_gigabytes(tmp_path):
    p = save_keras_weights(small_clf(), tmp_path / "w.h5")
    with h5py.File(p, "r+") as f:
        replace(f, "output/output/kernel:0", shape=(64, 10**7), dtype="f4")  # 2.6 GB declared
    size = p.stat().st_size

    def read():
        with pytest.raises(BadInput, match="declares"):
            load_keras(p, arch="small_cnn")
    assert _peak_while(read) < 2 * size + (1 << 20)


# -- property-based fuzzing of the readers ---------------------------------------------------------

DTYPES = ["u1", "i2", "i8", "f2", "f4", "f8", "c8", "?", "S3", [("a", "u1"), ("b", "f4")]]
DIMS = st.one_of(st.integers(0, 5), st.sampled_from([1, 3, 55, 10**6]))


def _array(dtype, shape) -> np.ndarray:
    a = np.zeros(shape, dtype=np.dtype(dtype) if not isinstance(dtype, list) else dtype)
    if a.dtype.kind in "iuf" and a.size:
        a.flat[:: max(1, a.size // 7)] = 3
    return a


def _outcome(fn: Callable[[], object]) -> None:
    """Either ``fn()`` succeeds or it raises BadInput; anything else is a bug."""
    try:
        fn()
    except BadInput as e:
        assert "\n" not in str(e)


@FUZZ
@given(data_shape=st.lists(DIMS, min_size=0, max_size=5), data_dtype=st.sampled_from(DTYPES),
       written=st.booleans(), gzip_=st.booleans(),
       label_len=st.one_of(st.none(), st.integers(0, 8)), label_dtype=st.sampled_from(DTYPES),
       num_classes=st.one_of(st.none(), st.integers(-3, 2000), st.floats(allow_nan=True),
                             # HDF5 itself cannot store a string attribute with a NUL in it
                             st.text(st.characters(blacklist_characters="\x00"), max_size=3)),
       cut=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_fuzz_csaw_reader(tmp_path, data_shape, data_dtype, written, gzip_, label_len, label_dtype,
                          num_classes, cut):
    p = tmp_path / "fuzz.h5"
    shape = tuple(data_shape)
    with h5py.File(p, "w") as f:
        opts = {"compression": "gzip"} if gzip_ and shape and 0 not in shape else {}
        big = np.prod(shape, dtype=np.float64) > 10**6
        try:
            if written and not big:
                f.create_dataset("data", data=_array(data_dtype, shape), **opts)
            else:
                f.create_dataset("data", shape=shape, dtype=np.dtype(data_dtype), **opts)
        except (ValueError, TypeError):  # a shape HDF5 itself cannot create
            reject()
        if label_len is not None:
            f.create_dataset("label", data=_array(label_dtype, (label_len,)))
        if num_classes is not None:
            f.attrs["num_classes"] = num_classes
    if cut is not None:
        p.write_bytes(p.read_bytes()[: int(p.stat().st_size * cut)])
    _outcome(lambda: load_dataset(f"csaw:{p}"))


@FUZZ
@given(layer=st.sampled_from(["conv_1", "conv_2", "fc_1", "output"]),
       what=st.sampled_from(["kernel", "bias"]), shape=st.lists(DIMS, min_size=0, max_size=4),
       dtype=st.sampled_from(DTYPES), written=st.booleans(),
       value=st.sampled_from([0.5, np.nan, np.inf, 1e300]),
       layer_names=st.one_of(st.none(), st.just(5),
                             st.lists(st.sampled_from(["conv_1", "x", ""]), max_size=3)),
       cut=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_fuzz_keras_weights_reader(tmp_path, layer, what, shape, dtype, written, value, layer_names, cut):
    p = save_keras_weights(small_clf(), tmp_path / "w.h5")
    name, shape = f"{layer}/{layer}/{what}:0", tuple(shape)
    with h5py.File(p, "r+") as f:
        del f[name]
        try:
            if written and np.prod(shape, dtype=np.float64) <= 10**6:
                a = _array(dtype, shape)
                if a.dtype.kind == "f" and a.size:
                    with np.errstate(over="ignore"):
                        a.flat[0] = value
                f.create_dataset(name, data=a)
            else:
                f.create_dataset(name, shape=shape, dtype=np.dtype(dtype))
        except (ValueError, TypeError):  # a shape HDF5 itself cannot create
            reject()
        if layer_names is not None:
            f.attrs["layer_names"] = np.array([n.encode() for n in layer_names]) \
                if isinstance(layer_names, list) else layer_names
    if cut is not None:
        p.write_bytes(p.read_bytes()[: int(p.stat().st_size * cut)])
    _outcome(lambda: load_keras(p, arch="small_cnn"))


_VALUES = st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=True), st.text(max_size=4), st.none(),
                    st.lists(st.integers(-3, 9), max_size=5), st.booleans())


@FUZZ
@given(layer=st.integers(0, 3),
       key=st.sampled_from(["filters", "kernel_size", "strides", "units", "activation", "padding",
                            "batch_input_shape", "use_bias", "name", "class_name", "inbound_nodes"]),
       value=_VALUES)
def test_fuzz_keras_model_config(tmp_path, layer, key, value):
    config = keras_config()
    entry = config["config"]["layers"][layer]
    (entry if key in ("class_name", "inbound_nodes") else entry["config"])[key] = value
    p = keras_model_file(tmp_path / "m.h5", config)
    _outcome(lambda: load_keras(p))


@FUZZ
@given(magic=st.sampled_from([b"\x00\x00", b"\x00\x01", b"PK"]), kind=st.sampled_from([8, 9, 13]),
       ndim=st.integers(0, 4), dims=st.lists(st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 3, 28]),
                                             min_size=0, max_size=4),
       body=st.integers(0, 3 * 784 + 5), gz=st.booleans(), cut=st.one_of(st.none(), st.integers(0, 40)),
       labels=st.integers(0, 5))
def test_fuzz_mnist_idx(tmp_path, magic, kind, ndim, dims, body, gz, cut, labels):
    head = magic + bytes([kind, ndim]) + b"".join(struct.pack(">I", d) for d in dims)
    images = head + bytes(body)
    if cut is not None:
        images = images[: max(0, len(images) - cut)]
    d = tmp_path / "mn"
    d.mkdir(exist_ok=True)
    sfx = ".gz" if gz else ""
    (d / f"train-images-idx3-ubyte{sfx}").write_bytes(gzip.compress(images) if gz else images)
    (d / f"train-labels-idx1-ubyte{sfx}").write_bytes(idx(np.zeros(labels, np.uint8)))
    _outcome(lambda: load_dataset(str(d), split="train"))
    for f in d.iterdir():
        f.unlink()
