"""Neural Cleanse input filter (Wang et al., IEEE S&P 2019, Section VI.A) as a GoodNet-style
repair: a model with one extra class N that answers N when the mean activation of the channels
the reversed trigger excites most exceeds a threshold set on the defender's clean data (at most
``false_positive_rate`` of it flagged; the paper's 5 %). ASR after = poisoned inputs still
answered with their target; clean accuracy counts a flagged clean input as wrong."""

from __future__ import annotations

from dataclasses import dataclass

from backdoorlab.options import opt
from backdoorlab.registry import register
from backdoorlab.repairs import DefenderData, Repaired


@dataclass
class Options:
    false_positive_rate: float = opt(0.05, "share of the clean data the threshold may flag", low=0,
                                     high=1, low_open=True, high_open=True)
    top_fraction: float = opt(0.1, "share of the layer's channels whose activation is watched", low=0,
                              high=1, low_open=True)


@register("nc-filter", "repair", Options,
          paper="Wang et al., Neural Cleanse, IEEE S&P 2019 (input filter, Section VI.A)",
          summary="answer class N for inputs that excite the reversed trigger's channels",
          needs=("clean", "triggers"),
          paper_setting=("flag inputs whose top 1 % trigger-sensitive neurons fire above a threshold set at "
                         "5 % false positives on clean data (Wang et al. 2019, Section VI.A)"))
def run(clf, data: DefenderData, o: Options) -> Repaired:
    from backdoorlab.defenses.nc_mitigation import make_filter

    labels = data.labels()
    model = make_filter(clf, data.clean, data.triggers, labels, false_positive_rate=o.false_positive_rate,
                        top_fraction=o.top_fraction)
    return Repaired(model, {"labels": labels}, summary=f"filter on the trigger(s) of {labels}; N = "
                    f"{clf.num_classes}")
