"""The model-detector family: (model, the defender's clean data, options) → is it backdoored,
and which label is the target?

A detector is ``run(clf, clean, opts) -> Detection`` registered with
`backdoorlab.registry.register(..., family="model-detector")` in its own module of this package.
`detect` runs one and adds what the benchmark table reports: the verdict, whether the flagged label
is the attack's target (when the caller knows it), the method's statistic, wall time and image
passes (`backdoorlab.cost`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI builds its parser from the registry without importing torch
    from backdoorlab.data.imageset import ImageSet
    from backdoorlab.models.classifier import Classifier




@dataclass
class Detection:
    """A detector's answer. ``scores``: one per label, larger = more suspicious (Neural Cleanse:
    the anomaly index). ``flagged``: suspected target labels, most suspicious first; ``backdoored``
    the model-level verdict, with ``statistic`` (named by ``statistic_name``); ``p_value``: the
    verdict's p-value where the method has one (the chance of a statistic at least this extreme on
    a backdoor-free model, under the method's null), which `scan` combines across detectors.
    ``triggers``: label → (mask H×W, pattern H×W×C) in [0, 1], for methods that reverse-engineer
    triggers."""

    scores: dict[int, float]
    flagged: list[int]
    backdoored: bool
    statistic: float | None
    statistic_name: str
    triggers: dict = field(default_factory=dict, repr=False)
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    p_value: float | None = None


@dataclass
class DetectResult:
    method: str
    options: dict
    detection: Detection
    seconds: float
    passes: int
    targets: list[int] | None  # the attack's target(s), when known (scoring only)

    @property
    def right_target(self) -> bool | None:
        """Is the most suspicious flagged label one of the attack's targets? (None: unknown.)"""
        if self.targets is None:
            return None
        return bool(self.detection.flagged) and self.detection.flagged[0] in self.targets

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self.detection).items() if k != "triggers"}
        d["scores"] = {str(k): v for k, v in d["scores"].items()}
        return {"kind": "detect", "method": self.method, "options": self.options, **d,
                "targets": self.targets, "right_target": self.right_target,
                "cost": {"seconds": self.seconds, "image_passes": self.passes},
                "reversed_triggers": sorted(self.detection.triggers)}


def detect(name: str, clf: Classifier, clean: ImageSet, options: Any = None,
           targets: list[int] | None = None) -> DetectResult:
    """Run the registered model detector ``name``; ``targets`` (if known) only score the answer."""
    from backdoorlab import cost, registry
    from backdoorlab.options import from_mapping

    method = registry.get(name, "model-detector")
    if options is None:
        options = method.options()
    elif isinstance(options, dict):
        options = from_mapping(method.options, options, f"detect {name}")
    t0 = time.perf_counter()
    with cost.counting() as passes:
        det = method.run(clf, clean, options)
    return DetectResult(name, asdict(options), det, round(time.perf_counter() - t0, 2), passes.images,
                        list(targets) if targets is not None else None)


def scan_set() -> tuple[list[str], list[str]]:
    """(`scan`'s default detectors, the others): a detector joins the default set unless it
    registered with ``in_scan=False`` (no model-level p-value, e.g. ABS)."""
    from backdoorlab import registry

    methods = registry.methods("model-detector")
    return [m.name for m in methods if m.in_scan], [m.name for m in methods if not m.in_scan]


@dataclass
class Verdict:
    """`scan`'s one answer from several detectors. ``backdoored`` when at least one detector with a
    p-value is significant at ``alpha / m`` (m = the number of detectors with a p-value;
    Bonferroni, so a backdoor-free model is reported backdoored by them with probability at most
    ``alpha`` when each p-value is valid), or a detector without a p-value (ABS) says so by its own
    rule, which carries no such bound. ``targets``: the labels the significant detectors flag, most
    votes first (ties: the first detector's order). ``significant``: detector names."""

    backdoored: bool
    targets: list[int]
    alpha: float
    level: float
    significant: list[str]
    rule: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict(results: dict[str, DetectResult], alpha: float = 0.05) -> Verdict:
    """Combine detector name → `DetectResult` into one `Verdict` (see there for the rule)."""
    from collections import Counter

    tested = [name for name, r in results.items() if r.detection.p_value is not None]
    ruled = [name for name in results if name not in tested]
    level = alpha / max(1, len(tested))
    significant = [name for name, r in results.items()
                   if (r.detection.p_value < level if r.detection.p_value is not None
                       else r.detection.backdoored)]
    votes: Counter[int] = Counter()
    first: dict[int, int] = {}
    for i, name in enumerate(significant):
        for rank, y in enumerate(results[name].detection.flagged):
            votes[y] += 1
            first.setdefault(y, i * 100_000 + rank)
    targets = sorted(votes, key=lambda y: (-votes[y], first[y]))
    rule = (f"backdoored when a detector's model-level p-value is below {alpha:g} / "
            f"{max(1, len(tested))} detector(s) with a p-value = {level:.3g} (Bonferroni: at most "
            f"{alpha:.0%} false alarms on backdoor-free models)")
    if ruled:
        rule += (f", or when {', '.join(ruled)} (no p-value) flags a label by its own rule (no "
                 "false-alarm bound)")
    rule += "; the target is the label most significant detectors flag"
    return Verdict(bool(significant), targets, alpha, level, significant, rule)
