"""Model files: ``NAME.safetensors`` (weights) + ``NAME.json`` (sidecar: architecture, classes,
input spec, provenance). Keras HDF5 files are imported by `keras_h5`. Nothing is ever unpickled.

Loading treats both files as hostile: only regular files are read, the sidecar's sizes are bounded,
and the safetensors header must match the architecture before the network is built for real.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from backdoorlab.errors import BadInput
from backdoorlab.io import atomic_path
from backdoorlab.models import architectures
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.spec import InputSpec
from backdoorlab.safe_read import MAX_CLASSES, MAX_TEXT_BYTES, check_int, read_bytes, require_regular_file

SIDECAR_FORMAT = "backdoorlab-model"
SIDECAR_VERSION = 1


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def save_model(clf: Classifier, path: str | os.PathLike) -> Path:
    """Write ``clf`` to ``path`` (.safetensors) and its JSON sidecar; returns the weights path."""
    from safetensors.torch import save_file

    weights, sidecar = _paths(path)
    state = {k: v.detach().contiguous().cpu() for k, v in clf.net.state_dict().items()}
    meta = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "arch": clf.arch,
        "arch_options": clf.arch_options,
        "num_classes": clf.num_classes,
        "input_spec": clf.spec.to_dict(),
        "provenance": clf.provenance,
        "weights": weights.name,
    }
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    with atomic_path(sidecar) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return weights


def load_model(path: str | os.PathLike, *, arch: str | None = None, input_scale: str | None = None,
               num_classes: int | None = None,
               input_shape: tuple[int, int, int] | None = None) -> Classifier:
    """Load a model file: native (.safetensors + .json) or Keras HDF5 (.h5).

    ``input_scale`` (``raw``/``unit``) overrides the stored scale; ``auto`` is resolved by the
    caller against data (see `backdoorlab.evaluation.choose_input_scale`). ``arch`` is required for
    Keras weights-only files (e.g. ``deepid``).
    """
    p = Path(path)
    if arch is not None and architectures.canonical(str(arch)) not in architectures.ARCHITECTURES:
        raise BadInput(f"unknown architecture {arch!r} (known: {architectures.known_text()})")
    if not p.exists():
        raise BadInput(f"{p}: no such model file")
    if p.suffix.lower() in (".h5", ".hdf5", ".keras"):
        from backdoorlab.models.keras_h5 import load_keras

        clf = load_keras(p, arch=arch, num_classes=num_classes, input_shape=input_shape,
                         input_scale=input_scale if input_scale in ("raw", "unit") else None)
    else:
        clf = _load_native(p)
    if input_scale in ("raw", "unit") and clf.spec.scale != input_scale:
        clf = clf.with_scale(input_scale)
    _probe(clf, p)
    return clf


def _probe(clf: Classifier, p: Path) -> None:
    """One image through the network: a file whose network cannot take the input it declares
    (layout, channels, size) is refused here, not in the middle of a job."""
    import numpy as np

    try:
        out = clf.logits(np.zeros((1, *clf.spec.shape), np.uint8))
    except RuntimeError as e:
        first = (str(e).splitlines() or ["error"])[0]
        raise BadInput(f"{p}: the network does not run on its declared input "
                       f"{'x'.join(map(str, clf.spec.shape))} ({first})") from None
    if out.shape != (1, clf.num_classes):
        raise BadInput(f"{p}: the network gives {out.shape[1]} outputs, its file declares "
                       f"{clf.num_classes} classes")


def _load_native(p: Path) -> Classifier:
    """Sidecar checked, network probed on the meta device against the safetensors header (names,
    shapes, dtypes), and only then built and filled: a file that does not fit is refused before any
    real allocation, and every float tensor must be finite."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    weights, sidecar = _paths(p)
    if not sidecar.exists():
        raise BadInput(f"{p}: missing sidecar {sidecar.name} (architecture and input spec)")
    if not weights.exists():
        raise BadInput(f"{p}: missing weights file {weights.name}")
    try:
        meta = json.loads(read_bytes(sidecar, MAX_TEXT_BYTES, "model sidecar"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadInput(f"{sidecar}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise BadInput(f"{sidecar}: not a backdoorlab model sidecar")
    for key in ("arch", "num_classes", "input_spec"):
        if key not in meta:
            raise BadInput(f"{sidecar}: missing key {key!r}")
    arch, options, prov = meta["arch"], meta.get("arch_options") or {}, meta.get("provenance") or {}
    if not isinstance(arch, str) or not isinstance(options, dict) or not isinstance(prov, dict):
        raise BadInput(f"{sidecar}: 'arch' must be a name, 'arch_options' and 'provenance' objects")
    num_classes = check_int(meta["num_classes"], f"{sidecar}: num_classes", 1, MAX_CLASSES)
    spec = InputSpec.from_dict(meta["input_spec"], str(sidecar))
    require_regular_file(weights, "weights file")
    try:
        with torch.device("meta"):
            probe = build_net(arch, num_classes, spec.shape, options)
    except BadInput as e:
        raise BadInput(f"{sidecar}: {e}") from None
    architectures.check_size(probe, f"{sidecar}: architecture {arch!r}")
    try:
        with safe_open(str(weights), "pt") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInput(f"{weights}: corrupt safetensors file ({e})") from None
    _check_header(probe.state_dict(), header, weights, arch)
    net = build_net(arch, num_classes, spec.shape, options)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInput(f"{weights}: corrupt safetensors file ({e})") from None
    for k, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BadInput(f"{weights}: tensor {k!r} contains NaN or infinite values")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        raise BadInput(f"{weights}: weights do not fit architecture {arch!r} ({first})") from None
    return Classifier(net, spec, num_classes, arch, options, prov)


_FLOATS = ("F16", "BF16", "F32", "F64")
_ST_DTYPES = {torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}


def _check_header(expected: dict, header: dict, weights: Path, arch: str) -> None:
    """Compare a state dict's names/shapes/dtypes with a safetensors header (name -> (shape, dtype))."""
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:5])}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected[:5])}"] if unexpected else [])
        raise BadInput(f"{weights}: weights do not fit architecture {arch!r} ({'; '.join(parts)})")
    for k, t in expected.items():
        shape, dtype = header[k]
        if shape != tuple(t.shape):
            raise BadInput(f"{weights}: weights do not fit architecture {arch!r} (tensor {k!r} has shape "
                           f"{shape}, expected {tuple(t.shape)})")
        want = _FLOATS if t.is_floating_point() else (_ST_DTYPES.get(t.dtype, str(t.dtype)),)
        if dtype not in want:
            raise BadInput(f"{weights}: tensor {k!r} has dtype {dtype}, expected {' or '.join(want)}")


# Builders for architectures whose structure is described by options (Keras graphs, GoodNets…)
# register themselves here: name -> builder(num_classes, input_shape, options) -> nn.Module.
SPECIAL_BUILDERS: dict = {}


def build_net(arch: str, num_classes: int, input_shape: tuple[int, int, int],
              options: dict) -> torch.nn.Module:
    if arch not in SPECIAL_BUILDERS and arch in LAZY_BUILDERS:
        import importlib

        importlib.import_module(LAZY_BUILDERS[arch])  # registers its builder
    if arch in SPECIAL_BUILDERS:
        return SPECIAL_BUILDERS[arch](num_classes, input_shape, options)
    return architectures.build(arch, num_classes, input_shape, **options)


# networks whose builder lives beside the code that makes them (imported on first load)
LAZY_BUILDERS = {"keras_graph": "backdoorlab.models.keras_h5", "goodnet": "backdoorlab.defenses.goodnet",
                 "nc_filter": "backdoorlab.defenses.nc_mitigation"}
