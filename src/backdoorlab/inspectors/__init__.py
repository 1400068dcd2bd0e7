"""The data-inspector family: (a labelled training set that may be poisoned, a model trained on
it) → one suspicion score per sample and the flagged samples (those to remove before retraining).

An inspector is ``run(clf, train, opts) -> Inspection`` registered with
`backdoorlab.registry.register(..., family="data-inspector", needs=("training-set",))` in its own
module of this package. `inspect` runs one and, when the poisoned rows are known (``truth``),
adds the precision and recall of the flagged samples. `features` gives the learned
representation the inspectors work on (by default the input of the network's output layer).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from backdoorlab.errors import BadInput

if TYPE_CHECKING:
    from backdoorlab.data.imageset import ImageSet
    from backdoorlab.models.classifier import Classifier


@dataclass
class Inspection:
    """``scores``: float (N,), larger = more suspicious; ``flagged``: sorted row indices judged
    poisoned; ``per_class``: label → what the method found in that class (e.g. the outlier share)."""

    scores: np.ndarray = field(repr=False)
    flagged: np.ndarray
    statistic: str
    per_class: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)


@dataclass
class InspectResult:
    method: str
    options: dict
    inspection: Inspection
    n: int
    precision: float | None   # flagged rows that are poisoned (None: truth unknown or none flagged)
    recall: float | None      # poisoned rows that are flagged (None: truth unknown or empty)
    seconds: float
    passes: int
    n_poisoned: int | None = None  # rows of the truth (None: unknown)

    def to_dict(self) -> dict[str, Any]:
        ins = self.inspection
        return {"kind": "inspect", "method": self.method, "options": self.options, "n": self.n,
                "flagged": ins.flagged.tolist(), "n_flagged": int(len(ins.flagged)),
                "statistic": ins.statistic, "per_class": {str(k): v for k, v in ins.per_class.items()},
                "details": ins.details, "precision": self.precision, "recall": self.recall,
                "n_poisoned": self.n_poisoned,
                "cost": {"seconds": self.seconds, "image_passes": self.passes}}


def precision_recall(flagged: np.ndarray, truth: np.ndarray) -> tuple[float | None, float | None]:
    """Precision and recall of ``flagged`` row indices against the poisoned ``truth`` rows.
    Undefined figures are None: precision when nothing is flagged, recall when nothing is poisoned
    (a 0 there would read as a failure of the method)."""
    f, t = set(np.asarray(flagged).tolist()), set(np.asarray(truth).tolist())
    hit = len(f & t)
    return (hit / len(f) if f else None), (hit / len(t) if t else None)


def check_truth(truth: Any, n: int, where: str = "truth") -> np.ndarray:
    """Poisoned row indices as a sorted, duplicate-free int64 array; `BadInput` unless they are
    whole numbers in 0..n-1 (indices of another data set would give meaningless figures)."""
    t = np.asarray(truth)
    if t.ndim != 1:
        raise BadInput(f"{where}: expected a flat list of row indices, got an array of shape {t.shape}")
    if t.size and t.dtype.kind not in "iu":
        if t.dtype.kind != "f" or not np.all(np.isfinite(t)) or not np.all(t == np.round(t)):
            raise BadInput(f"{where}: row indices must be whole numbers")
    t = t.astype(np.int64)
    if t.size and (t.min() < 0 or t.max() >= n):
        bad = int(t.min()) if t.min() < 0 else int(t.max())
        raise BadInput(f"{where}: row index {bad} is out of range for a training set of {n:,} rows")
    return np.unique(t)


def inspect(name: str, clf: Classifier, train: ImageSet, options: Any = None,
            truth: np.ndarray | None = None) -> InspectResult:
    """Run data inspector ``name``; ``truth`` (poisoned row indices, if known) only scores it."""
    from backdoorlab import cost, registry
    from backdoorlab.evaluation import check_compatible
    from backdoorlab.options import from_mapping

    method = registry.get(name, "data-inspector")
    if options is None:
        options = method.options()
    elif isinstance(options, dict):
        options = from_mapping(method.options, options, f"inspect {name}")
    elif not (is_dataclass(options) and isinstance(options, method.options)):
        raise BadInput(f"inspect {name}: options must be a dict or {name}'s Options, got "
                       f"{type(options).__name__}")
    train.require_labels()
    if len(train) == 0:
        raise BadInput(f"inspect {name}: the training set is empty")
    check_compatible(clf, train, "training set")
    if truth is not None:
        truth = check_truth(truth, len(train))
    t0 = time.perf_counter()
    with cost.counting() as passes:
        ins = method.run(clf, train, options)
    ins.scores = np.asarray(ins.scores, dtype=np.float64)
    ins.flagged = np.unique(np.asarray(ins.flagged, dtype=np.int64))
    if ins.scores.shape != (len(train),):
        raise ValueError(f"{name}: {ins.scores.shape} scores for {len(train)} samples")
    p = r = None
    if truth is not None:
        p, r = precision_recall(ins.flagged, truth)
    return InspectResult(name, asdict(options), ins, len(train), p, r,
                         round(time.perf_counter() - t0, 2), passes.images,
                         None if truth is None else int(len(truth)))


# -- the learned representation -------------------------------------------------------------------

def head_layer(clf: Classifier) -> str:
    """Name of the network's output layer: the last dense layer with one output per class (its
    input is the penultimate, last-hidden-layer representation)."""
    from torch import nn

    last = None
    for full, m in clf.net.named_modules():
        if isinstance(m, nn.Linear) and m.out_features == clf.num_classes:
            last = full
    if last is None:
        raise BadInput(f"architecture {clf.arch!r}: no dense output layer with {clf.num_classes} "
                       "outputs found; name the layer whose output to use with --layer")
    keras = getattr(clf.net, "keys", None)
    if isinstance(keras, dict):  # an imported Keras graph: its layers go by their Keras names
        by_key = {f"stages.{k}": name for name, k in keras.items()}
        return by_key.get(last, last)
    return last.split(".")[-1] if last.startswith("stages.") else last


def features(clf: Classifier, data: ImageSet, layer: str | None = None,
             batch_size: int = 256) -> tuple[np.ndarray, str]:
    """((N, D) float32 representation of every image, where it was taken). ``layer`` None: the
    input of the output layer (`head_layer`) — the penultimate activations; else the output of
    ``layer``, flattened. One forward pass per image, in batches, eval mode, on ``clf.device``
    inside ``clf.autocast()``; the representation is returned as a host array."""
    import torch

    if layer is None:
        name = head_layer(clf)
        module, where, take_input = clf.layer(name), f"input of {name!r} (penultimate)", True
    else:
        module, where, take_input = clf.layer(layer), f"output of {layer!r}", False
    clf.spec.check(data.images, f"training set {data.name!r}")
    captured: list[torch.Tensor] = []
    if take_input:
        handle = module.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    else:
        handle = module.register_forward_hook(lambda m, a, o: captured.append(o.detach()))
    out: np.ndarray | None = None
    clf.net.eval()
    try:
        with torch.inference_mode(), clf.autocast():
            for i in range(0, len(data), batch_size):
                captured.clear()
                clf.net(clf.to_tensor(data.images[i:i + batch_size]))
                if not captured:
                    raise BadInput(f"{where}: the layer was not run by the network's forward pass")
                a = captured[-1].float().reshape(len(captured[-1]), -1).cpu().numpy()
                if out is None:
                    if a.shape[1] * len(data) > 500_000_000:
                        raise BadInput(f"{where}: {a.shape[1]:,} values per image are too many to "
                                       "keep for the whole set; pick a smaller layer")
                    out = np.empty((len(data), a.shape[1]), dtype=np.float32)
                out[i:i + len(a)] = a
    finally:
        handle.remove()
    assert out is not None
    return out, where


def class_rows(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Label → the row indices holding it (labels present only, ascending)."""
    order = np.argsort(labels, kind="stable")
    values, starts = np.unique(labels[order], return_index=True)
    return {int(v): order[s:e] for v, s, e in zip(values, starts, [*starts[1:], len(order)], strict=True)}
