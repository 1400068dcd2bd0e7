"""Guided pruning: prune the channels most activated by backdoored inputs first.

Plain pruning (Liu et al., RAID 2018) removes channels that are dormant on clean data, hoping the
backdoor lives there. Guided pruning (proposed in this project's seed study) ranks each channel
of the pruned layer by ``mean activation on backdoored inputs − mean activation on clean
inputs`` (means over images and positions at the measure point) and prunes the largest first.
The backdoored inputs are either poisoned validation images the defender holds, or clean
validation images stamped with triggers reverse-engineered by Neural Cleanse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backdoorlab.data.imageset import ImageSet
from backdoorlab.defenses.masking import resolve_target
from backdoorlab.errors import BadInput
from backdoorlab.models.classifier import Classifier


def channel_means(clf: Classifier, images: np.ndarray, where: str) -> np.ndarray:
    act = clf.activations(images, where)
    return act.mean(axis=(0, 2, 3)) if act.ndim == 4 else act.mean(axis=0)


def guided_ranking(clf: Classifier, clean: ImageSet, backdoored: ImageSet,
                   layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ranking, score): channels sorted by decreasing backdoored-minus-clean mean activation."""
    if len(backdoored) == 0:
        raise BadInput("guided pruning needs at least one backdoored input")
    tgt = resolve_target(clf, layer)
    where = tgt.point or tgt.layer
    score = channel_means(clf, backdoored.images, where) - channel_means(clf, clean.images, where)
    if score.shape != (tgt.channels,):
        raise BadInput(f"layer {tgt.layer!r}: activations at {where!r} have {score.shape[0]} channels, "
                       f"expected {tgt.channels}")
    return np.argsort(-score, kind="stable"), score


def stamp_reversed_triggers(clean: ImageSet, triggers_npz: str | Path,
                            labels: list[int] | None = None) -> ImageSet:
    """Clean images stamped with Neural Cleanse's reversed triggers (``triggers.npz`` from
    ``backdoorlab cleanse``): each listed label's trigger on every clean image of another label."""
    from backdoorlab.defenses.neural_cleanse import apply_trigger, load_triggers

    trig = load_triggers(triggers_npz)
    labels = labels if labels is not None else sorted(trig)
    missing = [y for y in labels if y not in trig]
    if missing:
        raise BadInput(f"{triggers_npz}: no reversed trigger for label(s) {missing} "
                       f"(has {sorted(trig)})")
    parts = []
    for y in labels:
        mask, pattern = trig[y]
        if mask.shape != clean.shape[:2]:
            raise BadInput(f"{triggers_npz}: trigger of label {y} is {mask.shape}, images are "
                           f"{clean.shape[:2]}")
        x = clean.images if clean.labels is None else clean.images[clean.labels != y]
        parts.append(apply_trigger(x, mask, pattern))
    return ImageSet(np.concatenate(parts), None, clean.num_classes, name="reversed-trigger inputs")
