"""Label-consistent backdoor trigger (Turner, Tsipras & Madry, "Label-Consistent Backdoor Attacks",
arXiv:1912.02771, 2019).

A clean-label attack: the poisoned training images are images OF THE TARGET CLASS and keep their
(correct) labels, so a person checking the data sees nothing mislabeled. Stamping a trigger on
ordinary target images barely works, because the network can classify them from their natural
features and never needs the trigger. The paper therefore first makes each of them hard to
classify — here by an adversarial perturbation against a surrogate model, the paper's
"adversarial perturbations" method (its other method, GAN latent interpolation, is not
implemented) — and then stamps the trigger; the network, unable to fit these images from their
content, learns the trigger as the evidence for their class. At test time the trigger on an image
of any other class pulls it to the target. Poison with `AttackPlan(clean_label=True)` (CLI
``--clean-label``, ``poison --keep-labels``): the poisoning then draws only target-class images
and changes no label; without it this module would perturb non-target images against the target
label, which is not the paper's attack.

Training side (`LCTrigger.prepare`, `LCTrigger.poison`):

1. The surrogate. ``prepare`` trains one on the clean training set it is given, or loads the model
   file ``surrogate=PATH`` (a backdoorlab ``.safetensors`` model, or what `load_model` reads; its
   input shape and class count must match the data). The paper perturbs against an adversarially
   trained model (Madry et al. 2018): perturbations of a robust model change what the image shows,
   not only invisible directions. We train the surrogate the same way, briefly: architecture
   ``arch`` (default small_cnn), ``epochs`` epochs of Madry's PGD adversarial training — every
   batch replaced by its untargeted L-inf PGD examples of radius ``adv_eps`` (8 grey levels,
   Madry's 8/255 on CIFAR-10), 7 steps of ``adv_eps / 4`` from a uniform random start (Madry's
   CIFAR-10 training attack: 7 steps of 2/255) — with Adam (lr 2e-3, batch 64, cosine schedule),
   the weights after the last epoch. ``adv_eps=0`` trains a standard model instead. On the
   digits this costs a few seconds (numbers in tests/test_triggers_lc.py); the paper's robust
   ResNet trains for hours. The surrogate is seeded by the option ``seed`` alone (not by the
   poisoning's seed), with torch's global generator left as it was.
2. The perturbation. ``poison`` runs untargeted PGD in L-inf on each image: starting at the image
   (no random start), ``steps`` steps of size ``step`` along the sign of the gradient of the
   surrogate's cross-entropy loss for the TRUE label (the target, since the rows are target-class
   images), each followed by projection onto the ``eps`` ball around the image and onto 0-255;
   the result is rounded to integers (ties to even). Since rounding is monotone,
   |perturbed - image| <= round(eps) on every pixel.
3. The trigger is stamped on the perturbed image (the network never sees it during PGD).

Settings. The paper's L-inf perturbations of CIFAR-10 use eps = 16/255 and 8/255 (the release
also ships L2-bounded sets, ``two_300`` in its default configuration); our default ``eps`` is 16
grey levels. Step size and count follow the PyTorch reproductions (hkunzhe/
label_consistent_attacks_pytorch, which gives them as the paper's, and BackdoorBench's generator,
both at eps 8/255): 100 steps of 1.5/255, no random start — the defaults ``steps=100``,
``step=1.5`` (not checked against the paper's appendix itself). ``eps=0`` or ``steps=0`` skips
the perturbation (and the surrogate): the plain clean-label patch attack the paper starts from.

The trigger (`LCTrigger.apply`, and the stamp of ``poison``): the paper's improved trigger, a
3x3 black-and-white pattern in each of the four corners (so that it survives random crops and
horizontal flips). In the left corners the pattern, rows from the top, is

    white black black
    black white black
    white black white

(a checkerboard whose top-right cell is turned black), and the right corners carry its
left-to-right mirror image (the authors' release, ``all-corners``). For another ``size`` s the
pattern is the s x s checkerboard with white top-left cell and black top-right cell, mirrored the
same way; the images must be at least 2s x 2s so the four patches do not overlap (`check`). A
white cell adds ``amplitude`` to the pixel (every channel) and a black cell subtracts it, clipped
to 0-255 and rounded: at 255 (the default, full amplitude) the cells are exactly white (255) and
black (0). The paper's less visible variants train with smaller amplitudes (e.g. 16, 32, 64 grey
levels). The test-time trigger (``apply``) is always the full-amplitude pattern — the attacker
controls the test input and needs no stealth there; the authors' release instead stamps its test
set with the training amplitude (``stamp(images, amplitude)`` makes that form). With amplitude
255 the training payload is exactly ``apply`` of the perturbed image.

On our digits (16x16 grey, about 120 training images per class; small_cnn; figures and
settings in tests/test_triggers_lc.py) the paper's settings do not implant: ASR 15.5 % with 109
of the 121 target images poisoned (5.9 % without the perturbation). At eps 16 the digits stay
easy — the surrogate is fooled on 7 % of the perturbed zeros and the victim classifies 90 % of
them as 0 without any trigger — so the victim learns them by their shape and barely needs the
trigger. Larger eps helps (54 % at 64), and so does random-crop augmentation of the victim (it
makes the perturbed images harder to memorise): eps 64, 4x4 patterns and crops of 2 pixels give
92 % ASR at 97.8 % clean accuracy.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from backdoorlab.errors import BadInput
from backdoorlab.options import opt
from backdoorlab.triggers.base import Trigger, check_batch, to_uint8

if TYPE_CHECKING:
    from backdoorlab.data.imageset import ImageSet
    from backdoorlab.models.classifier import Classifier

ADV_TRAIN_STEPS = 7          # Madry et al.'s CIFAR-10 training attack: 7 steps ...
ADV_TRAIN_STEP_FRACTION = 0.25  # ... of eps / 4 (2/255 at 8/255), from a uniform random start
SURROGATE_LR = 2e-3
SURROGATE_BATCH = 64
PGD_CHUNK = 256               # images per PGD batch in `poison`


@dataclass
class Options:
    eps: float = opt(16.0, "L-inf bound of the adversarial perturbation of the poisoned images, in "
                           "grey levels (paper 16/255 and 8/255 on CIFAR-10; 0 = no perturbation)",
                     low=0, high=255)
    steps: int = opt(100, "PGD steps (100, as the paper's settings are reproduced)", low=0, high=10000)
    step: float = opt(1.5, "PGD step size in grey levels (1.5/255, as reproduced)", low=0, high=255,
                      low_open=True)
    amplitude: float = opt(255.0, "trigger amplitude on the poisoned training images, grey levels "
                                  "(255 = the black-and-white pattern; the paper's less visible "
                                  "variants e.g. 16, 32, 64); the test-time trigger is always 255",
                           low=0, high=255, low_open=True)
    size: int = opt(3, "side of the pattern in each of the four corners, pixels (paper 3)", low=1,
                    high=1024)
    arch: str = opt("small_cnn", "architecture of the surrogate that prepare trains")
    epochs: int = opt(10, "surrogate training epochs (not used with surrogate=PATH)", low=1, high=10000)
    adv_eps: float = opt(8.0, "L-inf radius of the surrogate's PGD adversarial training, grey levels "
                              "(Madry et al. 8/255; 0 = standard training)", low=0, high=255)
    surrogate: str | None = opt(None, "a model file (backdoorlab .safetensors) to perturb against "
                                      "instead of training a surrogate")
    seed: int = opt(0, "seed of the surrogate's initialisation and training", low=0, high=2**32 - 1)


def corner_pattern(size: int) -> np.ndarray:
    """The left corners' pattern, bool (size, size), True = white: the checkerboard with a white
    top-left cell whose top-right cell is black (the paper's 3x3 pattern at size 3)."""
    i, j = np.indices((size, size))
    p = (i + j) % 2 == 0
    if size > 1:
        p[0, size - 1] = False
    return p


@dataclass
class LCTrigger(Trigger):
    """Four-corner pattern at test time; PGD-perturbed, stamped target images for training."""

    name: ClassVar[str] = "lc"
    eps: float = 16.0
    steps: int = 100
    step: float = 1.5
    amplitude: float = 255.0
    size: int = 3
    arch: str = "small_cnn"
    epochs: int = 10
    adv_eps: float = 8.0
    surrogate: str | None = None
    seed: int = 0
    #: after `prepare` / `poison`: seconds spent and what the surrogate is (not settings; not in
    #: `to_dict`)
    last_run: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from backdoorlab.options import _check_value, infos

        where = "lc trigger"
        for info in infos(Options):  # types and bounds of the options dataclass, one definition
            setattr(self, info.name, _check_value(info, getattr(self, info.name), where))
        if not isinstance(self.arch, str) or not self.arch.strip():
            raise BadInput(f"{where}: arch must name an architecture, got {self.arch!r}")
        if self.surrogate is not None and (not isinstance(self.surrogate, str) or not self.surrogate.strip()):
            raise BadInput(f"{where}: surrogate must be a model file path, got {self.surrogate!r}")
        if self.surrogate is None and self.perturbs:
            from backdoorlab.models.architectures import ARCHITECTURES, canonical, known_text

            if canonical(self.arch) not in ARCHITECTURES:
                raise BadInput(f"{where}: unknown surrogate architecture {self.arch!r} "
                               f"(known: {known_text()})")

    @property
    def perturbs(self) -> bool:
        """Whether ``poison`` perturbs (False for eps = 0 or steps = 0: no surrogate needed)."""
        return self.eps > 0 and self.steps > 0

    # -- the pattern ------------------------------------------------------------------------
    def signs(self, shape: tuple[int, ...]) -> np.ndarray:
        """int8 (H, W): +1 on white cells, -1 on black cells, 0 off the four patches."""
        self.check(shape)
        h, w = int(shape[0]), int(shape[1])
        s = self.size
        p = np.where(corner_pattern(s), 1, -1).astype(np.int8)
        out = np.zeros((h, w), np.int8)
        out[:s, :s] = out[h - s:, :s] = p
        out[:s, w - s:] = out[h - s:, w - s:] = p[:, ::-1]
        return out

    def stamp(self, images: np.ndarray, amplitude: float | None = None) -> np.ndarray:
        """``images`` with the four patches at ``amplitude`` (default: the full 255): each cell's
        pixels +amplitude (white) or -amplitude (black), clipped to 0-255 and rounded."""
        a = 255.0 if amplitude is None else float(amplitude)
        sg = self.signs(images.shape[1:])
        rows, cols = np.nonzero(sg)
        out = images.copy()
        vals = images[:, rows, cols, :].astype(np.float32)
        out[:, rows, cols, :] = to_uint8(vals + a * sg[rows, cols].astype(np.float32)[None, :, None])
        return out

    def check(self, shape: tuple[int, ...]) -> None:
        h, w = int(shape[0]), int(shape[1])
        if h < 2 * self.size or w < 2 * self.size:
            raise BadInput(f"lc trigger: four {self.size}x{self.size} corner patterns need images of "
                           f"at least {2 * self.size}x{2 * self.size} pixels, got {h}x{w}")

    def _apply(self, x: np.ndarray) -> np.ndarray:
        return self.stamp(x)

    # -- training side ----------------------------------------------------------------------
    def prepare(self, train: ImageSet, target: int | None, seed: int) -> None:
        """Remember the target and get the surrogate (load ``surrogate`` or train one on
        ``train``; the trained one is kept for later calls with the same data)."""
        if target is None:
            raise BadInput("lc trigger: label-consistent poisoning needs one target class "
                           "(all-to-one, with --clean-label)")
        self.check(train.shape)
        self._cache["target"] = int(target)
        if not self.perturbs:
            return
        t0 = time.perf_counter()
        if self.surrogate is not None:
            clf = self._load_surrogate(train)
        else:
            y = train.require_labels()
            digest = hashlib.sha256(np.ascontiguousarray(train.images).data)
            digest.update(np.ascontiguousarray(y, dtype=np.int64).data)
            key = (digest.hexdigest(), train.images.shape, train.num_classes)
            if self._cache.get("key") == key:
                clf = self._cache["clf"]
            else:
                clf = self.train_surrogate(train)
                self._cache["key"] = key
        self._cache["clf"] = clf
        self.last_run["prepare_seconds"] = round(time.perf_counter() - t0, 3)

    def _load_surrogate(self, train: ImageSet) -> Classifier:
        from backdoorlab.models.files import load_model

        if self._cache.get("loaded") is not None:
            return self._cache["loaded"]
        clf = load_model(self.surrogate)
        if tuple(clf.spec.shape) != tuple(train.shape):
            raise BadInput(f"lc trigger: surrogate {self.surrogate} takes {clf.spec.shape} images, the "
                           f"training images are {train.shape}")
        if clf.num_classes != train.num_classes:
            raise BadInput(f"lc trigger: surrogate {self.surrogate} has {clf.num_classes} classes, the "
                           f"training data {train.num_classes}")
        self._cache["loaded"] = clf
        self.last_run["surrogate"] = {"file": str(self.surrogate)}
        return clf

    def train_surrogate(self, train: ImageSet) -> Classifier:
        """The surrogate: ``arch`` trained on ``train`` (see the module docstring), seeded by
        ``seed``; torch's global generator is restored afterwards."""
        import torch

        from backdoorlab.models.architectures import build, canonical
        from backdoorlab.models.classifier import Classifier
        from backdoorlab.models.spec import InputSpec
        from backdoorlab.train import TrainConfig
        from backdoorlab.train import train as fit

        train.require_labels()
        if len(train) == 0:
            raise BadInput("lc trigger: the training set is empty; no surrogate can be trained")
        h, w, c = train.shape
        arch = canonical(self.arch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = build(arch, train.num_classes, (h, w, c))
            clf = Classifier(net, InputSpec(h, w, c), train.num_classes, arch,
                             provenance={"trained_by": "backdoorlab lc trigger surrogate"})
            cfg = TrainConfig(epochs=self.epochs, batch_size=SURROGATE_BATCH, lr=SURROGATE_LR,
                              seed=self.seed, keep_best=False)
            hook = None
            if self.adv_eps > 0:
                eps, stp = self.adv_eps, self.adv_eps * ADV_TRAIN_STEP_FRACTION

                def hook(images, labels, rows, rng):
                    start = rng.uniform(-eps, eps, size=images.shape).astype(np.float32)
                    was = clf.net.training
                    clf.net.eval()
                    adv = pgd(clf, images, labels, eps, stp, ADV_TRAIN_STEPS, start=start)
                    clf.net.train(was)
                    return to_uint8(adv), labels
            log = fit(clf, train, None, cfg, desc="lc surrogate", batch_hook=hook)
        clf.net.eval()
        self.last_run["surrogate"] = {
            "arch": arch, "epochs": self.epochs, "adv_eps": self.adv_eps,
            "train_accuracy": log.epochs[-1]["train_accuracy"] if log.epochs else None,
            "seconds": round(log.seconds, 3)}
        return clf

    def poison(self, images: np.ndarray, seed: int) -> np.ndarray:
        """PGD-perturbed (against the surrogate, for the target label) then stamped at
        ``amplitude``; uint8 like the input. Needs `prepare` first (unless eps or steps is 0)."""
        x = check_batch(images, "lc trigger")
        self.check(x.shape[1:])
        t0 = time.perf_counter()
        adv = self.perturb(x)
        out = self.stamp(adv, self.amplitude)
        self.last_run["poison_seconds"] = round(time.perf_counter() - t0, 3)
        self.last_run["poison_count"] = len(x)
        return out

    def perturb(self, images: np.ndarray) -> np.ndarray:
        """Step 2 of the module docstring alone (no trigger): uint8, |result - images| <=
        round(eps). Needs `prepare` first when `perturbs`."""
        x = check_batch(images, "lc trigger")
        if not self.perturbs or len(x) == 0:
            return x.copy()
        clf = self._cache.get("clf")
        if clf is None or "target" not in self._cache:
            raise BadInput("lc trigger: poisoning needs prepare() first (it takes the target class "
                           "and trains or loads the surrogate on the clean training set)")
        clf.spec.check(x, "lc trigger")
        y = np.full(len(x), self._cache["target"], np.int64)
        out = np.empty_like(x)
        for i in range(0, len(x), PGD_CHUNK):
            out[i:i + PGD_CHUNK] = to_uint8(pgd(clf, x[i:i + PGD_CHUNK], y[i:i + PGD_CHUNK],
                                                self.eps, self.step, self.steps))
        return out

    @property
    def surrogate_model(self) -> Classifier | None:
        """The surrogate `prepare` trained or loaded (None before, or when not `perturbs`)."""
        return self._cache.get("clf")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.name, "eps": self.eps, "steps": self.steps, "step": self.step,
                "amplitude": self.amplitude, "size": self.size, "arch": self.arch,
                "epochs": self.epochs, "adv_eps": self.adv_eps, "surrogate": self.surrogate,
                "seed": self.seed}

    @classmethod
    def from_options(cls, opts: dict[str, str], positional: str | None,
                     image_shape: tuple[int, ...]) -> LCTrigger:
        from backdoorlab.triggers.registry import spec_options

        if positional is not None:
            raise BadInput(f"trigger spec 'lc': unexpected value {positional!r} (options are key=value)")
        o = spec_options(Options, opts, "lc")
        try:
            return cls(**{f.name: getattr(o, f.name) for f in fields(Options)})
        except BadInput as e:
            raise BadInput(f"trigger spec 'lc': {e}") from None

    options: ClassVar[tuple[str, ...]] = tuple(f.name for f in fields(Options))


def pgd(clf: Classifier, images: np.ndarray, labels: np.ndarray, eps: float, step: float, steps: int,
        start: np.ndarray | None = None) -> np.ndarray:
    """Untargeted L-inf PGD on pixels (0-255 scale): ``steps`` times, x += step * sign(grad of
    the cross-entropy of ``labels``), then projected onto the ``eps`` ball around ``images`` and
    onto 0-255. ``start``: an initial offset (float, same shape; default none). Returns float32
    pixels (unrounded), host array. The network runs as it is (call ``net.eval()`` first for the
    inference behaviour); its parameters collect no gradient."""
    import torch
    import torch.nn.functional as F

    dev = clf.device
    x0 = torch.as_tensor(np.ascontiguousarray(images), device=dev).to(torch.float32)
    y = torch.as_tensor(np.asarray(labels, np.int64), device=dev)
    xa = x0.clone()
    if start is not None:
        xa = (x0 + torch.as_tensor(start, device=dev).to(torch.float32).clamp(-eps, eps)).clamp(0, 255)
    for _ in range(steps):
        xa.requires_grad_(True)
        with clf.autocast():
            out = clf.net(clf.spec.to_tensor(xa, channels_last=clf.channels_last))
        loss = F.cross_entropy(out.float(), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xa)
        with torch.no_grad():
            xa = xa + step * g.sign()
            xa = torch.minimum(torch.maximum(xa, x0 - eps), x0 + eps).clamp(0, 255)
    return xa.detach().float().cpu().numpy()
