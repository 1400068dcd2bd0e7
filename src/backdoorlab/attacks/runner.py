"""Train a backdoored (or, with no trigger, a clean) model end to end and write its outputs.

One call does what the attack papers' scripts do: split a clean validation set off the training
data (seeded, stratified; it picks the best epoch and is handed to defenses), poison the rest,
train, and measure clean accuracy on the test set and the attack success rate (ASR) on a poisoned
copy of the test set built from images whose true label differs from the target.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from backdoorlab.attacks.poison import (
    attack_success,
    make_poisoned_test_set,
    poison_training_set,
    poison_training_set_multi,
)
from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput
from backdoorlab.evaluation import accuracy
from backdoorlab.metrics_image import image_quality
from backdoorlab.models.architectures import build, canonical
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.spec import InputSpec
from backdoorlab.train import TrainConfig, seeded_init, train
from backdoorlab.triggers import Trigger, TriggerStack, make_trigger
from backdoorlab.triggers.base import BatchHook


@dataclass
class AttackPlan:
    """What to poison. No triggers = a clean model trained the same way (the reference)."""

    triggers: list[str] = field(default_factory=list)  # CLI trigger specs
    targets: list[int] = field(default_factory=list)   # one per trigger (all2one)
    rate: float = 0.05            # share of the whole training set, per trigger
    mode: str = "all2one"         # all2one | all2all
    clean_label: bool = False
    pruning_aware: bool = False   # Liu et al. 2018 (see attacks/pruning_aware.py)
    pa_max_drop: float = 4.0      # pruning-aware: prune until validation accuracy drops this much (points)
    pa_dormant_shift: float = 0.0  # pruning-aware: lower reinstated channels' bias by this much


@dataclass
class AttackOutcome:
    clean_accuracy: float
    valid_accuracy: float
    asr: list[float]
    trigger_quality: list[dict]
    train_seconds: float
    epochs: int
    settings: dict
    log: dict
    poison: dict
    pruning_aware: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def chain_hooks(hooks: list[BatchHook | None]) -> BatchHook | None:
    """One batch hook running the given ones in order (None when there are none)."""
    live = [h for h in hooks if h is not None]
    if not live:
        return None
    if len(live) == 1:
        return live[0]

    def run(images, labels, rows, rng):
        for h in live:
            images, labels = h(images, labels, rows, rng)
        return images, labels
    return run


def _summary(poison_info: dict) -> dict:
    """A `PoisonInfo` dict without its row lists (they go to the poisoned set's own file)."""
    return {k: v for k, v in poison_info.items() if k not in ("indices", "cover_indices")}


def build_triggers(plan: AttackPlan, shape: tuple[int, int, int], num_classes: int) -> list[Trigger]:
    if plan.mode == "all2all":
        if len(plan.triggers) != 1:
            raise BadInput("all-to-all attacks take exactly one trigger")
    elif len(plan.targets) != len(plan.triggers):
        raise BadInput(f"{len(plan.triggers)} trigger(s) but {len(plan.targets)} target(s): give "
                       "one --target per --trigger")
    for t in plan.targets:
        if not 0 <= t < num_classes:
            raise BadInput(f"target label {t} out of range for {num_classes} classes")
    return [make_trigger(s, shape) for s in plan.triggers]


def poisoned_test_sets(test: ImageSet, plan: AttackPlan,
                       triggers: list[Trigger]) -> list[tuple[ImageSet, np.ndarray]]:
    """One poisoned evaluation set (true labels, targets) per trigger."""
    if plan.mode == "all2all":
        return [make_poisoned_test_set(test, triggers[0], None, "all2all")]
    return [make_poisoned_test_set(test, trig, tgt, "all2one")
            for trig, tgt in zip(triggers, plan.targets, strict=True)]


def train_attack(train_data: ImageSet, test: ImageSet, arch: str, plan: AttackPlan,
                 cfg: TrainConfig, valid_fraction: float = 0.1, input_scale: str = "unit",
                 seed: int = 0, device: str | object = "cpu",
                 precision: str = "fp32") -> tuple[Classifier, AttackOutcome, dict]:
    """Returns (model, outcome, artefacts) — artefacts hold the data sets worth writing out. The
    model trains on ``device`` at ``precision`` (`backdoorlab.device`)."""
    if train_data.shape != test.shape:
        raise BadInput(f"training images are {train_data.shape} but test images {test.shape}")
    if test.num_classes != train_data.num_classes:
        raise BadInput(f"training data has {train_data.num_classes} classes, test data "
                       f"{test.num_classes}")
    k = train_data.num_classes
    triggers = build_triggers(plan, train_data.shape, k)
    rest, valid = train_data.split(valid_fraction, seed=seed)
    valid = valid.subset(slice(None), name="valid")
    poison_info: dict = {}
    rows: list[np.ndarray] = []  # poisoned rows per trigger, for the triggers' batch hooks
    if len(triggers) == 0:
        poisoned_train = rest
    elif len(triggers) == 1:
        tgt = plan.targets[0] if plan.mode == "all2one" else None
        poisoned_train, info = poison_training_set(rest, triggers[0], tgt, plan.rate, plan.mode,
                                                   plan.clean_label, seed)
        poison_info = _summary(info.to_dict())
        rows = [info.indices]
    else:
        stack = TriggerStack(list(zip(triggers, plan.targets, strict=True)))
        poisoned_train, minfo = poison_training_set_multi(rest, stack, plan.rate, seed)
        poison_info = {"count": minfo.count, "total": minfo.total,
                       "entries": [_summary(e.to_dict()) for e in minfo.entries]}
        rows = [e.indices for e in minfo.entries]
    hook = chain_hooks([t.batch_hook(r, seed) for t, r in zip(triggers, rows, strict=True)])
    seeded_init(seed)
    h, w, c = train_data.shape
    spec = InputSpec(h, w, c, scale=input_scale)
    arch = canonical(arch)
    net = build(arch, k, spec.shape)
    clf = Classifier(net, spec, k, arch, provenance={
        "trained_by": "backdoorlab attack", "data": train_data.name, "seed": seed,
        "triggers": [t.to_dict() for t in triggers], "targets": plan.targets, "mode": plan.mode})
    clf.to(device, precision)
    pa_info = None
    t0 = time.perf_counter()
    if plan.pruning_aware and triggers:
        from backdoorlab.attacks.pruning_aware import pruning_aware_attack

        probe = make_poisoned_test_set(valid, triggers[0], plan.targets[0] if plan.targets else None,
                                       plan.mode)
        log, pa_info = pruning_aware_attack(clf, rest, poisoned_train, valid, cfg, plan.pa_max_drop,
                                            probe=probe, dormant_shift=plan.pa_dormant_shift)
    else:
        trained = [t.train_hook(r, seed, clf.device) for t, r in zip(triggers, rows, strict=True)]
        trained = [h for h in trained if h is not None]
        if len(trained) > 1:
            raise BadInput("one trigger at most may be trained with the classifier (input-aware)")
        if trained:  # the trigger is learnt with the network: keep the last epoch, not the cleanest
            cfg = replace(cfg, keep_best=False)
        log = train(clf, poisoned_train, valid, cfg, desc="train", batch_hook=hook,
                    train_hook=trained[0] if trained else None).to_dict()
    seconds = time.perf_counter() - t0
    p_sets = poisoned_test_sets(test, plan, triggers) if triggers else []
    asr = [attack_success(clf, ps, tg) for ps, tg in p_sets]
    for t in triggers:  # a trigger trained with the network reports its training and cross test
        if getattr(t, "last_run", None) and hasattr(t, "cross_accuracy"):
            cross = t.cross_accuracy(clf, test, seed)
            poison_info = {**poison_info, "trigger_training": {**t.last_run, "cross_accuracy": cross}}
    quality = []
    for ps, _ in p_sets:
        src = test.images[np.asarray(ps.meta["source_indices"])]
        quality.append(image_quality(src, ps.images).to_dict())
    outcome = AttackOutcome(
        clean_accuracy=accuracy(clf, test), valid_accuracy=accuracy(clf, valid), asr=asr,
        trigger_quality=quality, train_seconds=round(seconds, 2), epochs=cfg.epochs,
        settings={"arch": arch, "plan": asdict(plan), "train": asdict(cfg),
                  "valid_fraction": valid_fraction, "input_scale": input_scale, "seed": seed,
                  "train_count": len(rest), "valid_count": len(valid), "test_count": len(test)},
        log=log if isinstance(log, dict) else log.to_dict(), poison=poison_info,
        pruning_aware=pa_info)
    artefacts = {"valid": valid, "test": test, "poisoned_test": p_sets, "triggers": triggers,
                 "train": poisoned_train,
                 "poisoned_index": np.sort(np.concatenate(rows)).astype(np.int64) if rows
                 else np.zeros(0, dtype=np.int64),
                 "poisoned_valid": [make_poisoned_test_set(valid, t, tg, plan.mode)
                                    for t, tg in zip(triggers, plan.targets or [None], strict=False)]}
    return clf, outcome, artefacts


TRAIN_FILE = "poisoned_train.h5"


def write_attack_outputs(out: Path, clf: Classifier, outcome: AttackOutcome, artefacts: dict,
                         save_train: bool = False) -> None:
    """Model, clean/poisoned data in CSAW h5 format, trigger preview, results.json (atomic). With
    ``save_train`` also the training set as poisoned before training (``poisoned_train.h5``: the
    images and labels the model trained on, its poisoned rows in ``poisoned_index`` and the
    poisoning record `backdoorlab inspect` reads as the truth); what a trigger adds per batch
    (WaNet's noise rows, BppAttack's negatives) is drawn during training and not in it."""
    from backdoorlab.data.csaw import write_csaw_h5
    from backdoorlab.io import atomic_dir, write_json
    from backdoorlab.models.files import save_model
    from backdoorlab.report.previews import save_trigger_preview

    with atomic_dir(out) as tmp:
        save_model(clf, tmp / "model.safetensors")
        write_csaw_h5(artefacts["valid"], tmp / "clean_valid.h5")
        write_csaw_h5(artefacts["test"], tmp / "clean_test.h5")
        files = {"model": "model.safetensors", "clean_valid": "clean_valid.h5",
                 "clean_test": "clean_test.h5", "poisoned_test": [], "poisoned_valid": []}
        if save_train:
            _write_train(tmp / TRAIN_FILE, artefacts, outcome)
            files["train"] = TRAIN_FILE
        many = len(artefacts["poisoned_test"]) > 1
        for i, (ps, targets) in enumerate(artefacts["poisoned_test"]):
            name = f"poisoned_test_{i + 1}.h5" if many else "poisoned_test.h5"
            write_csaw_h5(_with_targets(ps, targets), tmp / name)
            files["poisoned_test"].append(name)
        for i, (pv, targets) in enumerate(artefacts["poisoned_valid"]):
            name = f"poisoned_valid_{i + 1}.h5" if many else "poisoned_valid.h5"
            write_csaw_h5(_with_targets(pv, targets), tmp / name)
            files["poisoned_valid"].append(name)
        if artefacts["triggers"]:
            plan = outcome.settings.get("plan", {})
            names = [f"{s} → {t}" for s, t in zip(plan.get("triggers") or [], plan.get("targets") or [],
                                                 strict=False)] or None
            save_trigger_preview(artefacts["test"], artefacts["triggers"], tmp / "trigger_preview.png",
                                 names=names if names and len(names) == len(artefacts["triggers"]) else None)
            files["trigger_preview"] = "trigger_preview.png"
        result = {"kind": "attack", **outcome.to_dict(), "files": files}
        write_json(tmp / "results.json", result)


def _write_train(path: Path, artefacts: dict, outcome: AttackOutcome) -> None:
    """The poisoned training set with the record `backdoorlab poison --rate` writes (plan "train",
    ``poisoned_index``), so that `backdoorlab inspect` scores its answer against the truth."""
    import json

    from backdoorlab.data.csaw import write_csaw_h5

    rows = artefacts["poisoned_index"]
    record = {"plan": "train", "written_by": "backdoorlab attack", "poisoned": int(len(rows)),
              "total": len(artefacts["train"]), "attack": outcome.poison,
              "triggers": (outcome.settings.get("plan") or {}).get("triggers"),
              "targets": (outcome.settings.get("plan") or {}).get("targets")}
    write_csaw_h5(artefacts["train"], path, extra={"poisoned_index": rows},
                  attrs={"backdoorlab_poison": json.dumps(record)})


def _with_targets(ps: ImageSet, targets: np.ndarray) -> ImageSet:
    """Carry the per-image attack targets into the h5 file (``target`` dataset)."""
    meta = {k: v for k, v in ps.meta.items() if k in ("format",)}
    out = ImageSet(ps.images, ps.labels, ps.num_classes, ps.name, ps.class_names, meta)
    out.meta["targets"] = np.asarray(targets, dtype=np.int64)
    return out
