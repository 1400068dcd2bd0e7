"""A plain, fast, seeded training loop for `Classifier`s on uint8 `ImageSet`s.

Best-on-validation checkpointing: the weights with the highest accuracy on the *clean validation*
set are kept (never the test set). Used for clean and backdoored models and for fine-tuning.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from backdoorlab.augment import augment
from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput
from backdoorlab.evaluation import accuracy
from backdoorlab.models.classifier import Classifier, pixel_factor
from backdoorlab.progress import progress
from backdoorlab.triggers.base import BatchHook, TrainHook


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | step | none
    step_size: int = 10
    gamma: float = 0.1
    crop_padding: int = 0
    flip: bool = False
    seed: int = 0
    label_smoothing: float = 0.0
    keep_best: bool = True  # restore the epoch with the best clean validation accuracy


@dataclass
class TrainLog:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    # or the best ``score`` when `train` was given one (a float, or a tuple compared in order)
    best_valid_accuracy: float | tuple[float, ...] = float("nan")
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=True)
    raise BadInput(f"unknown optimizer {cfg.optimizer!r} (adam, sgd)")


def _lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))
    if cfg.schedule == "step":
        return cfg.gamma ** (step // max(1, cfg.step_size))
    if cfg.schedule == "none":
        return 1.0
    raise BadInput(f"unknown schedule {cfg.schedule!r} (cosine, step, none)")


def train(clf: Classifier, data: ImageSet, valid: ImageSet | None = None,
          cfg: TrainConfig | None = None, desc: str = "train",
          params: list[nn.Parameter] | None = None,
          after_step: Callable[[], None] | None = None,
          score: Callable[[], tuple[float | tuple[float, ...], dict]] | None = None,
          batch_hook: BatchHook | None = None, train_hook: TrainHook | None = None) -> TrainLog:
    """Train ``clf.net`` in place on ``data``; keep the best weights on ``valid``.

    ``params`` restricts which parameters are updated (default: all); ``after_step`` runs after
    every optimiser step (e.g. to re-apply a sparsity mask). ``score`` replaces validation accuracy
    as what picks the epoch to keep: called in eval mode before training (epoch 0, the model as
    given, which may be kept) and after every epoch, it returns (score, figures to log); the highest
    score wins, the earliest epoch among equal ones (a tuple score is compared element by element,
    so later elements break ties of the first). ``batch_hook``
    (`backdoorlab.triggers.base.BatchHook`) rewrites each batch before augmentation — the one
    place where training-time attacks (WaNet's noise mode, BPP's negative samples) change the
    loop; it gets the uint8 images, labels, row numbers and a generator
    seeded from ``cfg.seed``. ``train_hook`` (`backdoorlab.triggers.base.TrainHook`) is its
    differentiable counterpart, after augmentation, for a trigger trained with the network (its
    extra loss is added, its own optimiser stepped after each backward pass). Returns a `TrainLog`
    with per-epoch loss, training and validation accuracy.
    """
    cfg = cfg or TrainConfig()
    y_all = data.require_labels()
    if len(data) == 0:
        raise BadInput("training data is empty")
    clf.spec.check(data.images, f"training data {data.name!r}")
    if y_all.max() >= clf.num_classes:
        raise BadInput(f"training label {int(y_all.max())} out of range for {clf.num_classes} "
                       "classes")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)  # CPU-only: host permutations and crops
    hook_rng = np.random.default_rng([cfg.seed, 0x5EED])  # the batch hook's own draws
    net = clf.net
    opt = _optimizer(params if params is not None else net.parameters(), cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    x_all = torch.from_numpy(data.images)
    y_t = torch.from_numpy(y_all)
    n = len(data)
    log = TrainLog(config=asdict(cfg))
    best_state = None
    best_hook: dict | None = None
    start = time.perf_counter()
    if score is not None and cfg.keep_best:
        net.eval()
        s0, info = score()
        log.epochs.append({"epoch": 0, "score": s0, **info})
        log.best_valid_accuracy, log.best_epoch = s0, 0
        best_state = copy.deepcopy(net.state_dict())
        best_hook = copy.deepcopy(train_hook.state_dict()) if train_hook is not None else None
    for epoch in range(cfg.epochs):
        for g, base in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = base * _lr_factor(cfg, epoch, cfg.epochs)
        net.train()
        if train_hook is not None:
            train_hook.train(True)
        perm = torch.randperm(n, generator=gen)
        total_loss, correct = 0.0, 0
        batches = range(0, n, cfg.batch_size)
        for i in progress(batches, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}",
                          total=len(batches), unit="batch"):
            idx = perm[i:i + cfg.batch_size]
            xb, yb = x_all[idx], y_t[idx]
            if batch_hook is not None:
                hx, hy = batch_hook(xb.cpu().numpy(), yb.cpu().numpy(), idx.cpu().numpy(), hook_rng)
                xb, yb = torch.from_numpy(np.ascontiguousarray(hx)), torch.from_numpy(hy)
            xb = augment(xb, gen, cfg.crop_padding, cfg.flip)
            yb = yb.to(clf.device, non_blocking=True)
            extra = None
            with clf.autocast():
                if train_hook is None:
                    out = net(clf.to_tensor(xb))
                else:  # pixels in [0, 1] through the hook, then the network's own input mapping
                    scale = pixel_factor(xb) / 255.0  # read as `to_tensor` reads the batch
                    x01 = xb.to(clf.device).permute(0, 3, 1, 2).float().mul(scale)
                    x01, yb, extra = train_hook(x01, yb, idx.cpu().numpy())
                    out = net(clf.spec.from_unit(x01).contiguous(memory_format=torch.channels_last))
                loss = loss_fn(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            if train_hook is not None:
                train_hook.zero_grad()
            (loss if extra is None else loss + extra).backward()
            opt.step()
            if train_hook is not None:
                train_hook.step()
            if after_step is not None:
                after_step()
            total_loss += loss.item() * len(idx)
            correct += int((out.argmax(1) == yb).sum())
        net.eval()
        if train_hook is not None:
            train_hook.train(False)
        entry = {"epoch": epoch + 1, "loss": total_loss / n, "train_accuracy": correct / n,
                 "lr": opt.param_groups[0]["lr"]}
        if score is not None:
            va, info = score()
            entry.update(score=va, **info)
        elif valid is not None and len(valid):
            va = accuracy(clf, valid)
            entry["valid_accuracy"] = va
        else:
            va = None
        if va is not None and cfg.keep_best and (best_state is None or va > log.best_valid_accuracy):
            log.best_valid_accuracy, log.best_epoch = va, epoch + 1
            best_state = copy.deepcopy(net.state_dict())
            best_hook = copy.deepcopy(train_hook.state_dict()) if train_hook is not None else None
        log.epochs.append(entry)
    if best_state is not None:
        net.load_state_dict(best_state)
        if train_hook is not None and best_hook is not None:
            train_hook.load_state_dict(best_hook)
    net.eval()
    log.seconds = time.perf_counter() - start
    return log


def seeded_init(seed: int) -> None:
    """Seed torch and numpy global generators (for building a fresh network deterministically)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
