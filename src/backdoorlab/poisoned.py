"""Poisoned test sets: which inputs count for the attack success rate, and with which target.

Poisoned files come in two label conventions, and reading one as the other silently gives a
wrong ASR (or none at all):

* ``true`` — ``label`` holds each image's *true* class (files backdoorlab writes, which also carry
  a per-image ``target``). Inputs whose true label equals their target are left out: the model
  would answer the target without any backdoor.
* ``target`` — ``label`` holds the *attack's target* for every image (the CSAW-HackML-2020
  organisers' generator writes ``label = target_label`` and their ``eval.py`` scores
  ``mean(prediction == label)``). Every input counts.

``auto`` (the default) decides per file: per-image targets → ``true``; no labels → every input
counts; all labels equal to one value (the given target, or any one value when no target is
given) → ``target``; otherwise ``true``. ASR = share of the counted inputs classified as their
target, in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput

if TYPE_CHECKING:
    from backdoorlab.models.classifier import Classifier

LABEL_RULES = ("auto", "true", "target")
RULES = {
    "target": "labels are the attack target (CSAW convention): every input counts",
    "true": "labels are true labels: inputs whose true label is their target are excluded",
    "none": "no labels: every input counts",
}


@dataclass
class PoisonedSet:
    """The poisoned inputs that count for the ASR (``images``) and each one's attack ``targets``.

    ``total`` is the size of the file; ``convention`` one of ``true``, ``target``, ``none``;
    ``rule`` the sentence printed and written to results.json."""

    name: str
    images: np.ndarray
    targets: np.ndarray
    total: int
    convention: str
    notes: list[str] = field(default_factory=list)
    true_labels: np.ndarray | None = None  # the counted inputs' true classes (``true`` convention)

    @property
    def rule(self) -> str:
        return RULES[self.convention]

    @property
    def target(self) -> int | None:
        """The one target every counted input shares, or None (per-image targets differ)."""
        t = self.targets
        return int(t[0]) if len(t) and np.all(t == t[0]) else None

    def __len__(self) -> int:
        return len(self.images)

    def success_rate(self, clf: Classifier, batch_size: int = 256) -> float:
        """ASR of ``clf``: share of counted inputs classified as their target."""
        return self.rate_from(clf.predict(self.images, batch_size))

    def rate_from(self, predictions: np.ndarray) -> float:
        return float((np.asarray(predictions) == self.targets).mean())

    def robust_from(self, predictions: np.ndarray) -> float | None:
        """Robust accuracy (BackdoorBench): share of counted inputs classified as their *true*
        label; None when the file does not hold true labels (CSAW files label every input with
        the target)."""
        if self.true_labels is None:
            return None
        return float((np.asarray(predictions) == self.true_labels).mean())

    def describe(self) -> dict:
        """What results.json records about this set (no figures)."""
        return {"name": self.name, "target": self.target, "counted": len(self), "total": self.total,
                "convention": self.convention, "rule": self.rule}


def label_convention(data: ImageSet, target: int | None = None) -> str:
    """The convention ``auto`` picks for ``data`` (``true``, ``target`` or ``none``)."""
    if "targets" in data.meta:
        return "true"
    if data.labels is None:
        return "none"
    y = data.labels
    if len(y) and np.all(y == y[0]) and (target is None or int(y[0]) == target):
        return "target"
    return "true"


def poisoned_set(data: ImageSet | PoisonedSet, target: int | None = None, labels: str = "auto",
                 clf: Classifier | None = None, num_classes: int | None = None) -> PoisonedSet:
    """Resolve ``data`` into the inputs that count and their targets.

    ``target`` overrides per-image targets; without it the targets come from the file (per-image
    ``target``, or the labels under the ``target`` convention), else from the most frequent
    prediction of ``clf`` (noted). ``labels`` is ``auto``, ``true`` or ``target`` (see the module).
    """
    if isinstance(data, PoisonedSet):
        return data
    if labels not in LABEL_RULES:
        raise BadInput(f"poisoned labels must be one of {', '.join(LABEL_RULES)}, got {labels!r}")
    n_cls = num_classes or (clf.num_classes if clf is not None else data.num_classes)
    if target is not None and not 0 <= target < n_cls:
        raise BadInput(f"{data.name!r}: target label {target} out of range for {n_cls} classes")
    if len(data) == 0:
        raise BadInput(f"{data.name!r}: no images")
    convention = label_convention(data, target) if labels == "auto" else labels
    if convention == "target" and data.labels is None:
        raise BadInput(f"{data.name!r}: --poisoned-labels target, but the file has no labels")
    notes: list[str] = []
    if convention == "true" and data.labels is None:
        convention = "none"
    if target is not None:
        if convention == "target" and np.any(data.labels != target):
            raise BadInput(f"{data.name!r}: labels are read as the attack target, but they are not all "
                           f"{target} (give --poisoned-labels true, or the right --target)")
        targets = np.full(len(data), target, dtype=np.int64)
    elif convention == "target":
        targets = data.labels.astype(np.int64)
    elif "targets" in data.meta:
        targets = np.asarray(data.meta["targets"], dtype=np.int64).reshape(-1)
        notes.append("targets read per image from the poisoned file")
    elif clf is not None:
        guess = int(np.bincount(clf.predict(data.images), minlength=clf.num_classes).argmax())
        targets = np.full(len(data), guess, dtype=np.int64)
        notes.append(f"target not given: took the most frequent prediction, {guess}")
    else:
        raise BadInput(f"{data.name!r}: give the attack's target (the file has no per-image targets)")
    if targets.shape != (len(data),) or targets.min() < 0 or targets.max() >= n_cls:
        raise BadInput(f"{data.name!r}: attack targets must be one label in 0..{n_cls - 1} per image")
    keep = data.labels != targets if convention == "true" else np.ones(len(data), bool)
    if not keep.any():
        raise BadInput(f"{data.name!r}: no poisoned inputs left to measure the ASR on (every true "
                       "label equals the target; if the labels are the attack target, give "
                       "--poisoned-labels target)")
    truth = data.labels[keep].astype(np.int64) if convention == "true" else None
    return PoisonedSet(data.name, data.images[keep], targets[keep], len(data), convention, notes, truth)


def as_list(x) -> list:
    """None -> [], a list -> itself, one item -> [item]."""
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def poisoned_sets(datas: list[ImageSet] | ImageSet | PoisonedSet | list | None,
                  targets: list[int] | int | None = None, labels: str = "auto",
                  clf: Classifier | None = None, num_classes: int | None = None) -> list[PoisonedSet]:
    """`poisoned_set` for several sets; ``targets`` is none, or one per set in the same order."""
    datas, targets = as_list(datas), as_list(targets)
    if targets and len(targets) != len(datas):
        raise BadInput(f"{len(datas)} poisoned sets need {len(datas)} --target labels (one per set, in "
                       f"the same order), got {len(targets)}")
    tg = list(targets) or [None] * len(datas)
    sets = [poisoned_set(d, t, labels, clf, num_classes) for d, t in zip(datas, tg, strict=True)]
    names = [s.name for s in sets]
    for i, s in enumerate(sets):  # names key the per-set figures: keep them unique
        if names.count(s.name) > 1:
            s.name = f"{s.name}#{i + 1}"
    return sets
