"""Evaluation: clean accuracy, attack success rate, per-class accuracy, input-scale choice.

Clean accuracy (CA) = share of clean inputs classified as their true label.
Attack success rate (ASR) = share of poisoned inputs classified as the attack's target label.
Which poisoned inputs count depends on the file's label convention (true labels, or labels that
are the attack target as in the CSAW files): see `backdoorlab.poisoned`; the rule is reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput
from backdoorlab.models.classifier import Classifier


@dataclass
class EvalResult:
    """Figures in [0, 1]; ``asr`` and friends are None when no poisoned data was given."""

    clean_accuracy: float
    clean_count: int
    asr: float | None = None
    poisoned_count: int | None = None
    target: int | None = None
    asr_rule: str | None = None
    per_class_accuracy: list[float] | None = None
    input_scale: str = ""
    notes: list[str] = field(default_factory=list)
    poisoned_sets: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def check_compatible(clf: Classifier, data: ImageSet, role: str = "data") -> None:
    """Refuse data whose image shape or labels do not fit the model."""
    clf.spec.check(data.images, f"{role} {data.name!r}")
    if data.labels is not None and len(data.labels) and data.labels.max() >= clf.num_classes:
        raise BadInput(f"{role} {data.name!r}: label {int(data.labels.max())} is out of range for "
                       f"a model with {clf.num_classes} classes")


def accuracy(clf: Classifier, data: ImageSet, batch_size: int = 256) -> float:
    """Clean accuracy of ``clf`` on labeled ``data`` (share in [0, 1])."""
    y = data.require_labels()
    if len(y) == 0:
        raise BadInput(f"{data.name!r}: no images")
    return float((clf.predict(data.images, batch_size) == y).mean())


def per_image_success_rate(clf: Classifier, poisoned: ImageSet, targets: np.ndarray,
                           batch_size: int = 256) -> tuple[float, int, str]:
    """ASR with one target per image (e.g. all-to-all attacks): (rate, inputs counted, rule)."""
    keep = np.ones(len(poisoned), bool) if poisoned.labels is None else poisoned.labels != targets
    if not keep.any():
        raise BadInput(f"{poisoned.name!r}: no poisoned inputs left to measure the ASR on")
    pred = clf.predict(poisoned.images[keep], batch_size)
    rule = "per-image targets; inputs whose true label equals their target are excluded"
    return float((pred == targets[keep]).mean()), int(keep.sum()), rule


def choose_input_scale(clf: Classifier, clean: ImageSet, sample: int = 2000,
                       seed: int = 0) -> tuple[Classifier, dict[str, float]]:
    """Try ``raw`` and ``unit`` on (a seeded sample of) clean data; keep the more accurate one."""
    part = clean.take(sample, seed)
    scores = {s: accuracy(clf.with_scale(s), part) for s in ("unit", "raw")}
    best = max(scores, key=lambda s: scores[s])
    return clf.with_scale(best), scores


def evaluate(clf: Classifier, clean: ImageSet, poisoned=None, target: int | list[int] | None = None,
             per_class: bool = False, batch_size: int = 256,
             poisoned_labels: str = "auto") -> EvalResult:
    """Clean accuracy and, with poisoned data (one set or a list), one ASR per set.

    ``target``: one per set (or None: per-image targets, the labels under the CSAW convention,
    else the most frequent prediction); ``poisoned_labels``: ``auto``, ``true`` or ``target``
    (see `backdoorlab.poisoned`). ``asr`` and friends describe the first set; ``poisoned_sets``
    holds every set's figures."""
    from backdoorlab.poisoned import as_list, poisoned_sets

    check_compatible(clf, clean, "clean data")
    for ps in as_list(poisoned):
        if isinstance(ps, ImageSet):
            check_compatible(clf, ps, "poisoned data")
    sets = poisoned_sets(poisoned, target, poisoned_labels, clf=clf)
    pred = clf.predict(clean.images, batch_size)
    y = clean.require_labels()
    res = EvalResult(clean_accuracy=float((pred == y).mean()), clean_count=len(y),
                     input_scale=clf.spec.scale)
    if per_class:
        res.per_class_accuracy = [
            float((pred[y == c] == c).mean()) if np.any(y == c) else float("nan")
            for c in range(clf.num_classes)
        ]
    for i, ps in enumerate(sets):
        asr = ps.success_rate(clf, batch_size)
        res.poisoned_sets.append({**ps.describe(), "asr": asr, "notes": ps.notes})
        if i == 0:
            res.asr, res.poisoned_count, res.target, res.asr_rule = asr, len(ps), ps.target, ps.rule
            res.notes += ps.notes
    return res
