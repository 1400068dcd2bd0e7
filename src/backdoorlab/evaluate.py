"""Evaluation: clean accuracy, attack success rate, per-class accuracy, input-scale choice.

Clean accuracy (CA) = share of clean inputs classified as their true label.
Attack success rate (ASR) = share of poisoned inputs classified as the attack's target label.
When the poisoned set carries true labels, inputs whose true label *is* the target are left out
(they would count as successes without any backdoor); the rule applied is reported.
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


def attack_success_rate(clf: Classifier, poisoned: ImageSet, target: int,
                        batch_size: int = 256) -> tuple[float, int, str]:
    """ASR of ``clf`` on ``poisoned`` for ``target``: (rate, inputs counted, rule applied)."""
    if not 0 <= target < clf.num_classes:
        raise BadInput(f"target label {target} out of range for {clf.num_classes} classes")
    x = poisoned.images
    if poisoned.labels is not None:
        keep = poisoned.labels != target
        rule = "poisoned inputs whose true label is the target are excluded"
        x = x[keep]
    else:
        rule = "poisoned set has no true labels: every input counts"
    if len(x) == 0:
        raise BadInput(f"{poisoned.name!r}: no poisoned inputs left to measure the ASR on")
    pred = clf.predict(x, batch_size)
    return float((pred == target).mean()), int(len(x)), rule


def per_image_success_rate(clf: Classifier, poisoned: ImageSet, targets: np.ndarray,
                           batch_size: int = 256) -> tuple[float, int, str]:
    """ASR with one target per image (e.g. all-to-all attacks): (rate, inputs counted, rule)."""
    keep = np.ones(len(poisoned), bool) if poisoned.labels is None else poisoned.labels != targets
    if not keep.any():
        raise BadInput(f"{poisoned.name!r}: no poisoned inputs left to measure the ASR on")
    pred = clf.predict(poisoned.images[keep], batch_size)
    rule = "per-image targets; inputs whose true label equals their target are excluded"
    return float((pred == targets[keep]).mean()), int(keep.sum()), rule


def infer_target(clf: Classifier, poisoned: ImageSet) -> int:
    """The most frequent prediction on poisoned data (used when no target is given)."""
    pred = clf.predict(poisoned.images)
    return int(np.bincount(pred, minlength=clf.num_classes).argmax())


def choose_input_scale(clf: Classifier, clean: ImageSet, sample: int = 2000,
                       seed: int = 0) -> tuple[Classifier, dict[str, float]]:
    """Try ``raw`` and ``unit`` on (a seeded sample of) clean data; keep the more accurate one."""
    part = clean.take(sample, seed)
    scores = {s: accuracy(clf.with_scale(s), part) for s in ("unit", "raw")}
    best = max(scores, key=lambda s: scores[s])
    return clf.with_scale(best), scores


def evaluate(clf: Classifier, clean: ImageSet, poisoned: ImageSet | None = None,
             target: int | None = None, per_class: bool = False,
             batch_size: int = 256) -> EvalResult:
    """Clean accuracy and, with poisoned data, ASR (target inferred when not given)."""
    check_compatible(clf, clean, "clean data")
    pred = clf.predict(clean.images, batch_size)
    y = clean.require_labels()
    res = EvalResult(clean_accuracy=float((pred == y).mean()), clean_count=len(y),
                     input_scale=clf.spec.scale)
    if per_class:
        res.per_class_accuracy = [
            float((pred[y == c] == c).mean()) if np.any(y == c) else float("nan")
            for c in range(clf.num_classes)
        ]
    if poisoned is not None:
        check_compatible(clf, poisoned, "poisoned data")
        if target is None and "targets" in poisoned.meta:
            res.asr, res.poisoned_count, res.asr_rule = per_image_success_rate(
                clf, poisoned, np.asarray(poisoned.meta["targets"]), batch_size)
            res.notes.append("targets read per image from the poisoned file")
            return res
        if target is None:
            target = infer_target(clf, poisoned)
            res.notes.append(f"target not given: took the most frequent prediction, {target}")
        res.asr, res.poisoned_count, res.asr_rule = attack_success_rate(clf, poisoned, target,
                                                                        batch_size)
        res.target = target
    return res
