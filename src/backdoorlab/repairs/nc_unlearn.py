"""Neural Cleanse unlearning (Wang et al., IEEE S&P 2019, Section VI.C): fine-tune on the
defender's clean data where a share of the images carry a reversed trigger and keep their true
label, so the network unlearns the shortcut."""

from __future__ import annotations

from dataclasses import dataclass

from backdoorlab.options import opt
from backdoorlab.registry import register
from backdoorlab.repairs import DefenderData, Repaired


@dataclass
class Options:
    share: float = opt(0.2, "share of the tuning images stamped with a reversed trigger (paper: 20 %)",
                       low=0, high=1, low_open=True)
    epochs: int = opt(5, "unlearning epochs", low=1, high=100_000)
    lr: float = opt(1e-4, "learning rate", low=0, high=10, low_open=True)
    batch_size: int = opt(64, "batch size", low=1)
    seed: int = opt(0, "seed", low=0)


@register("nc-unlearn", "repair", Options,
          paper="Wang et al., Neural Cleanse, IEEE S&P 2019 (unlearning, Section VI.C)",
          summary="fine-tune with reversed triggers stamped on clean images, true labels kept",
          needs=("clean", "triggers"))
def run(clf, data: DefenderData, o: Options) -> Repaired:
    from backdoorlab.defenses.nc_mitigation import unlearn
    from backdoorlab.train import TrainConfig

    labels = data.labels()
    cfg = TrainConfig(epochs=o.epochs, lr=o.lr, batch_size=o.batch_size, schedule="none", seed=o.seed)
    model = unlearn(clf, data.clean, data.triggers, labels, share=o.share, cfg=cfg, seed=o.seed)
    return Repaired(model, {"labels": labels}, summary=f"unlearned trigger(s) of {labels}")
