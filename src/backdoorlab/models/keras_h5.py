"""Keras HDF5 import (no TensorFlow): weights-only files onto a known architecture.

Keras stores conv kernels as HWIO and dense kernels as (in, out); torch wants OIHW and
(out, in). Because our flatten layers follow Keras' (H, W, C) order, no other permutation is
needed. HDF5 content is read as arrays with h5py; nothing is executed or unpickled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from backdoorlab.errors import BadInput
from backdoorlab.models import architectures
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.spec import InputSpec

DEFAULT_SHAPES = {"deepid": (55, 47, 3), "gtsrb_cnn": (32, 32, 3), "small_cnn": (16, 16, 1)}


def _open(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise BadInput(f"{path}: not a readable HDF5 file ({e})") from None


def _attr_str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def read_keras_weights(path: Path) -> dict[str, list[np.ndarray]]:
    """Layer name → its weight arrays in Keras order (e.g. [kernel, bias])."""
    f = _open(path)
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise BadInput(f"{path}: not a Keras HDF5 weights file (no 'layer_names' attribute)")
        out: dict[str, list[np.ndarray]] = {}
        try:
            for lname in (_attr_str(n) for n in root.attrs["layer_names"]):
                g = root[lname]
                names = [_attr_str(n) for n in g.attrs.get("weight_names", [])]
                out[lname] = [np.asarray(g[n][()]) for n in names]
        except (KeyError, OSError, ValueError) as e:
            raise BadInput(f"{path}: corrupt Keras weights ({e})") from None
    return out


def load_keras(path: Path, arch: str | None = None, num_classes: int | None = None,
               input_shape: tuple[int, int, int] | None = None,
               input_scale: str | None = None) -> Classifier:
    """Import a Keras .h5: with ``arch`` the weights go onto that architecture; without it the
    file must be a full-model file (``model_config``) and the graph is rebuilt from its config."""
    path = Path(path)
    if arch is None:
        f = _open(path)
        with f:
            has_config = "model_config" in f.attrs
        if not has_config:
            raise BadInput(f"{path}: a Keras weights-only file; name its architecture with "
                           f"--arch (known: {', '.join(sorted(architectures.ARCHITECTURES))})")
        from backdoorlab.models.keras_graph import load_keras_model

        return load_keras_model(path, input_scale=input_scale)
    weights = read_keras_weights(path)
    arch = architectures.canonical(arch)
    if arch not in architectures.ARCHITECTURES:
        architectures.build(arch, 1, (1, 1, 1))  # raises BadInput listing the known names
    if num_classes is None:
        last = [w for w in weights.values() if w]
        if not last:
            raise BadInput(f"{path}: holds no weights")
        num_classes = int(last[-1][-1].shape[-1])
    shape = input_shape or DEFAULT_SHAPES.get(arch)
    if shape is None:
        raise BadInput(f"architecture {arch!r}: give the input shape for a Keras weights file")
    net = architectures.build(arch, num_classes, shape)
    load_weights_into(net, weights, path)
    spec = InputSpec(*shape, scale=input_scale or "unit")
    prov = {"source": str(path), "source_format": "keras-h5-weights"}
    return Classifier(net, spec, num_classes, arch, {}, prov)


def load_weights_into(net: torch.nn.Module, weights: dict[str, list[np.ndarray]], path: Path) -> None:
    """Copy Keras layer weights onto the modules of ``net`` with the same short names."""
    modules = {full.split(".")[-1]: m for full, m in net.named_modules() if full}
    expected = {n for n, m in modules.items() if any(True for _ in m.parameters(recurse=False))}
    given = {n for n, w in weights.items() if w}
    missing, unknown = expected - given, given - expected
    if unknown:
        raise BadInput(f"{path}: layer(s) {', '.join(sorted(unknown))} have no counterpart in the "
                       f"architecture (its layers: {', '.join(sorted(expected))})")
    if missing:
        raise BadInput(f"{path}: no weights for layer(s) {', '.join(sorted(missing))}")
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
        param.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))

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
