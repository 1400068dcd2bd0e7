"""GoodNet: a BadNet B and its repaired copy B' voting together (CSAW-HackML 2020 lab).

G(x) = B'(x) when argmax B(x) == argmax B'(x), else N, where N = number of classes of B: an extra
class meaning "this input looks backdoored" (the repair changed the answer, as it does for
triggered inputs once the backdoor neurons are pruned).

`GoodNet.forward` returns N + 1 logits: B' logits, plus a last column that is *above* every B'
logit (max + 1 + |max|) where B and B' disagree and *below* every one (min - 1 - |min|) where they
agree. So argmax is exactly the rule above (ties inside B' resolve as in B'), the logits stay
finite, and a GoodNet is an ordinary `Classifier` with N + 1 classes that saves and loads like any
other model (architecture ``goodnet``; sidecar options hold both sub-architectures, weights are
prefixed ``bad.`` and ``repaired.``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput
from backdoorlab.models import files
from backdoorlab.models.classifier import Classifier
from backdoorlab.poisoned import PoisonedSet, as_list, poisoned_sets

ARCH = "goodnet"


class GoodNet(nn.Module):
    """N + 1 logits whose argmax is B' where B and B' agree and N where they disagree."""

    def __init__(self, bad: nn.Module, repaired: nn.Module, num_classes: int):
        super().__init__()
        self.bad = bad
        self.repaired = repaired
        self.num_classes = int(num_classes)  # N, classes of B and B'; the GoodNet has N + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lb = self.bad(x)
        lr = self.repaired(x)
        agree = lb.argmax(1) == lr.argmax(1)
        hi = lr.max(1).values
        lo = lr.min(1).values
        extra = torch.where(agree, lo - 1.0 - lo.abs(), hi + 1.0 + hi.abs())
        return torch.cat([lr, extra.unsqueeze(1)], dim=1)


def _sub_options(clf: Classifier) -> dict:
    return {"arch": clf.arch, "options": copy.deepcopy(clf.arch_options),
            "num_classes": int(clf.num_classes)}


def make_goodnet(bad: Classifier, repaired: Classifier) -> Classifier:
    """Wrap BadNet ``bad`` and repaired ``repaired`` (same input spec and classes) as a GoodNet
    `Classifier` with ``num_classes + 1`` classes; the last class means "backdoored"."""
    if bad.spec != repaired.spec:
        raise BadInput(f"GoodNet: the BadNet and the repaired network take different inputs "
                       f"({bad.spec} vs {repaired.spec})")
    if bad.num_classes != repaired.num_classes:
        raise BadInput(f"GoodNet: the BadNet has {bad.num_classes} classes, the repaired network "
                       f"{repaired.num_classes}")
    n = bad.num_classes
    net = GoodNet(copy.deepcopy(bad.net), copy.deepcopy(repaired.net), n)
    options = {"bad": _sub_options(bad), "repaired": _sub_options(repaired)}
    prov = {"defense": "goodnet", "backdoor_class": n, "bad": copy.deepcopy(bad.provenance),
            "repaired": copy.deepcopy(repaired.provenance)}
    return Classifier(net, bad.spec, n + 1, ARCH, options, prov, bad.channels_last).to(bad.device,
                                                                                      bad.precision)


def build_goodnet(num_classes: int, input_shape: tuple[int, int, int], options: dict) -> nn.Module:
    """`files.SPECIAL_BUILDERS` entry: rebuild a GoodNet from its sidecar options."""
    try:
        subs = [options[k] for k in ("bad", "repaired")]
        parts = [(str(o["arch"]), int(o["num_classes"]), dict(o.get("options") or {})) for o in subs]
    except (KeyError, TypeError, ValueError) as e:
        raise BadInput(f"goodnet model: malformed options ({e!r}); expected 'bad' and 'repaired' "
                       "each with 'arch', 'num_classes' and 'options'") from None
    n = parts[0][1]
    if parts[1][1] != n or num_classes != n + 1:
        raise BadInput(f"goodnet model: class counts do not fit (GoodNet {num_classes}, BadNet {n}, "
                       f"repaired {parts[1][1]}; expected GoodNet = BadNet + 1)")
    bad, rep = (files.build_net(a, k, input_shape, o) for a, k, o in parts)
    return GoodNet(bad, rep, n)


files.SPECIAL_BUILDERS[ARCH] = build_goodnet


@dataclass
class GoodNetMetrics:
    """Shares in [0, 1]. ``clean_accuracy``: clean inputs answered with their true label;
    ``clean_flagged``: clean inputs answered N (false alarms); ``asr``: poisoned inputs answered
    with their target; ``detection_rate``: poisoned inputs answered N. ASR and detection rate count
    the inputs `backdoorlab.poisoned` counts. ``asr`` … ``asr_rule`` describe the first poisoned
    set; ``poisoned_sets`` has the figures of every set."""

    clean_accuracy: float
    clean_flagged: float
    clean_count: int
    backdoor_class: int
    asr: float | None = None
    detection_rate: float | None = None
    poisoned_count: int | None = None
    target: int | None = None
    asr_rule: str | None = None
    poisoned_sets: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def metrics_from_predictions(clean_pred: np.ndarray, clean_labels: np.ndarray, backdoor_class: int,
                             poisoned_preds: list[np.ndarray] | None = None,
                             sets: list[PoisonedSet] | None = None) -> GoodNetMetrics:
    """`GoodNetMetrics` from GoodNet predictions: on clean data (true labels) and, optionally, on
    the counted inputs of each poisoned set (``poisoned_preds[i]`` for ``sets[i]``)."""
    n = backdoor_class
    res = GoodNetMetrics(clean_accuracy=float((clean_pred == clean_labels).mean()),
                         clean_flagged=float((clean_pred == n).mean()),
                         clean_count=int(len(clean_labels)), backdoor_class=n)
    for i, (pp, ps) in enumerate(zip(poisoned_preds or [], sets or [], strict=True)):
        asr, det = ps.rate_from(pp), float((np.asarray(pp) == n).mean())
        res.poisoned_sets.append({**ps.describe(), "asr": asr, "detection_rate": det})
        if i == 0:
            res.asr, res.detection_rate, res.poisoned_count = asr, det, len(ps)
            res.target, res.asr_rule = ps.target, ps.rule
    return res


def goodnet_metrics(goodnet: Classifier, clean: ImageSet, poisoned=None,
                    target: int | list[int] | None = None, batch_size: int = 256,
                    poisoned_labels: str = "auto") -> GoodNetMetrics:
    """Clean accuracy, false-alarm rate, ASR and detection rate of a GoodNet (class N =
    ``goodnet.num_classes - 1`` means "backdoored"). Clean labels must be < N. ``poisoned`` is one
    set or a list, resolved by `backdoorlab.poisoned.poisoned_sets` (targets must be known: given,
    per image, or the labels under the CSAW convention)."""
    n = goodnet.num_classes - 1
    goodnet.spec.check(clean.images, f"clean data {clean.name!r}")
    y = clean.require_labels()
    if len(y) == 0:
        raise BadInput(f"clean data {clean.name!r}: no images")
    if y.max() >= n:
        raise BadInput(f"clean data {clean.name!r}: label {int(y.max())} out of range for a GoodNet "
                       f"over {n} classes (class {n} means backdoored)")
    for ps in as_list(poisoned):
        if isinstance(ps, ImageSet):
            goodnet.spec.check(ps.images, f"poisoned data {ps.name!r}")
    sets = poisoned_sets(poisoned, target, poisoned_labels, num_classes=n)
    pred = goodnet.predict(clean.images, batch_size)
    return metrics_from_predictions(pred, y, n, [goodnet.predict(ps.images, batch_size) for ps in sets],
                                    sets)


def goodnet_predictions(bad_pred: np.ndarray, repaired_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """The GoodNet rule on precomputed predictions: B' where B == B', else ``num_classes``."""
    return np.where(bad_pred == repaired_pred, repaired_pred, num_classes).astype(np.int64)
