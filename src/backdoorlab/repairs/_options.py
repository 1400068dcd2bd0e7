"""Option groups several repairs share (a leading underscore: the registry does not load it as a
method)."""

from __future__ import annotations

from dataclasses import dataclass

from backdoorlab.options import opt


@dataclass
class DropOptions:
    """Prune the last conv layer (or ``layer``) until clean validation accuracy drops ``drop``."""

    drop: float = opt(4.0, "prune until clean validation accuracy drops this much", low=0, high=100,
                      low_open=True)
    drop_unit: str = opt("points", "points below the unpruned accuracy, or relative %",
                         choices=("points", "relative"))
    layer: str | None = opt(None, "layer to prune (default: the last conv layer)")


@dataclass
class TuneOptions:
    """Fine-tuning on the defender's clean data; a seeded share of it picks the best epoch."""

    epochs: int = opt(5, "fine-tuning epochs", low=0, high=100_000)
    lr: float = opt(1e-4, "fine-tuning learning rate", low=0, high=10, low_open=True)
    batch_size: int = opt(64, "fine-tuning batch size", low=1)
    optimizer: str = opt("adam", "optimizer", choices=("adam", "sgd"))
    select_fraction: float = opt(0.2, "share of the clean data that picks the best epoch", low=0, high=1,
                                 low_open=True, high_open=True)
    seed: int = opt(0, "seed", low=0)

    def train_config(self):
        from backdoorlab.train import TrainConfig

        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                           optimizer=self.optimizer, schedule="none", seed=self.seed)
