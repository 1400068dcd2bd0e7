"""Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): prune the last convolutional layer's
channels that are dormant on clean data, then fine-tune the pruned network on clean data.

Only the defender's clean validation data is used: it ranks the channels, sets the pruning
amount (the first step whose validation accuracy drops by ``drop``, or a fixed ``fraction`` of the
channels), and is split (seeded, stratified) into a fine-tuning part and a selection part that
picks the best fine-tuning epoch. Test and poisoned sets are only reported. Pruned channels stay
at zero during fine-tuning (their output is masked, so they get no gradient).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from backdoorlab.data.imageset import ImageSet
from backdoorlab.defenses.masking import apply_channel_mask, mask_from_channels, resolve_target
from backdoorlab.defenses.pruning import prune_sweep
from backdoorlab.errors import BadInput
from backdoorlab.evaluation import accuracy
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.hooks import OutputMask
from backdoorlab.poisoned import PoisonedSet, poisoned_sets
from backdoorlab.train import TrainConfig, train


@dataclass
class Stage:
    """Figures of one model: shares in [0, 1]; None where the data was not given."""

    valid_accuracy: float
    test_accuracy: float | None = None
    asr: float | None = None  # first poisoned set
    asr_sets: list[dict] = field(default_factory=list)  # {name, asr} per poisoned set


@dataclass
class StagedResult:
    """A prune-then-fine-tune run: the model's figures before, after pruning, after fine-tuning."""

    before: Stage
    after_pruning: Stage
    after_finetuning: Stage
    finetune: dict
    settings: dict
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinePruneResult(StagedResult):
    layer: str
    pruned_channels: list[int]
    num_channels: int
    drop: float | None
    drop_unit: str
    fraction: float
    notes: list[str] = field(default_factory=list)


def measure(clf: Classifier, valid: ImageSet, test: ImageSet | None, sets: list[PoisonedSet]) -> Stage:
    """Validation accuracy, test accuracy and one ASR per poisoned set of one model."""
    st = Stage(valid_accuracy=accuracy(clf, valid))
    if test is not None:
        st.test_accuracy = accuracy(clf, test)
    st.asr_sets = [{"name": ps.name, "asr": ps.success_rate(clf)} for ps in sets]
    st.asr = st.asr_sets[0]["asr"] if sets else None
    return st


def finetune_split(valid: ImageSet, select_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Split the clean validation data into (fine-tuning part, epoch-selection part)."""
    if not 0 < select_fraction < 1:
        raise BadInput(f"selection fraction must be in (0, 1), got {select_fraction}")
    return valid.split(select_fraction, seed=seed)


def finetune_masked(clf: Classifier, layer: str, mask: np.ndarray, tune: ImageSet, select: ImageSet,
                    cfg: TrainConfig) -> tuple[Classifier, dict]:
    """Fine-tune a copy of the pruned ``clf`` with ``layer``'s pruned channels held at zero."""
    target = resolve_target(clf, layer)
    tuned = clf.copy()
    with OutputMask(tuned.layer(target.weights), target.channels, mask):
        log = train(tuned, tune, select, cfg, desc="fine-tune")
    tuned = apply_channel_mask(tuned, layer, mask)  # exact zeros again (e.g. BN statistics)
    tuned.provenance["fine_tuned"] = {"epochs": cfg.epochs, "lr": cfg.lr, "images": len(tune)}
    return tuned, log.to_dict()


def fine_prune(clf: Classifier, valid: ImageSet, test: ImageSet | None = None,
               poisoned=None, target: int | list[int] | None = None, layer: str | None = None,
               drop: float | None = 4.0, fraction: float | None = None, drop_unit: str = "points",
               order: str = "increasing", cfg: TrainConfig | None = None,
               select_fraction: float = 0.2, seed: int = 0,
               poisoned_labels: str = "auto") -> tuple[Classifier, Classifier, FinePruneResult]:
    """Prune then fine-tune. Returns (pruned model, fine-tuned model, result). ``poisoned`` (one
    set or a list, resolved by `backdoorlab.poisoned.poisoned_sets`) is only reported."""
    t0 = time.perf_counter()
    sets = poisoned_sets(poisoned, target, poisoned_labels, num_classes=clf.num_classes)
    cfg = cfg or TrainConfig(epochs=5, lr=1e-4, batch_size=64, schedule="none", seed=seed)
    if (drop is None) == (fraction is None):
        raise BadInput("give either a validation-accuracy drop or a fraction of channels to prune")
    tgt = resolve_target(clf, layer)
    layer = tgt.layer
    notes: list[str] = []
    sweep = prune_sweep(clf, valid, layer=layer, order=order, drops=(drop,) if drop is not None else (100,),
                        drop_unit=drop_unit, stop="max_drop" if drop is not None else "all", seed=seed)
    if fraction is not None:
        if not 0 <= fraction <= 1:
            raise BadInput(f"fraction must be in [0, 1], got {fraction}")
        k = int(round(fraction * tgt.channels))
        mask = mask_from_channels(tgt.channels, sweep.ranking[:k])
    else:
        th = sweep.thresholds[0]
        if th.reached:
            mask = th.mask
        else:
            mask = mask_from_channels(tgt.channels, sweep.ranking)
            notes.append(f"a {drop:g} {drop_unit} drop was never reached: every channel pruned")
    pruned = apply_channel_mask(clf, layer, mask)
    tune, select = finetune_split(valid, select_fraction, seed)
    tuned, log = finetune_masked(pruned, layer, mask, tune, select, cfg)
    res = FinePruneResult(
        layer=layer, pruned_channels=[int(c) for c in np.flatnonzero(mask)],
        num_channels=tgt.channels, drop=drop, drop_unit=drop_unit, fraction=float(mask.mean()),
        before=measure(clf, valid, test, sets),
        after_pruning=measure(pruned, valid, test, sets),
        after_finetuning=measure(tuned, valid, test, sets),
        finetune=log, settings={"order": order, "train": asdict(cfg), "select_fraction": select_fraction,
                                "seed": seed, "tune_images": len(tune), "select_images": len(select)},
        seconds=round(time.perf_counter() - t0, 2), notes=notes)
    return pruned, tuned, res
