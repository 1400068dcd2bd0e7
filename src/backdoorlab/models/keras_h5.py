"""Keras HDF5 import and export (no TensorFlow).

Import: weights-only files onto a known architecture (``arch``), or full-model files
(``model_config``) rebuilt as a `KerasGraph` (see `keras_graph`). Export: `save_keras_weights` writes
a Keras-2.2.4-style weights-only file (the layout of the CSAW-HackML-2020 files) that Keras 2 and 3
``model.load_weights`` read.

Keras stores conv kernels as HWIO and dense kernels as (in, out); torch wants OIHW and
(out, in). Because our flatten layers follow Keras' (H, W, C) order, no other permutation is
needed. HDF5 content is read as arrays with h5py; nothing is executed or unpickled. Files are
untrusted: datasets are checked from the header (float dtype, data stored inside the file, no
links to other files) and their shapes matched to the network before any weight is read, and every
weight must be finite (see `backdoorlab.safe_read`).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backdoorlab.errors import BadInput
from backdoorlab.io import h5_bytes, write_bytes
from backdoorlab.models import architectures
from backdoorlab.models import keras_graph as _keras_graph  # registers the "keras_graph" builder
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.layers import KerasFlatten
from backdoorlab.models.spec import InputSpec
from backdoorlab.safe_read import (
    MAX_CLASSES,
    MAX_ELEMENTS,
    check_int,
    check_weight,
    h5_dataset,
    h5_get,
    h5_read,
    require_regular_file,
)

MAX_LAYERS = 100_000  # names in one layer_names / weight_names attribute
DEFAULT_SHAPES = {"deepid": (55, 47, 3), "gtsrb_cnn": (32, 32, 3), "small_cnn": (16, 16, 1)}


def _open(path: Path):
    import h5py

    require_regular_file(path, "model file")
    try:
        return h5py.File(path, "r")
    except Exception as e:  # OSError mostly; h5py raises others for some corrupt superblocks
        if zipfile.is_zipfile(path):
            raise BadInput(f"{path}: a Keras 3 '.keras' zip archive, not HDF5; re-save it in Keras with "
                           f"model.save('model.h5')") from None
        raise BadInput(f"{path}: not a readable HDF5 file ({e})") from None


def _attr_str(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _names(attrs, key: str, where: str) -> list[str] | None:
    """A list-of-names attribute (``layer_names``, ``weight_names``); None when absent."""
    try:
        v = attrs.get(key)
    except Exception as e:
        raise BadInput(f"{where}: unreadable attribute {key!r} ({type(e).__name__}: {e})") from None
    if v is None:
        return None
    a = np.asarray(v)
    if a.size == 0:  # Keras writes an empty float array for a layer without weights
        return []
    if a.ndim != 1 or a.size > MAX_LAYERS or not all(isinstance(n, bytes | str) for n in a.tolist()):
        raise BadInput(f"{where}: attribute {key!r} must list at most {MAX_LAYERS} names, got "
                       f"{a.dtype} {a.shape}")
    return [_attr_str(n) for n in a.tolist()]


def read_keras_weights(path: Path, check=None) -> dict[str, list[np.ndarray]]:
    """Layer name → its weight arrays in Keras order (e.g. [kernel, bias]).

    Every weight dataset is checked from the HDF5 header first (`safe_read.h5_dataset`: a float
    array stored inside the file, no links to elsewhere); ``check`` (layer → list of shapes), when
    given, may refuse the file before any array is read. Each array must hold finite floats."""
    f = _open(path)
    with f:
        root = h5_get(f, "model_weights", str(path)) if "model_weights" in f else f
        layer_names = _names(root.attrs, "layer_names", str(path))
        if layer_names is None:
            raise BadInput(f"{path}: not a Keras HDF5 weights file (no 'layer_names' attribute)")
        sets: dict[str, list] = {}
        for lname in layer_names:
            where = f"{path}: layer {lname!r}"
            g = h5_get(root, lname, where)
            sets[lname] = [h5_dataset(g, n, where, kinds="f", max_bytes=8 * MAX_ELEMENTS)
                           for n in _names(g.attrs, "weight_names", where) or []]
            for ds in sets[lname]:
                if ds.size > MAX_ELEMENTS:
                    raise BadInput(f"{where}: weight {ds.name!r} declares {ds.size:,} values (at most "
                                   f"{MAX_ELEMENTS:,} are accepted)")
        if check is not None:
            check({lname: [tuple(ds.shape) for ds in dsets] for lname, dsets in sets.items()})
        return {lname: [check_weight(h5_read(ds, str(path)), f"{path}: layer {lname!r} weight {ds.name!r}")
                        for ds in dsets] for lname, dsets in sets.items()}


def load_keras(path: Path, arch: str | None = None, num_classes: int | None = None,
               input_shape: tuple[int, int, int] | None = None,
               input_scale: str | None = None) -> Classifier:
    """Import a Keras .h5: with ``arch`` the weights go onto that architecture; without it the
    file must be a full-model file (``model_config``) and the graph is rebuilt from its config.

    The weight shapes in the file's header are matched against the architecture (built on the meta
    device, so nothing is allocated) before any weight is read or the network is built."""
    path = Path(path)
    if arch is None:
        f = _open(path)
        with f:
            has_config = "model_config" in f.attrs
            weights = "layer_names" in f.attrs or "model_weights" in f
            data_keys = sorted(k for k in f.keys() if k in ("data", "label", "x_data", "y_data"))
        if not has_config and not weights and data_keys:
            raise BadInput(f"{path}: a data file (datasets {', '.join(data_keys)}), not a model: "
                           "give a model file here and the data with --clean / --valid / --data")
        if not has_config:
            raise BadInput(f"{path}: a Keras weights-only file; name its architecture with "
                           f"--arch (known: {architectures.known_text()})")
        from backdoorlab.models.keras_graph import load_keras_model

        return load_keras_model(path, input_scale=input_scale)
    arch = architectures.canonical(arch)
    if arch not in architectures.ARCHITECTURES:
        architectures.build(arch, 1, (1, 1, 1))  # raises BadInput listing the known names
    shape = input_shape or DEFAULT_SHAPES.get(arch)
    if shape is None:
        raise BadInput(f"architecture {arch!r}: give the input shape for a Keras weights file")
    classes: list[int] = []

    def check(shapes: dict[str, list[tuple[int, ...]]]) -> None:
        n = num_classes
        if n is None:
            last = [s for s in shapes.values() if s]
            if not last:
                raise BadInput(f"{path}: holds no weights")
            n = last[-1][-1][-1] if last[-1][-1] else 0
        n = check_int(n, f"{path}: class count", 1, MAX_CLASSES)
        try:
            with torch.device("meta"):
                probe = architectures.build(arch, n, shape)
        except BadInput as e:
            raise BadInput(f"{path}: {e}") from None
        check_keras_shapes(_short_modules(probe), shapes, path)
        classes.append(n)

    weights = read_keras_weights(path, check)
    net = architectures.build(arch, classes[0], shape)
    load_weights_into(net, weights, path)
    spec = InputSpec(*shape, scale=input_scale or "unit")
    prov = {"source": str(path), "source_format": "keras-h5-weights"}
    return Classifier(net, spec, classes[0], arch, {}, prov)


def _short_modules(net: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules by short name (the last part of the dotted path), as Keras files name layers."""
    return {full.split(".")[-1]: m for full, m in net.named_modules() if full}


def keras_arrays(m: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(Keras weight name, Keras shape) of the arrays a file holds for module ``m``, in file order."""
    if isinstance(m, torch.nn.Conv2d):
        o, i, kh, kw = m.weight.shape
        return [("kernel", (kh, kw, i, o))] + ([("bias", (o,))] if m.bias is not None else [])
    if isinstance(m, torch.nn.Linear):
        o, i = m.weight.shape
        return [("kernel", (i, o))] + ([("bias", (o,))] if m.bias is not None else [])
    if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
        c = (m.num_features,)
        names = [w for w, on in (("gamma", getattr(m, "scale", True)), ("beta", getattr(m, "center", True)))
                 if on] + ["moving_mean", "moving_variance"]
        return [(w, c) for w in names]
    return []


def check_keras_shapes(modules: dict[str, torch.nn.Module], shapes: dict[str, list[tuple[int, ...]]],
                       path: Path) -> None:
    """Match the weight shapes of a file's header (layer → shapes) with ``modules`` (layer → module):
    every layer with weights present, none unknown, no extra arrays, each shape as expected."""
    expected = {n for n, m in modules.items() if any(True for _ in m.parameters(recurse=False))}
    given = {n for n, s in shapes.items() if s}
    missing, unknown = expected - given, given - expected
    if unknown:
        raise BadInput(f"{path}: layer(s) {', '.join(sorted(unknown))} have no counterpart in the "
                       f"architecture (its layers: {', '.join(sorted(expected))})")
    if missing:
        raise BadInput(f"{path}: no weights for layer(s) {', '.join(sorted(missing))}")
    for name in sorted(given):
        want = keras_arrays(modules[name])
        if want and len(shapes[name]) > len(want):
            raise BadInput(f"{path}: layer {name!r} holds {len(shapes[name])} arrays, the architecture "
                           f"expects {len(want)} ({', '.join(w for w, _ in want)})")
        for got, (what, shape) in zip(shapes[name], want, strict=False):
            if got != shape:
                raise BadInput(f"{path}: layer {name!r} {what} has shape {got}, the architecture "
                               f"expects {shape}")


def load_weights_into(net: torch.nn.Module, weights: dict[str, list[np.ndarray]], path: Path) -> None:
    """Copy Keras layer weights onto the modules of ``net`` with the same short names."""
    modules = _short_modules(net)
    check_keras_shapes(modules, {n: [a.shape for a in w] for n, w in weights.items()}, path)
    with torch.no_grad():
        for name, arrays in weights.items():
            if not arrays:
                continue
            assign_keras_layer(modules[name], name, arrays, path)


def assign_keras_layer(m: torch.nn.Module, name: str, arrays: list[np.ndarray], path: Path) -> None:
    """Copy one Keras layer's arrays (kernel, bias / BN gamma, beta, mean, var) onto ``m``."""
    def put(param: torch.Tensor, value: np.ndarray, what: str) -> None:
        if tuple(param.shape) != tuple(value.shape):
            raise BadInput(f"{path}: layer {name!r} {what} has shape {tuple(value.shape)}, the "
                           f"architecture expects {tuple(param.shape)}")
        with np.errstate(over="ignore"):
            v = np.ascontiguousarray(value, dtype=np.float32)
        if not np.isfinite(v).all():  # finite float64 beyond float32's range
            raise BadInput(f"{path}: layer {name!r} {what} holds values beyond the float32 range")
        param.copy_(torch.from_numpy(v))

    with torch.no_grad():
        if isinstance(m, torch.nn.Conv2d):
            k = arrays[0]
            if k.ndim != 4:
                raise BadInput(f"{path}: layer {name!r} kernel should be 4-D, got {k.shape}")
            put(m.weight, k.transpose(3, 2, 0, 1), "kernel")
            if m.bias is not None and len(arrays) > 1:
                put(m.bias, arrays[1], "bias")
        elif isinstance(m, torch.nn.Linear):
            k = arrays[0]
            if k.ndim != 2:
                raise BadInput(f"{path}: layer {name!r} kernel should be 2-D, got {k.shape}")
            put(m.weight, k.T, "kernel")
            if m.bias is not None and len(arrays) > 1:
                put(m.bias, arrays[1], "bias")
        elif isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            if len(arrays) != 4:
                raise BadInput(f"{path}: batch-norm layer {name!r} needs 4 arrays, got {len(arrays)}")
            put(m.weight, arrays[0], "gamma")
            put(m.bias, arrays[1], "beta")
            put(m.running_mean, arrays[2], "moving_mean")
            put(m.running_var, arrays[3], "moving_variance")
        else:
            raise BadInput(f"{path}: cannot load weights into layer {name!r} "
                           f"({type(m).__name__})")


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
KERAS_VERSION = "2.2.4"
KERAS_BACKEND = "tensorflow"
# DeepID's Keras layers in the order of the CSAW-HackML-2020 files (parameter-free layers included)
DEEPID_KERAS_LAYERS = ("input", "conv_1", "pool_1", "conv_2", "pool_2", "conv_3", "pool_3", "conv_4",
                       "flatten_1", "flatten_2", "fc_1", "fc_2", "add_1", "activation_1", "output")


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().float().numpy())


def _module_weights(m: nn.Module, name: str) -> list[tuple[str, np.ndarray]]:
    """Keras (weight name, array) pairs of one torch module (Conv2d → HWIO kernel, Linear → (in, out))."""
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or tuple(m.dilation) != (1, 1):
            raise BadInput(f"cannot export layer {name!r}: grouped or dilated convolution")
        out = [("kernel", _np(m.weight.permute(2, 3, 1, 0)))]
        return out + ([("bias", _np(m.bias))] if m.bias is not None else [])
    if isinstance(m, nn.Linear):
        out = [("kernel", _np(m.weight.t()))]
        return out + ([("bias", _np(m.bias))] if m.bias is not None else [])
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        out = []
        if m.affine and getattr(m, "scale", True):
            out.append(("gamma", _np(m.weight)))
        if m.affine and getattr(m, "center", True):
            out.append(("beta", _np(m.bias)))
        if m.running_mean is None or m.running_var is None:
            raise BadInput(f"cannot export layer {name!r}: batch norm without running statistics")
        return out + [("moving_mean", _np(m.running_mean)), ("moving_variance", _np(m.running_var))]
    if any(True for _ in m.parameters()):
        raise BadInput(f"cannot export layer {name!r} ({type(m).__name__}) to Keras: no single Keras "
                       f"layer holds its weights")
    return []


def keras_layers(clf: Classifier) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """The Keras layers of ``clf`` in file order: (layer name, [(weight name, array), ...]).

    Supported: Keras graphs (their own layer order), DeepID (the CSAW file order, with the
    parameter-free layers) and staged networks whose stages are single conv / dense / batch-norm or
    parameter-free layers (e.g. small_cnn). Anything else is refused with BadInput."""
    net = clf.net
    if isinstance(net, _keras_graph.KerasGraph):
        names = [n["name"] for n in net.options["nodes"] if not n.get("synthetic")]
        layers = [(n, _module_weights(net.module(n), n)) for n in names]
    elif clf.arch == "deepid":
        modules = {full.split(".")[-1]: m for full, m in net.named_modules() if full}
        layers = [(n, _module_weights(modules[n], n) if n in modules else []) for n in DEEPID_KERAS_LAYERS]
    elif hasattr(net, "stages") and hasattr(net, "stage_names"):
        layers = [(n, _module_weights(net.stages[n], n)) for n in net.stage_names]
    else:
        raise BadInput(f"cannot export architecture {clf.arch!r} to Keras: its layers have no Keras names")
    if any(isinstance(m, nn.Flatten) and not isinstance(m, KerasFlatten) for m in net.modules()):
        raise BadInput(f"cannot export architecture {clf.arch!r} to Keras: it flattens in torch's (C, H, W) "
                       f"order, Keras in (H, W, C)")
    covered = sum(a.size for _, ws in layers for w, a in ws if not w.startswith("moving_"))
    total = sum(p.numel() for p in net.parameters())  # a torch-pruned weight counts as its weight_orig
    if covered != total:
        raise BadInput(f"cannot export architecture {clf.arch!r} to Keras: {total - covered:,} of its "
                       f"{total:,} parameters belong to no Keras layer")
    for name, _ in layers:
        if "/" in name or not name:
            raise BadInput(f"cannot export layer {name!r}: a Keras layer name cannot contain '/'")
    return layers


def save_keras_weights(clf: Classifier, path: str | os.PathLike) -> Path:
    """Write ``clf``'s weights as a Keras-2.2.4-style weights-only HDF5 file (atomically).

    Layout as in the CSAW-HackML-2020 files: root attributes ``layer_names``, ``backend``,
    ``keras_version``; one group per layer with attribute ``weight_names`` and datasets
    ``<layer>/<layer>/kernel:0``, ``bias:0`` (conv kernels HWIO, dense kernels (in, out); batch norm
    ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``). Keras 2 and Keras 3
    ``model.load_weights`` read it (Keras 3: the name must end in ``.h5`` but not ``.weights.h5``).
    Returns the path written."""
    import h5py

    path = Path(path)
    layers = keras_layers(clf)
    ascii_str = h5py.string_dtype("ascii")

    def fill(f) -> None:
        f.attrs["layer_names"] = np.array([n.encode("utf-8") for n, _ in layers])
        f.attrs.create("backend", KERAS_BACKEND, dtype=ascii_str)
        f.attrs.create("keras_version", KERAS_VERSION, dtype=ascii_str)
        for name, weights in layers:
            g = f.create_group(name)
            if not weights:
                g.attrs["weight_names"] = np.array([], dtype=np.float64)
                continue
            names = [f"{name}/{w}:0" for w, _ in weights]
            g.attrs["weight_names"] = np.array([n.encode("utf-8") for n in names])
            for wname, (_, arr) in zip(names, weights, strict=True):
                g.create_dataset(wname, data=arr.astype(np.float32))

    write_bytes(path, h5_bytes(fill))  # built in memory: a full disk fails the plain write only
    return path
