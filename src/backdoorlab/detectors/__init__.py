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
from collections.abc import Mapping
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

    @classmethod
    def recorded(cls, flagged: list[int], backdoored: bool, p_value: float | None) -> Detection:
        """A verdict read back from a record (flags, verdict and p-value, no scores): enough for
        `verdict` to combine it with others."""
        return cls(scores={}, flagged=list(flagged), backdoored=bool(backdoored), statistic=None,
                   statistic_name="", p_value=p_value)


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


def _resolved(name: str, options: Any):
    """(the registered model detector ``name``, its options: the defaults for None, a dict checked
    into the method's dataclass, or the dataclass as given)."""
    from backdoorlab import registry
    from backdoorlab.options import from_mapping

    method = registry.get(name, "model-detector")
    if options is None:
        options = method.options()
    elif isinstance(options, dict):
        options = from_mapping(method.options, options, f"detect {name}")
    return method, options


def detect(name: str, clf: Classifier, clean: ImageSet, options: Any = None,
           targets: list[int] | None = None) -> DetectResult:
    """Run the registered model detector ``name``; ``targets`` (if known) only score the answer."""
    from backdoorlab import cost

    method, options = _resolved(name, options)
    t0 = time.perf_counter()
    with cost.counting() as passes:
        det = method.run(clf, clean, options)
    return DetectResult(name, asdict(options), det, round(time.perf_counter() - t0, 2), passes.images,
                        list(targets) if targets is not None else None)


def merged_p_value(p_values: list[float]) -> float:
    """One p-value from N p-values of the same hypothesis, however dependent they are: N/k times
    the k-th smallest, k = ceil(N/2) (the median for odd N; N = 2 gives twice the smaller). Valid
    because rejecting when at least k of N level-a tests reject has size at most N·a/k (Rüger,
    Metrika 1978; Vovk & Wang, "Combining p-values via averaging", Biometrika 2020). Used for
    repeated runs of one randomised detector on one model (different seeds)."""
    import math

    if not p_values:
        raise ValueError("no p-values to merge")
    n = len(p_values)
    k = math.ceil(n / 2)
    return min(1.0, n / k * sorted(p_values)[k - 1])


def detect_repeated(name: str, clf: Classifier, clean: ImageSet, options: Any = None,
                    targets: list[int] | None = None, repeats: int = 1) -> DetectResult:
    """Run detector ``name`` ``repeats`` times, at its seed option + 0, 1, …, and merge the runs:
    the p-value by `merged_p_value`; the flagged labels are those at least k = ceil(N/2) runs flag
    (most runs first); backdoored when at least k runs say so by the detector's own rule; the
    statistic is the merged p-value where the detector has one, else the median statistic; the
    triggers come from the run whose p-value (or statistic) is the median one (a flagged label it
    kept none for: from the first run that did). ``repeats = 1`` is
    `detect`. Details keep every run's seed, p-value, statistic and flags."""
    import math
    import statistics
    from collections import Counter

    if repeats == 1:
        return detect(name, clf, clean, options, targets)
    _, options = _resolved(name, options)
    base = asdict(options)
    if "seed" not in base:
        from backdoorlab.errors import BadInput

        raise BadInput(f"{name}: no seed option, so repeated runs would all be the same; use 1 repeat")
    seed0 = base["seed"]
    runs = [detect(name, clf, clean, {**base, "seed": seed0 + i}, targets) for i in range(repeats)]
    dets = [r.detection for r in runs]
    k = math.ceil(repeats / 2)
    ps = [d.p_value for d in dets]
    have_p = all(p is not None for p in ps)
    counts = Counter(y for d in dets for y in d.flagged)
    first = {}
    for d in dets:
        for rank, y in enumerate(d.flagged):
            first.setdefault(y, rank)
    flagged = sorted((y for y, c in counts.items() if c >= k), key=lambda y: (-counts[y], first[y]))
    if have_p:
        merged = merged_p_value(ps)  # type: ignore[arg-type]
        statistic: float | None = merged
        nth = {1: "smallest", 2: "2nd smallest", 3: "3rd smallest"}.get(k, f"{k}th smallest")
        stat_name = f"p-value merged over {repeats} seeds ({repeats}/{k} × the {nth})"
        order = sorted(range(repeats), key=lambda i: ps[i])  # type: ignore[arg-type, return-value]
    else:
        merged = None
        stats = [d.statistic for d in dets if d.statistic is not None]
        statistic = statistics.median(stats) if stats else None
        stat_name = f"median of {repeats} seeds: {dets[0].statistic_name}"
        order = sorted(range(repeats), key=lambda i: -(dets[i].statistic or 0.0))
    middle = dets[order[k - 1]]
    triggers = dict(middle.triggers)
    for y in flagged:  # a flagged label the median run kept no trigger for: the first run's that did
        donor = next((d for d in dets if y in d.triggers), None)
        if y not in triggers and donor is not None:
            triggers[y] = donor.triggers[y]
    labels = sorted({y for d in dets for y in d.scores})  # a run may score a subset of labels
    scores = {y: statistics.fmean(d.scores[y] for d in dets if y in d.scores) for y in labels}
    notes = list(dict.fromkeys(n for d in dets for n in d.notes))
    det = Detection(scores=scores, flagged=flagged, backdoored=sum(d.backdoored for d in dets) >= k,
                    statistic=statistic, statistic_name=stat_name, triggers=triggers,
                    details={"repeats": [{"seed": seed0 + i, "p_value": d.p_value,
                                          "statistic": d.statistic, "flagged": d.flagged,
                                          "backdoored": d.backdoored} for i, d in enumerate(dets)],
                             "merge": f"at least {k} of {repeats} runs",
                             "triggers_from_seed": seed0 + order[k - 1]},
                    notes=notes, p_value=merged)
    return DetectResult(name, {**base, "repeats": repeats}, det, round(sum(r.seconds for r in runs), 2),
                        sum(r.passes for r in runs), list(targets) if targets is not None else None)


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


def verdict(results: Mapping[str, DetectResult | Detection], alpha: float = 0.05) -> Verdict:
    """Combine detector name → `DetectResult` (or its `Detection` alone: only ``p_value``,
    ``flagged`` and ``backdoored`` are read, so a recorded answer serves) into one `Verdict` (see
    there for the rule)."""
    from collections import Counter

    dets = {name: r.detection if isinstance(r, DetectResult) else r for name, r in results.items()}
    tested = [name for name, d in dets.items() if d.p_value is not None]
    ruled = [name for name in dets if name not in tested]
    level = alpha / max(1, len(tested))
    significant = [name for name, d in dets.items()
                   if (d.p_value < level if d.p_value is not None else d.backdoored)]
    votes: Counter[int] = Counter()
    first: dict[int, int] = {}
    for i, name in enumerate(significant):
        for rank, y in enumerate(dets[name].flagged):
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
