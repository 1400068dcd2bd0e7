"""The repair family: (model, what the defender holds, options) → repaired model.

Every repair is a function ``run(clf, data: DefenderData, opts) -> Repaired`` registered with
`backdoorlab.registry.register(..., family="repair")` in its own module of this package (a new
module here is found by the registry; nothing else needs to change). The function sees only what
the defender holds (`DefenderData`); test and poisoned test sets are for `measure` alone.

`measure` scores a model on the user's test data; `repair` runs a method, counts its cost (wall
time and image passes, `backdoorlab.cost`) and returns a `RepairResult` with the benchmark table's
figures (BackdoorBench's definitions): clean accuracy, ASR and robust accuracy (poisoned inputs
classified as their true label) before and after, and DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2
(ΔASR = ASR before − after, ΔACC = accuracy before − after; 1 = backdoor gone at no accuracy cost,
0.5 = nothing changed).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from backdoorlab.errors import BadInput

if TYPE_CHECKING:  # the CLI builds its parser from the registry without importing torch
    from backdoorlab.data.imageset import ImageSet
    from backdoorlab.models.classifier import Classifier
    from backdoorlab.poisoned import PoisonedSet



@dataclass
class DefenderData:
    """What a defender holds: clean labelled data, and where a method assumes them, backdoored
    inputs (``poisoned``) or Neural Cleanse's reversed triggers (``triggers``: label → (mask,
    pattern), for the ``trigger_labels``)."""

    clean: ImageSet
    poisoned: ImageSet | None = None
    triggers: dict | None = None
    trigger_labels: list[int] | None = None

    def backdoored(self) -> ImageSet:
        """Backdoored inputs: the given ones, else clean images stamped with the reversed triggers."""
        if self.poisoned is not None:
            return self.poisoned
        if self.triggers:
            from backdoorlab.defenses.nc_mitigation import stamped

            return stamped(self.clean, self.triggers, self.labels())[0]
        raise BadInput("this repair needs backdoored inputs (--guide DATA) or reversed triggers "
                       "(--triggers triggers.npz)")

    def labels(self) -> list[int]:
        if not self.triggers:
            raise BadInput("this repair needs reversed triggers (--triggers triggers.npz from "
                           "'backdoorlab cleanse')")
        return list(self.trigger_labels) if self.trigger_labels else sorted(self.triggers)


def tuning_split(clf: Classifier, data: DefenderData, select_fraction: float, seed: int,
                 name: str) -> tuple[ImageSet, ImageSet]:
    """The defender's clean data split (seeded) into a tuning part and a held-back part that picks
    or measures the epochs, both non-empty, labels checked against ``clf``'s classes."""
    from backdoorlab.defenses.fine_pruning import finetune_split

    tune, select = finetune_split(data.clean, select_fraction, seed)
    if len(tune) == 0 or len(select) == 0:
        raise BadInput(f"{name}: {len(data.clean)} clean images are too few to hold back "
                       f"{select_fraction:g} of them")
    clf.spec.check(tune.images, f"{name} clean data")
    y = tune.require_labels()
    if y.min() < 0 or y.max() >= clf.num_classes:
        raise BadInput(f"{name}: clean labels must lie in 0..{clf.num_classes - 1}, found "
                       f"{int(y.min())}..{int(y.max())}")
    return tune, select


@dataclass
class Repaired:
    """A repair's output: the repaired model, method details (JSON-able) and notes."""

    model: Classifier
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    summary: str = ""  # one line for tables, e.g. "52/128 channels"


@dataclass
class Figures:
    """A model on the user's test data: shares in [0, 1]; one entry per poisoned set in ``sets``
    (``name``, ``asr``, ``robust_accuracy`` — None where the file holds no true labels)."""

    clean_accuracy: float
    sets: list[dict]
    data: str = "test"  # which clean data the accuracy is on

    @property
    def asr(self) -> float | None:
        return self.sets[0]["asr"] if self.sets else None


def predictions(clf: Classifier, test: ImageSet, sets: list[PoisonedSet]) -> list[np.ndarray]:
    """Predictions on the clean test set, then on every poisoned set."""
    return [clf.predict(test.images), *(clf.predict(ps.images) for ps in sets)]


def figures(preds: list[np.ndarray], test: ImageSet, sets: list[PoisonedSet], data: str = "test") -> Figures:
    rows = [{"name": ps.name, "asr": ps.rate_from(p), "robust_accuracy": ps.robust_from(p)}
            for ps, p in zip(sets, preds[1:], strict=True)]
    return Figures(float((preds[0] == test.require_labels()).mean()), rows, data)


def measure(clf: Classifier, test: ImageSet, sets: list[PoisonedSet], data: str = "test") -> Figures:
    """Clean accuracy, ASR and robust accuracy of ``clf``."""
    return figures(predictions(clf, test, sets), test, sets, data)


def goodnet_figures(bad: list[np.ndarray] | None, repaired: list[np.ndarray], test: ImageSet,
                    sets: list[PoisonedSet], num_classes: int) -> dict:
    """The GoodNet of a repair (CSAW-HackML: answer N = "backdoored" where the given and the
    repaired model disagree; ``bad`` None: ``repaired`` already answers N itself, an input filter):
    clean accuracy, share of clean inputs flagged, and per poisoned set its ASR and detection rate
    (share answered N)."""
    from backdoorlab.defenses.goodnet import goodnet_predictions, metrics_from_predictions

    g = [goodnet_predictions(b, r, num_classes) for b, r in zip(bad, repaired, strict=True)] \
        if bad is not None else repaired
    m = metrics_from_predictions(g[0], test.require_labels(), num_classes, g[1:], sets)
    return {"clean_accuracy": m.clean_accuracy, "clean_flagged": m.clean_flagged,
            "sets": [{"name": d["name"], "asr": d["asr"], "detection_rate": d["detection_rate"]}
                     for d in m.poisoned_sets]}


def der(before_acc: float, after_acc: float, before_asr: float | None, after_asr: float | None
        ) -> float | None:
    """Defense effectiveness rating (BackdoorBench, Wu et al., NeurIPS 2022 D&B), in [0, 1]."""
    if before_asr is None or after_asr is None:
        return None
    return (max(0.0, before_asr - after_asr) - max(0.0, before_acc - after_acc) + 1) / 2


@dataclass
class RepairResult:
    method: str
    options: dict
    before: Figures
    after: Figures
    seconds: float   # wall time of the repair alone (not of the measuring)
    passes: int      # image passes of the repair alone (`backdoorlab.cost`)
    details: dict
    notes: list[str]
    defender_data: dict  # sizes of what the method was given
    summary: str = ""
    goodnet: dict | None = None  # `goodnet_figures`: of (given, repaired), or of a filter answering N

    @property
    def der_sets(self) -> list[float | None]:
        return [der(self.before.clean_accuracy, self.after.clean_accuracy, b["asr"], a["asr"])
                for b, a in zip(self.before.sets, self.after.sets, strict=True)]

    @property
    def der(self) -> float | None:
        d = self.der_sets
        return d[0] if d else None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "repair", "method": self.method, "options": self.options,
                "before": asdict(self.before), "after": asdict(self.after),
                "der": self.der, "der_sets": self.der_sets,
                "cost": {"seconds": self.seconds, "image_passes": self.passes},
                "details": _plain(self.details), "notes": self.notes, "summary": self.summary,
                "goodnet": self.goodnet, "defender_data": self.defender_data}


def _plain(o):
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_plain(v) for v in o]
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return o


def repair(name: str, clf: Classifier, data: DefenderData, test: ImageSet | None = None,
           sets: list[PoisonedSet] | None = None, options: Any = None) -> tuple[Classifier, RepairResult]:
    """Run the registered repair ``name`` on ``clf`` and measure it on ``test`` (default: the
    defender's clean data, noted) and the poisoned ``sets``. ``options``: the method's options
    dataclass (default: its defaults) or a dict of them."""
    from backdoorlab import cost, registry
    from backdoorlab.options import from_mapping

    method = registry.get(name, "repair")
    if options is None:
        options = method.options()
    elif isinstance(options, dict):
        options = from_mapping(method.options, options, f"repair {name}")
    sets = sets or []
    on = test if test is not None else data.clean
    what = "test" if test is not None else "validation"
    bad = predictions(clf, on, sets)
    t0 = time.perf_counter()
    with cost.counting() as passes:
        out = method.run(clf, data, options)
    seconds = time.perf_counter() - t0
    fixed = predictions(out.model, on, sets)
    before, after = figures(bad, on, sets, what), figures(fixed, on, sets, what)
    n = clf.num_classes
    goodnet = (goodnet_figures(bad, fixed, on, sets, n) if out.model.num_classes == n
               else goodnet_figures(None, fixed, on, sets, n) if out.model.num_classes == n + 1 else None)
    notes = list(out.notes)
    if test is None:
        notes.append("no test data: accuracy measured on the defender's own clean data")
    held = {"clean": len(data.clean)}
    if data.poisoned is not None:
        held["poisoned"] = len(data.poisoned)
    if data.triggers:
        held["trigger_labels"] = data.labels()
    res = RepairResult(name, asdict(options), before, after, round(seconds, 2), passes.images,
                       out.details, notes, held, out.summary, goodnet)
    return out.model, res
