"""Poisoning plans: which training samples get a trigger and which label they then carry.

- all-to-one (BadNets, Gu et al. 2017): poisoned samples are drawn from images whose label is not
  the target and relabeled to ``target``.
- all-to-all (Gu et al. 2017): poisoned samples are drawn from all images and relabeled
  ``(y + 1) mod num_classes``.
- clean-label (Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks", 2019): poisoned
  samples are drawn from the target class only and keep their (correct) labels.
- multi-trigger multi-target: several triggers, each with its own target, on disjoint samples.

``rate`` is always a share of the WHOLE training set: ``round(rate * N)`` samples are poisoned
(Python's round, ties to even), drawn without replacement by ``numpy.random.default_rng(seed)``
from the eligible rows. The returned set has the same rows in the same order, the poisoned ones
replaced. Test-time sets keep the TRUE labels; attack targets travel in a parallel array.

The training rows get ``trigger.poison`` (the test-time trigger unless the attack trains on
another form of it), after ``trigger.prepare`` has seen the clean set. A trigger with
``cover_rate`` > 0 also gets ``round(cover_rate * N)`` regularisation ("cover") rows, drawn from
the rows left unpoisoned, stamped with ``trigger.cover`` and keeping their labels (Qi et al.,
ICLR 2023); ``cover_indices`` lists them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput
from backdoorlab.triggers.base import Trigger
from backdoorlab.triggers.stack import TriggerStack

if TYPE_CHECKING:
    from backdoorlab.models.classifier import Classifier

MODES = ("all2one", "all2all")


@dataclass
class PoisonInfo:
    """What a poisoning plan did. ``indices``: poisoned rows (sorted) of the returned set;
    ``eligible``: rows the plan could draw from; ``label_changes``: poisoned rows whose label
    changed."""

    mode: str
    target: int | None
    rate: float
    clean_label: bool
    seed: int
    total: int
    eligible: int
    count: int
    label_changes: int
    indices: np.ndarray = field(repr=False)
    trigger: dict = field(default_factory=dict)
    cover_count: int = 0
    cover_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["indices"] = self.indices.tolist()
        d["cover_indices"] = self.cover_indices.tolist()
        return d


@dataclass
class MultiPoisonInfo:
    """One `PoisonInfo` per (trigger, target) of a stack; ``count`` is the total poisoned."""

    entries: list[PoisonInfo]
    total: int
    count: int
    seed: int

    def to_dict(self) -> dict:
        return {"entries": [e.to_dict() for e in self.entries], "total": self.total,
                "count": self.count, "seed": self.seed}


def _check_common(data: ImageSet, mode: str, target: int | None) -> np.ndarray:
    y = data.require_labels()
    if mode not in MODES:
        raise BadInput(f"poisoning mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "all2one":
        if target is None:
            raise BadInput("all-to-one poisoning needs a target label")
        if not 0 <= target < data.num_classes:
            raise BadInput(f"target label {target} out of range for {data.num_classes} classes "
                           f"(0..{data.num_classes - 1})")
    elif data.num_classes < 2:
        raise BadInput("all-to-all poisoning needs at least 2 classes")
    return y


def _count(rate: float, n: int) -> int:
    if not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0):
        raise BadInput(f"poisoning rate must be in [0, 1] (a share of the whole training set), got {rate}")
    return int(round(rate * n))


def _add_cover(images: np.ndarray, source: np.ndarray, taken: np.ndarray, trigger: Trigger,
               rng: np.random.Generator, seed: int) -> np.ndarray:
    """Stamp ``trigger.cover`` on ``round(trigger.cover_rate * N)`` rows not in ``taken`` (in
    place, labels untouched); returns their sorted indices."""
    rate = float(getattr(trigger, "cover_rate", 0.0) or 0.0)
    if rate <= 0:
        return np.zeros(0, np.int64)
    n = len(images)
    k = _count(rate, n)
    free = np.flatnonzero(~taken)
    if k > len(free):
        raise BadInput(f"{trigger.name}: cover rate {rate:g} asks for {k} regularisation images but "
                       f"only {len(free)} training images are left unpoisoned")
    idx = np.sort(rng.choice(free, size=k, replace=False)) if k else np.zeros(0, np.int64)
    if k:
        images[idx] = trigger.cover(source[idx], seed)
    return idx.astype(np.int64)


def all2all_targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """All-to-all attack targets: ``(y + 1) mod num_classes``."""
    return (np.asarray(labels, dtype=np.int64) + 1) % num_classes


def poison_training_set(data: ImageSet, trigger: Trigger, target: int | None, rate: float,
                        mode: str = "all2one", clean_label: bool = False,
                        seed: int = 0) -> tuple[ImageSet, PoisonInfo]:
    """Poison ``round(rate * len(data))`` rows of a labeled training set (see module docstring).

    all2one: rows with label != target, relabeled ``target``; clean_label: rows of the target
    class, labels unchanged (all2one only); all2all: any row, relabeled ``(y + 1) mod K``.
    """
    y = _check_common(data, mode, target)
    if clean_label and mode != "all2one":
        raise BadInput("clean-label poisoning is all-to-one (it needs one target class)")
    trigger.check(data.shape)
    n = len(data)
    k = _count(rate, n)
    if mode == "all2all":
        eligible = np.arange(n)
        what = "images"
    elif clean_label:
        eligible = np.flatnonzero(y == target)
        what = f"images of the target class {target}"
    else:
        eligible = np.flatnonzero(y != target)
        what = f"images outside the target class {target}"
    if k > len(eligible):
        raise BadInput(f"poisoning rate {rate:g} asks for {k} of {n} training images but only "
                       f"{len(eligible)} are eligible ({what})")
    trigger.prepare(data, None if mode == "all2all" else target, seed)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(eligible, size=k, replace=False)) if k else np.zeros(0, np.int64)
    images = data.images.copy()
    labels = y.copy()
    if k:
        images[idx] = trigger.poison(data.images[idx], seed)
        if mode == "all2all":
            labels[idx] = all2all_targets(y[idx], data.num_classes)
        elif not clean_label:
            labels[idx] = target
    taken = np.zeros(n, dtype=bool)
    taken[idx] = True
    cover = _add_cover(images, data.images, taken, trigger, rng, seed)
    info = PoisonInfo(mode=mode, target=None if mode == "all2all" else int(target), rate=float(rate),
                      clean_label=clean_label, seed=seed, total=n, eligible=int(len(eligible)),
                      count=k, label_changes=int((labels[idx] != y[idx]).sum()),
                      indices=idx.astype(np.int64), trigger=trigger.to_dict(),
                      cover_count=len(cover), cover_indices=cover)
    meta = dict(data.meta)
    meta["poison"] = info.to_dict()
    out = ImageSet(images, labels, data.num_classes, name=f"{data.name or 'data'}+{trigger.name}",
                   class_names=data.class_names, meta=meta)
    return out, info


def poison_training_set_multi(data: ImageSet, stack: TriggerStack, rate_each: float,
                              seed: int = 0) -> tuple[ImageSet, MultiPoisonInfo]:
    """All-to-one poisoning with every (trigger, target) of ``stack``, on disjoint rows.

    Each trigger gets ``round(rate_each * N)`` rows, drawn (in stack order, one seeded generator)
    from rows whose label is not that trigger's target and that no earlier trigger took.
    """
    y = data.require_labels()
    stack.check(data.shape, data.num_classes)
    n = len(data)
    k = _count(rate_each, n)
    rng = np.random.default_rng(seed)
    taken = np.zeros(n, dtype=bool)
    images = data.images.copy()
    labels = y.copy()
    entries = []
    for trig, tgt in stack:
        trig.prepare(data, tgt, seed)
    for j, (trig, tgt) in enumerate(stack):
        eligible = np.flatnonzero((y != tgt) & ~taken)
        if k > len(eligible):
            raise BadInput(f"trigger {j + 1} of the stack ({trig.name}, target {tgt}): rate "
                           f"{rate_each:g} asks for {k} images but only {len(eligible)} are left "
                           "outside its target class and the other triggers' samples")
        idx = np.sort(rng.choice(eligible, size=k, replace=False)) if k else np.zeros(0, np.int64)
        taken[idx] = True
        if k:
            images[idx] = trig.poison(data.images[idx], seed)
            labels[idx] = tgt
        entries.append(PoisonInfo(mode="all2one", target=tgt, rate=float(rate_each), clean_label=False,
                                  seed=seed, total=n, eligible=int(len(eligible)), count=k,
                                  label_changes=k, indices=idx.astype(np.int64),
                                  trigger=trig.to_dict()))
    count = int(taken.sum())
    for entry, (trig, _) in zip(entries, stack, strict=True):  # cover rows after every payload
        cover = _add_cover(images, data.images, taken, trig, rng, seed)
        taken[cover] = True
        entry.cover_count, entry.cover_indices = len(cover), cover
    info = MultiPoisonInfo(entries=entries, total=n, count=count, seed=seed)
    meta = dict(data.meta)
    meta["poison"] = info.to_dict()
    out = ImageSet(images, labels, data.num_classes, name=f"{data.name or 'data'}+stack",
                   class_names=data.class_names, meta=meta)
    return out, info


def make_poisoned_test_set(data: ImageSet, trigger: Trigger, target: int | None = None,
                           mode: str = "all2one") -> tuple[ImageSet, np.ndarray]:
    """Trigger-stamped evaluation set: ``(images with their TRUE labels, attack targets)``.

    all2one: every image whose true label is not ``target`` (target-class images are left out;
    they would count as successes without any backdoor). all2all: every image, target
    ``(y + 1) mod K``. The returned ``meta["source_indices"]`` lists the rows of ``data`` used.
    """
    y = _check_common(data, mode, target)
    trigger.check(data.shape)
    rows = np.flatnonzero(y != target) if mode == "all2one" else np.arange(len(data))
    if len(rows) == 0:
        raise BadInput(f"{data.name or 'data'}: every image belongs to the target class {target}; "
                       "nothing to poison")
    targets = (np.full(len(rows), target, dtype=np.int64) if mode == "all2one"
               else all2all_targets(y[rows], data.num_classes))
    meta = dict(data.meta)
    meta.update(poison={"mode": mode, "target": target if mode == "all2one" else None,
                        "trigger": trigger.to_dict(), "count": int(len(rows))},
                source_indices=rows.tolist())
    out = ImageSet(trigger.apply(data.images[rows]), y[rows].copy(), data.num_classes,
                   name=f"{data.name or 'data'}+{trigger.name}", class_names=data.class_names, meta=meta)
    return out, targets


def attack_success(clf: Classifier, poisoned: ImageSet, targets: np.ndarray | int,
                   batch_size: int = 256) -> float:
    """Attack success rate for per-sample ``targets`` (or one target for all): the share of
    poisoned images classified as their own target, leaving out images whose true label equals
    their target (when labels are known)."""
    from backdoorlab.evaluation import per_image_success_rate

    t = np.broadcast_to(np.asarray(targets, dtype=np.int64), (len(poisoned),))
    if len(t) and (t.min() < 0 or t.max() >= clf.num_classes):
        raise BadInput(f"attack targets must lie in 0..{clf.num_classes - 1}")
    return per_image_success_rate(clf, poisoned, t, batch_size)[0]
