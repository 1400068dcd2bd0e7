"""Input-aware dynamic backdoor (Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack", NeurIPS 2020).

The trigger is not a fixed pattern but a function of the input: a generator network G draws a
pattern G(x) for each image x and a mask network M chooses where it goes, and the backdoored
image is

    x' = x + (G(x) - x) ⊙ M(x)          (pixels in [0, 1]; M(x) in [0, 1], one channel)

so every input carries its own trigger. Two regularisers make the triggers input-specific: a
diversity loss ||x1 - x2|| / ||G(x1) - G(x2)|| (per-image root mean square, averaged) keeps
different inputs from sharing a pattern, and "cross-trigger" samples — x1 stamped with x2's
pattern and mask, label kept — teach the classifier that a trigger made for another image does
nothing. A trigger therefore cannot be reused: the paper's defining property, measured here as
the share of cross-stamped images that keep their true label (`cross_accuracy`).

Training, as the paper and its release describe it:

1. ``prepare`` trains M alone on the clean training set (``mask_epochs``, paper 25; Adam lr 0.01,
   betas 0.5/0.9, learning rate ×0.1 at 40 % and 80 % of the epochs — the release's milestones 10
   and 20 of 25): the loss is λ_norm · mean(relu(M(x) - density)) + λ_div · diversity(M), so the
   masks cover about ``mask_density`` of the image (paper 0.032) and differ between images. M's
   output goes through the release's soft threshold tanh(20 m - 10) / 2 + 0.5 (m in [0, 1]).
2. G and the classifier are then trained together through the trainer's `TrainHook`: in every
   batch, the poisoned rows (relabelled to the target by the poisoning) take the pixels of
   randomly drawn training images stamped with their own G(x) and M(x) — fresh images at every
   step, as the release stamps a random tenth of each batch, so that the classifier learns the
   trigger and cannot memorise a fixed set of images as the target; a ``cross_rate`` share of the
   other rows is stamped with the pattern and mask of a randomly drawn training image (labels
   kept); the loss is the classifier's cross-entropy on the whole batch plus λ_div · diversity(G)
   between the poisoned rows and those drawn images. G has its own Adam (lr 0.01, betas 0.5/0.9);
   M stays fixed. The attack keeps the last epoch (as the release does; picking the epoch by clean
validation accuracy would keep an early one, before the trigger is learnt).

Networks: the release's encoder-decoder, ``steps`` times (two 3x3 conv + BN + ReLU, 2x2 max
pool) from ``width`` channels doubling, a middle block, then ``steps`` times (2x nearest upsample,
two conv blocks, halving), the last conv without ReLU, tanh / 2 + 0.5 → [0, 1]. Sizes that do not
divide by 2**steps are resized back to the input size at the end.

Differences from the release (stated, not hidden): the number of backdoored samples per batch
follows the poisoned rows the batch holds (``rate`` of the set; the release: exactly 10 % of each
batch), and those samples are drawn from the whole training set without augmentation; the stored
training set holds the poisoned rows' labels but not their stamped pixels (made afresh per step),
so data inspectors have nothing to find in it; the cross partners are random training images
per batch (the release pairs each batch with one from a second shuffled loader); the classifier
keeps backdoorlab's own optimiser and schedule (the release: SGD lr 0.01 for 600 epochs with
random crop 5 and rotation 10); G's learning rate stays constant over the trainer's epochs (the
release lowers it at epochs 200-500).

``apply`` needs the trained G and M, so this trigger only works inside `backdoorlab attack` (which
trains them and then writes the poisoned test sets); applied before that it refuses. The
generators' weights live in the trigger object of that run.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from backdoorlab.errors import BadInput
from backdoorlab.options import opt
from backdoorlab.triggers.base import TrainHook, Trigger, check_batch


@dataclass
class Options:
    mask_density: float = opt(0.032, "share of the image the masks should cover (paper 0.032)", low=0,
                              high=1, low_open=True)
    cross_rate: float = opt(0.1, "share of each batch stamped with another image's trigger, labels "
                                 "kept (paper p_cross 0.1)", low=0, high=1)
    lambda_div: float = opt(1.0, "weight of the diversity loss (paper 1)", low=0, high=1000)
    lambda_norm: float = opt(100.0, "weight of the mask density loss (paper 100)", low=0, high=1e6)
    mask_epochs: int = opt(25, "epochs of mask-network training before the attack (paper 25)", low=0,
                           high=1000)
    lr: float = opt(0.01, "Adam learning rate of both generators (paper 0.01, betas 0.5/0.9)", low=0,
                    high=10, low_open=True)
    width: int = opt(32, "channels of the generators' first block (paper 32; 16 on MNIST)", low=1,
                     high=512)
    steps: int = opt(3, "down/up-sampling steps of the generators (paper 3; 2 on MNIST)", low=1, high=6)
    batch_size: int = opt(128, "images per step of the mask training (paper 128)", low=1, high=65536)
    seed: int = opt(0, "seed of the generators' initial weights and of the mask training's order",
                    low=0, high=2**32 - 1)


EPS = 1e-7


def _block(c_in: int, c_out: int, relu: bool = True):
    import torch.nn as nn

    layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def generator(channels: int, out_channels: int, width: int, steps: int):
    """The release's encoder-decoder; output in [0, 1] (tanh / 2 + 0.5), resized to the input."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Generator(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            down, c = [], channels
            for i in range(steps):
                nxt = width * 2 ** i
                down += [_block(c, nxt), _block(nxt, nxt), nn.MaxPool2d(2)]
                c = nxt
            self.down = nn.Sequential(*down)
            self.middle = _block(c, c)
            up = []
            for i in range(steps):
                nxt = out_channels if i == steps - 1 else c // 2
                up += [nn.Upsample(scale_factor=2, mode="nearest"), _block(c, c),
                       _block(c, nxt, relu=i != steps - 1)]
                c = nxt
            self.up = nn.Sequential(*up)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, w = x.shape[2:]
            pad_h, pad_w = (-h) % 2 ** steps, (-w) % 2 ** steps
            y = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
            y = self.up(self.middle(self.down(y)))[:, :, :h, :w]
            return torch.tanh(y) / (2 + EPS) + 0.5

    return Generator()


def threshold(m):
    """The release's soft threshold of the mask network's output (m in [0, 1])."""
    import torch

    return torch.tanh(m * 20 - 10) / (2 + EPS) + 0.5


def diversity(x1, x2, p1, p2):
    """mean over pairs of rms(x1 - x2) / (rms(p1 - p2) + eps): small when different inputs get
    different patterns (masks)."""
    d_x = (x1 - x2).pow(2).mean(dim=(1, 2, 3)).sqrt()
    d_p = (p1 - p2).pow(2).mean(dim=(1, 2, 3)).sqrt()
    return (d_x / (d_p + EPS)).mean()


@contextlib.contextmanager
def _seeded(seed: int):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass
class InputAwareTrigger(Trigger):
    """Each image gets its own pattern G(x) where its own mask M(x) says (see the module docstring);
    G and M are trained by `backdoorlab attack` with the classifier."""

    name: ClassVar[str] = "input-aware"
    trained_with_network: ClassVar[bool] = True
    mask_density: float = 0.032
    cross_rate: float = 0.1
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    mask_epochs: int = 25
    lr: float = 0.01
    width: int = 32
    steps: int = 3
    batch_size: int = 128
    seed: int = 0
    #: the generators and what their training measured (set by `prepare` and the train hook)
    nets: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    last_run: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from backdoorlab.options import _check_value, infos

        for info in infos(Options):  # types and bounds of the options dataclass, one definition
            setattr(self, info.name, _check_value(info, getattr(self, info.name), "input-aware trigger"))

    def check(self, shape: tuple[int, ...]) -> None:
        h, w = shape[:2]
        if min(h, w) < 2 ** self.steps:
            raise BadInput(f"input-aware trigger: {h}x{w} images are too small for steps={self.steps} "
                           f"(each side needs at least {2 ** self.steps} pixels)")

    # -- the mask network (before the attack) -----------------------------------------------

    def prepare(self, train, target: int | None, seed: int) -> None:
        """Train the mask network M on the clean training images (module docstring, step 1)."""
        import time

        import torch

        from backdoorlab.progress import progress

        images = np.asarray(train.images)
        self.check(images.shape[1:])
        c = images.shape[3]
        t0 = time.perf_counter()
        with _seeded(self.seed):
            net_m = generator(c, 1, self.width, self.steps)
            net_g = generator(c, c, self.width, self.steps)
        self.nets = {"M": net_m, "G": net_g, "train": images}
        opt_m = torch.optim.Adam(net_m.parameters(), lr=self.lr, betas=(0.5, 0.9))
        rng = np.random.default_rng([self.seed, seed, 0x1A])
        n, bs = len(images), min(self.batch_size, len(images))
        per_epoch = max(1, n // bs)
        milestones = {round(0.4 * self.mask_epochs), round(0.8 * self.mask_epochs)}
        norm = div = float("nan")
        net_m.train()
        for epoch in progress(range(self.mask_epochs), desc="input-aware: mask network",
                              total=self.mask_epochs, unit="epoch"):
            if epoch in milestones and epoch > 0:
                for g in opt_m.param_groups:
                    g["lr"] *= 0.1
            o1, o2 = rng.permutation(n), rng.permutation(n)
            for b in range(per_epoch):
                x1 = _unit(images[o1[b * bs:(b + 1) * bs]])
                x2 = _unit(images[o2[b * bs:(b + 1) * bs]])
                m1, m2 = threshold(net_m(x1)), threshold(net_m(x2))
                loss_norm = torch.relu(m1 - self.mask_density).mean()
                loss_div = diversity(x1, x2, m1, m2)
                loss = self.lambda_norm * loss_norm + self.lambda_div * loss_div
                opt_m.zero_grad(set_to_none=True)
                loss.backward()
                opt_m.step()
                norm, div = float(loss_norm.detach()), float(loss_div.detach())
        net_m.eval()
        for p in net_m.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            sample = _unit(images[rng.choice(n, min(n, 256), replace=False)])
            density = float(threshold(net_m(sample)).mean())
        self.last_run = {"mask_seconds": round(time.perf_counter() - t0, 2), "mask_density": density,
                         "mask_norm_loss": norm, "mask_diversity_loss": div}

    def poison(self, images: np.ndarray, seed: int) -> np.ndarray:
        """Poisoned rows keep their pixels in the stored set: the train hook stamps them with the
        generator as it trains."""
        return np.array(images, copy=True)

    def train_hook(self, poisoned_rows: np.ndarray, seed: int, device: Any) -> TrainHook:
        if "M" not in self.nets:
            raise BadInput("input-aware trigger: the mask network is not trained (prepare was not run)")
        return _Hook(self, np.asarray(poisoned_rows, dtype=np.int64), seed, device)

    # -- test time -----------------------------------------------------------------------------

    def stamp(self, x01, partner01=None):
        """x + (G(p) - x) ⊙ M(p) for NCHW pixels in [0, 1], p = ``partner01`` or x itself;
        returns (stamped, G(p))."""
        src = x01 if partner01 is None else partner01
        pattern = self.nets["G"](src)
        mask = threshold(self.nets["M"](src))
        return x01 + (pattern - x01) * mask, pattern

    def _apply(self, x: np.ndarray, partners: np.ndarray | None = None) -> np.ndarray:
        import torch

        if not self.nets.get("trained"):
            raise BadInput("input-aware trigger: its generator is trained with the classifier, so it "
                           "only works inside 'backdoorlab attack' (nothing to apply yet)")
        g = self.nets["G"]
        dev = next(g.parameters()).device
        g.eval()
        out = np.empty_like(x)
        with torch.no_grad():
            for i in range(0, len(x), 256):
                xb = _unit(x[i:i + 256]).to(dev)
                pb = None if partners is None else _unit(partners[i:i + 256]).to(dev)
                y, _ = self.stamp(xb, pb)
                y = torch.round(y.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)
                out[i:i + 256] = y.cpu().numpy().reshape(out[i:i + 256].shape)
        return out

    def cross(self, images: np.ndarray, partners: np.ndarray) -> np.ndarray:
        """``images`` stamped with the triggers of ``partners`` (same count): the paper's
        cross-trigger test (a good input-aware backdoor leaves these at their true labels)."""
        x, p = check_batch(images, "input-aware cross"), check_batch(partners, "input-aware cross")
        if x.shape != p.shape:
            raise BadInput(f"input-aware cross: {x.shape} images but {p.shape} partners")
        return self._apply(x, p)

    def cross_accuracy(self, clf, test, seed: int = 0) -> float | None:
        """The paper's cross-trigger test: the share of ``test`` images, each stamped with the
        trigger of another randomly paired test image, that keep their true label (high = the
        triggers are input-specific, not reusable)."""
        labels = test.require_labels()
        if len(test) < 2:
            return None
        pair = np.random.default_rng([seed, 0x1C]).permutation(len(test))
        same = pair == np.arange(len(test))
        pair[same] = (pair[same] + 1) % len(test)
        pred = clf.predict(self.cross(test.images, test.images[pair]))
        return float(np.mean(pred == labels))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.name, **{f.name: getattr(self, f.name) for f in fields(Options)}}

    @classmethod
    def from_options(cls, opts: dict[str, str], positional: str | None,
                     image_shape: tuple[int, ...]) -> InputAwareTrigger:
        from dataclasses import asdict

        from backdoorlab.triggers.registry import spec_options

        if positional is not None:
            raise BadInput(f"trigger spec 'input-aware': unexpected value {positional!r} (options are "
                           "key=value)")
        t = cls(**asdict(spec_options(Options, opts, "input-aware")))
        t.check(tuple(image_shape))
        return t

    options: ClassVar[tuple[str, ...]] = tuple(f.name for f in fields(Options))


def _unit(images: np.ndarray):
    """uint8 NHWC → float NCHW in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)


class _Hook(TrainHook):
    """Stamps the batch's poisoned rows with their own triggers and a ``cross_rate`` share of the
    rest with random training images' triggers; adds λ_div · diversity(G); steps G's Adam."""

    def __init__(self, trig: InputAwareTrigger, rows: np.ndarray, seed: int, device: Any) -> None:
        import torch

        self.t = trig
        self.rows = rows
        self.rng = np.random.default_rng([trig.seed, seed, 0x1B])
        self.g, self.m = trig.nets["G"].to(device), trig.nets["M"].to(device)
        self.device = device
        self.opt = torch.optim.Adam(self.g.parameters(), lr=trig.lr, betas=(0.5, 0.9))
        self.train_images = trig.nets["train"]
        trig.nets["trained"] = True  # from the first step on, apply uses the (training) generator

    def __call__(self, x, y, rows):
        import torch

        n = len(rows)
        bd = np.flatnonzero(np.isin(rows, self.rows))
        rest = np.setdiff1d(np.arange(n), bd)
        k_cross = min(len(rest), int(math.floor(self.t.cross_rate * n)))
        cross = self.rng.choice(rest, size=k_cross, replace=False) if k_cross else np.zeros(0, np.int64)
        k_partner = max(len(bd), k_cross)
        if not len(bd) and not k_cross:
            return x, y, None
        draw = self.rng.integers(0, len(self.train_images), k_partner + len(bd))
        partners = _unit(self.train_images[draw[:k_partner]]).to(x.device)
        out = x.clone()
        extra = None
        pats = self.g(partners)
        if len(bd):  # fresh training images each time, so that no image can be memorised as the target
            ib = torch.from_numpy(bd).to(x.device)
            src = _unit(self.train_images[draw[k_partner:]]).to(x.device)
            stamped, pattern = self.t.stamp(src)
            out[ib] = stamped
            extra = self.t.lambda_div * diversity(src, partners[:len(bd)], pattern, pats[:len(bd)])
        if k_cross:
            ic = torch.from_numpy(cross).to(x.device)
            mask = threshold(self.m(partners[:k_cross]))
            out[ic] = x[ic] + (pats[:k_cross] - x[ic]) * mask
        return out, y, extra

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.opt.step()

    def train(self, mode: bool = True) -> None:
        self.g.train(mode)

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.g.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.g.load_state_dict(state)
