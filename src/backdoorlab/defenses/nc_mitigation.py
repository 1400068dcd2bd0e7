"""Neural Cleanse mitigation (Wang et al., IEEE S&P 2019, Section VI) with reversed triggers.

Given the trigger(s) Neural Cleanse reverse-engineered for the flagged label(s) (``triggers.npz``
from ``backdoorlab cleanse``) and the defender's clean validation data:

- ``unlearn``: fine-tune on the clean validation data where a share of the images (default 20 %)
  carry a reversed trigger but keep their true label, so the network unlearns the shortcut;
- ``prune``: rank the channels of the last conv layer by (activation on reversed-trigger inputs −
  activation on clean inputs) and prune the largest first, until the reversed trigger's success on
  validation images falls to ``stop_asr`` or validation accuracy has dropped ``max_drop`` points
  (the same ranking as guided pruning);
- ``filter``: an input filter — a model with one extra class N answering N when the mean
  activation of the top ``top_fraction`` most trigger-sensitive channels exceeds a threshold set
  to flag at most ``false_positive_rate`` of the clean validation images (the paper's 5 %).

Every method is measured on the user's test data; nothing is tuned on it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import nn

from backdoorlab.data.imageset import ImageSet
from backdoorlab.defenses.fine_pruning import finetune_split
from backdoorlab.defenses.guided_pruning import guided_ranking
from backdoorlab.defenses.masking import apply_channel_mask, mask_from_channels, resolve_target
from backdoorlab.defenses.neural_cleanse import apply_trigger
from backdoorlab.defenses.pruning import prune_sweep
from backdoorlab.errors import BadInput
from backdoorlab.evaluation import accuracy
from backdoorlab.models import files
from backdoorlab.models.classifier import Classifier
from backdoorlab.poisoned import PoisonedSet, poisoned_sets
from backdoorlab.train import TrainConfig, train

FILTER_ARCH = "nc_filter"


@dataclass
class MethodResult:
    """Shares in [0, 1] on the user's test data; ``detection_rate`` only for the filter."""

    method: str
    clean_accuracy: float
    asr: float | None  # first poisoned set; every set in ``asr_sets``
    asr_sets: list[dict] = field(default_factory=list)
    detection_rate: float | None = None
    clean_flagged: float | None = None
    details: dict = field(default_factory=dict)


@dataclass
class MitigationResult:
    labels: list[int]
    methods: list[MethodResult]
    settings: dict

    def to_dict(self) -> dict:
        return {"kind": "mitigate", **asdict(self)}


def stamped(data: ImageSet, triggers: dict[int, tuple[np.ndarray, np.ndarray]],
            labels: list[int]) -> tuple[ImageSet, np.ndarray]:
    """Images of other labels stamped with each label's reversed trigger; (set with true labels,
    per-image targets)."""
    xs, ys, ts = [], [], []
    y_all = data.require_labels()
    for lab in labels:
        keep = y_all != lab
        mask, pattern = triggers[lab]
        xs.append(apply_trigger(data.images[keep], mask, pattern))
        ys.append(y_all[keep])
        ts.append(np.full(int(keep.sum()), lab, dtype=np.int64))
    return (ImageSet(np.concatenate(xs), np.concatenate(ys), data.num_classes, "reversed-trigger"),
            np.concatenate(ts))


def within_drop(acc: float, base: float, n: int, max_drop: float, alpha: float = 0.05) -> bool:
    """Whether an accuracy ``acc`` measured on ``n`` images is consistent with a drop of at most
    ``max_drop`` points from ``base``: False only when P(X <= correct) < ``alpha`` for X ~
    Binomial(n, base - max_drop / 100), i.e. when the images give evidence of a larger drop.
    Sampling noise of ``base`` itself is ignored (it is measured on the same images)."""
    from scipy.stats import binom

    if acc >= base - max_drop / 100 - 1e-12:
        return True
    p0 = min(max(base - max_drop / 100, 0.0), 1.0)
    return bool(binom.cdf(int(round(acc * n)), n, p0) >= alpha)


def selection_score(acc: float, trigger_asr: float, base: float, n: int, max_drop: float) -> float:
    """How `unlearn` ranks an epoch from its held-back figures (higher is kept).

    Inside the accuracy budget (`within_drop` against the given model's held-back accuracy
    ``base`` on ``n`` images) an epoch scores 1 + accuracy − reversed-trigger success: the
    defense-effectiveness trade-off (DER, Zhu et al. ICCV 2023, as BackdoorBench reports it) on
    held-back data, so one more image of trigger success does not outweigh several images of
    clean accuracy. Outside the budget it scores its accuracy − 1, below every epoch inside (the
    given model, epoch 0, is always inside)."""
    if within_drop(acc, base, n, max_drop):
        return 1.0 + acc - trigger_asr
    return acc - 1.0


def target_probability(clf: Classifier, images: np.ndarray, targets: np.ndarray) -> float:
    """Mean softmax probability the model gives each image's ``targets`` label (0 for no images)."""
    if len(images) == 0:
        return 0.0
    z = clf.logits(images).astype(np.float64)
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    return float(p[np.arange(len(targets)), targets].mean())


def unlearn(clf: Classifier, valid: ImageSet, triggers: dict, labels: list[int], share: float = 0.2,
            cfg: TrainConfig | None = None, seed: int = 0, select_fraction: float = 0.2,
            max_drop: float = 2.0, min_steps: int = 200) -> tuple[Classifier, dict]:
    """Fine-tune a copy on the clean data with ``share`` of the images carrying a reversed trigger
    (true labels kept; the stamped images are split evenly between the ``labels``' triggers).

    Runs ``cfg.epochs`` epochs, more if needed for at least ``min_steps`` optimiser steps (on a
    defender set of a hundred images an epoch is two steps). A seeded ``select_fraction`` of
    ``valid`` is held back and picks the epoch to keep (the given model, epoch 0, included) by
    `selection_score`: among the epochs whose held-back clean accuracy is not significantly below
    the given model's minus ``max_drop`` points (`within_drop`: a one-sided binomial test at 5 %,
    so that on a few dozen held-back images, where one image is several points, the budget is
    judged by evidence rather than by one or two images; on thousands it is about ``max_drop``),
    the highest held-back accuracy minus reversed-trigger success on the held-back images stamped
    with the triggers; ties (frequent on a few dozen images, where both figures move in steps of
    several points) go to the epoch whose stamped held-back images give the triggers' targets the
    lowest mean probability, i.e. where the trigger pulls least. Ranking by trigger success alone
    kept the first epoch after the trigger fell, whose clean accuracy is the lowest (GTSRB
    BadNets, 1,568 tuning images: epoch 2, 4.7 points below the given model on the test set, where
    epoch 9 was 1.3 below at the same near-zero ASR). Unlearning moves clean accuracy by several
    points from one epoch to the next, so the last epoch is no safe choice either.
    Returns (model, details: per-epoch held-back figures, the kept epoch, sizes)."""
    cfg = cfg or TrainConfig(epochs=10, lr=0.01, batch_size=64, optimizer="sgd", schedule="none", seed=seed)
    tune, select = finetune_split(valid, select_fraction, seed)
    per_epoch = -(-len(tune) // cfg.batch_size)
    cfg = replace(cfg, epochs=max(cfg.epochs, -(-min_steps // per_epoch)))
    rng = np.random.default_rng(seed)
    x = tune.images.copy()
    pick = rng.choice(len(x), size=int(round(share * len(x))), replace=False)
    for i, chunk in enumerate(np.array_split(pick, len(labels))):
        mask, pattern = triggers[labels[i]]
        x[chunk] = apply_trigger(x[chunk], mask, pattern)
    check, targets = stamped(select, triggers, labels)
    y_select = select.require_labels()
    tuned = clf.copy()
    base: list[float] = []

    def score() -> tuple[tuple[float, float], dict]:
        acc = float((tuned.predict(select.images) == y_select).mean())
        asr = float((tuned.predict(check.images) == targets).mean())
        pull = target_probability(tuned, check.images, targets)
        if not base:  # the first call scores the model as given
            base.append(acc)
        return (selection_score(acc, asr, base[0], len(y_select), max_drop), -pull), {
            "select_accuracy": acc, "select_trigger_asr": asr, "select_trigger_probability": pull}

    log = train(tuned, ImageSet(x, tune.labels, tune.num_classes, "unlearning"), None, cfg,
                desc="unlearn", score=score)
    kept = log.epochs[log.best_epoch] if log.best_epoch >= 0 else log.epochs[-1]
    info = {"labels": labels, "share": share, "epochs": cfg.epochs, "steps": cfg.epochs * per_epoch,
            "lr": cfg.lr, "tune_images": len(tune), "select_images": len(select),
            "best_epoch": log.best_epoch,
            "select_accuracy": kept["select_accuracy"], "select_trigger_asr": kept["select_trigger_asr"],
            "select_trigger_probability": kept["select_trigger_probability"],
            "per_epoch": [{k: e[k] for k in ("epoch", "select_accuracy", "select_trigger_asr",
                                             "select_trigger_probability")}
                          for e in log.epochs]}
    tuned.provenance["nc_unlearning"] = {k: info[k] for k in ("labels", "share", "epochs", "best_epoch")}
    return tuned, info


def prune_by_trigger(clf: Classifier, valid: ImageSet, triggers: dict, labels: list[int],
                     layer: str | None = None, stop_asr: float = 0.05,
                     max_drop: float = 10.0) -> tuple[Classifier, dict]:
    """Prune the most trigger-activated channels until the reversed trigger stops working on
    validation images (ASR ≤ ``stop_asr``) or accuracy drops ``max_drop`` points."""
    trig_valid, targets = stamped(valid, triggers, labels)
    ranking, score = guided_ranking(clf, valid, trig_valid, layer)
    trig_valid.meta["targets"] = targets
    sweep = prune_sweep(clf, valid, poisoned=trig_valid, layer=layer, ranking=ranking, order="guided",
                        drops=(max_drop,), stop="max_drop")
    ok = np.flatnonzero((sweep.asr <= stop_asr) & (sweep.drop <= max_drop))
    step = int(ok[0]) if len(ok) else int(np.flatnonzero(sweep.drop <= max_drop)[-1])
    tgt = resolve_target(clf, layer)
    pruned = apply_channel_mask(clf, tgt.layer, mask_from_channels(tgt.channels, ranking[:step]))
    return pruned, {"layer": tgt.layer, "pruned_channels": [int(c) for c in ranking[:step]],
                    "valid_trigger_asr": float(sweep.asr[step]), "valid_drop_points": float(sweep.drop[step]),
                    "stopped_by": "trigger" if len(ok) else "max_drop"}


class TriggerFilter(nn.Module):
    """N + 1 logits: the network's own where the top channels' mean activation is at most
    ``threshold``, class N (the last) where it is above."""

    def __init__(self, net: nn.Module, point: str, channels: list[int], threshold: float, num_classes: int):
        super().__init__()
        self.net = net
        self.point = point
        self.register_buffer("channels", torch.tensor(channels, dtype=torch.long))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.num_classes = int(num_classes)

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net.forward_to(self.point, x)
        s = h[:, self.channels].flatten(1).mean(1)
        return self.net.forward_from(self.point, h), s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, s = self.score(x)
        hi = logits.max(1).values
        lo = logits.min(1).values
        extra = torch.where(s > self.threshold, hi + 1.0 + hi.abs(), lo - 1.0 - lo.abs())
        return torch.cat([logits, extra.unsqueeze(1)], dim=1)


def build_filter(num_classes: int, input_shape: tuple[int, int, int], options: dict) -> nn.Module:
    try:
        base = files.build_net(options["arch"], num_classes - 1, input_shape, options.get("options") or {})
        return TriggerFilter(base, options["point"], list(options["channels"]), float(options["threshold"]),
                             num_classes - 1)
    except (KeyError, TypeError, ValueError) as e:
        raise BadInput(f"nc_filter model: malformed options ({e!r})") from None


files.SPECIAL_BUILDERS[FILTER_ARCH] = build_filter


def make_filter(clf: Classifier, valid: ImageSet, triggers: dict, labels: list[int],
                top_fraction: float = 0.1, false_positive_rate: float = 0.05) -> Classifier:
    """The input filter as a `Classifier` with N + 1 classes (class N = "triggered")."""
    if not clf.staged:
        raise BadInput("the input filter needs a network that can run up to a layer (a staged network)")
    tgt = resolve_target(clf, None)
    if tgt.point is None:
        raise BadInput("the input filter needs a measure point after the last conv layer")
    trig_valid, _ = stamped(valid, triggers, labels)
    ranking, _ = guided_ranking(clf, valid, trig_valid)
    k = max(1, int(round(top_fraction * tgt.channels)))
    channels = [int(c) for c in ranking[:k]]
    acts = clf.activations(valid.images, tgt.point)
    clean_scores = acts[:, channels].reshape(len(acts), -1).mean(1)
    threshold = float(np.quantile(clean_scores, 1.0 - false_positive_rate))
    net = TriggerFilter(copy.deepcopy(clf.net), tgt.point, channels, threshold, clf.num_classes)
    options = {"arch": clf.arch, "options": copy.deepcopy(clf.arch_options), "point": tgt.point,
               "channels": channels, "threshold": threshold}
    prov = {"defense": "neural cleanse input filter", "labels": labels, "top_fraction": top_fraction,
            "false_positive_rate": false_positive_rate, "base": copy.deepcopy(clf.provenance)}
    return Classifier(net, clf.spec, clf.num_classes + 1, FILTER_ARCH, options, prov,
                      clf.channels_last).to(clf.device, clf.precision)


def _asr(clf: Classifier, sets: list[PoisonedSet]) -> tuple[float | None, list[dict]]:
    """(ASR on the first set or None, [{name, asr}] for every set)."""
    rates = [{"name": ps.name, "asr": ps.success_rate(clf)} for ps in sets]
    return (rates[0]["asr"] if rates else None), rates


def mitigate(clf: Classifier, valid: ImageSet, test: ImageSet, triggers: dict, labels: list[int],
             poisoned=None, target: int | list[int] | None = None,
             methods: tuple[str, ...] = ("unlearn", "prune", "filter"), cfg: TrainConfig | None = None,
             seed: int = 0, poisoned_labels: str = "auto",
             min_steps: int = 200) -> tuple[MitigationResult, dict[str, Classifier]]:
    """Run the chosen mitigations; returns the result table and the repaired models. ``poisoned``
    (one set or a list, resolved by `backdoorlab.poisoned.poisoned_sets`) is only reported."""
    sets = poisoned_sets(poisoned, target, poisoned_labels, num_classes=clf.num_classes)
    missing = [y for y in labels if y not in triggers]
    if missing:
        raise BadInput(f"no reversed trigger for label(s) {missing}")
    unknown = set(methods) - {"unlearn", "prune", "filter"}
    if unknown:
        raise BadInput(f"unknown mitigation(s) {sorted(unknown)} (unlearn, prune, filter)")
    out = [MethodResult("none (the model as given)", accuracy(clf, test), *_asr(clf, sets))]
    models: dict[str, Classifier] = {}
    if "unlearn" in methods:
        m, info = unlearn(clf, valid, triggers, labels, cfg=cfg, seed=seed, min_steps=min_steps)
        models["unlearn"] = m
        out.append(MethodResult("unlearning", accuracy(m, test), *_asr(m, sets), details=info))
    if "prune" in methods:
        m, info = prune_by_trigger(clf, valid, triggers, labels)
        models["prune"] = m
        out.append(MethodResult("neuron pruning", accuracy(m, test), *_asr(m, sets), details=info))
    if "filter" in methods:
        from backdoorlab.defenses.goodnet import metrics_from_predictions

        m = make_filter(clf, valid, triggers, labels)
        models["filter"] = m
        n = clf.num_classes
        pred = m.predict(test.images)
        gm = metrics_from_predictions(pred, test.require_labels(), n, [m.predict(ps.images) for ps in sets],
                                      sets)
        out.append(MethodResult("input filter", gm.clean_accuracy, gm.asr,
                                [{"name": d["name"], "asr": d["asr"], "detection_rate": d["detection_rate"]}
                                 for d in gm.poisoned_sets], gm.detection_rate, gm.clean_flagged))
    return MitigationResult(labels, out, {"methods": list(methods), "seed": seed}), models
