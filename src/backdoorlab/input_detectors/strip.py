"""STRIP — Gao, Xu, Wang, Chen, Ranasinghe & Nepal, "STRIP: A Defence Against Trojan Attacks on
Deep Neural Networks", ACSAC 2019 (arXiv:1902.06531), as the input detector ``strip``.

The idea: a trojan trigger dominates the network's decision whatever else is in the picture, while
a clean image's class is fragile. So perturb the input strongly and watch how much the answer
moves. For an input x, draw N images from the defender's clean (held-out) set, superimpose each of
them on x by a linear blend, classify the N blends and average the Shannon entropy (in bits) of the
N predicted class distributions. A clean input mixed with unrelated clean images gives scattered,
uncertain predictions (high entropy); a trojaned input keeps pointing at the target label (low
entropy). The score is minus that mean entropy, so that larger = more suspicious and the family's
threshold (the (1 - FAR) quantile of clean scores, `backdoorlab.input_detectors.calibrate`) is a
threshold on low entropy.

Fitting only stores the clean overlay pool (the images of ``clean``, or a seeded sample of them).
Scoring is batched: the N blends of many inputs go through the network in batches of about
``batch`` images. The overlays of input i of one ``score`` call are drawn by a generator seeded
with ``seed`` (`overlay_draws`), so a call is reproducible and does not depend on the batch size;
`loop_scores` is the plain one-input-at-a-time computation with the same draws (used by the tests
to check the batched scores and by ``benchmarks/bench_strip.py`` to measure the speed-up).

What the numbers mean: the score is −H̄ with H̄ in [0, log2(classes)] bits; a clean input typically
sits well above 0 bits, a trojaned one near 0. The detection rate is the share of poisoned inputs
scoring above the threshold set at the requested false-alarm rate (the paper's FRR) on clean data.

The superimposition: the paper says "linear blend" of the input and a clean image without giving
weights; its authors' released code adds the two with OpenCV ``addWeighted``, weights 1 and 1, on
float images in [0, 1], where that call does not clip: the sum runs to 2. BackdoorBench adds
unclipped too. That is the default, ``superimpose = "add"``: ``x + overlay`` in pixel space (up to
510 on the 0-255 scale), then the network's own input mapping, linear as for any image; it keeps
a trigger at full strength where an equal-weight mix halves it. ``superimpose = "add-clip"``
clips the sum at 255 (what the same OpenCV call does on uint8 images; our default until
2026-12-07), ``superimpose = "mix"`` uses ``(1 - alpha)·x + alpha·overlay`` (``alpha = 0.5``).
Measured (`benchmarks/bench_strip.py`, docs/detection.md), detection at 5 % false alarms: on the
GTSRB BadNets of the repair benchmark add 95.5 % (AUROC 0.972), add-clip 86.6 % (0.941), mix
88.7 % (0.930); on the tests' digits BadNet (a white 3x3 patch on grey digits, 50 overlays) add
36.7 %, add-clip 100 %, mix 44.7 % — which variant detects more depends on the model and the
trigger; the default is the authors'.

Where we differ from the paper: (1) the superimposition, above (the paper gives no weights).
(2) The threshold: the paper fits a normal distribution to the clean
entropies and takes its FRR percentile; the family uses the empirical quantile of clean scores on
a held-back part of the clean data. (3) The paper draws the overlays from held-out test images;
here they come from the clean data the defender gives (the part `fit_filter` fits on, disjoint
from the part it calibrates on). N = 100 as in the paper.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from backdoorlab.errors import BadInput
from backdoorlab.input_detectors import Scorer
from backdoorlab.options import opt
from backdoorlab.registry import register

if TYPE_CHECKING:
    from backdoorlab.data.imageset import ImageSet
    from backdoorlab.models.classifier import Classifier

PAPER = ("Gao, Xu, Wang, Chen, Ranasinghe & Nepal, STRIP: A Defence Against Trojan Attacks on Deep "
         "Neural Networks, ACSAC 2019")
STATISTIC = "negative mean prediction entropy (bits) over N superimposed copies"


@dataclass
class Options:
    copies: int = opt(100, "clean images superimposed on each input, one per copy (the paper's N)",
                      low=1, high=10_000)
    alpha: float = opt(0.5, "weight of the clean overlay in the linear blend (0.5 = equal weights)",
                       low=0, high=1, low_open=True, high_open=True)
    superimpose: str = opt("add", "add = input + overlay, not clipped, as the authors' code and "
                           "BackdoorBench (alpha unused); add-clip = the same clipped at 255; mix = "
                           "(1 - alpha)·input + alpha·overlay", choices=("add", "add-clip", "mix"))
    overlays: int = opt(0, "clean images kept as the overlay pool (a seeded sample; 0 = all given)",
                        low=0)
    batch: int = opt(256, "superimposed images per network batch (on 2 CPU cores 100-256 scored "
                     "GTSRB fastest, 2000 took 1.6-1.9x as long; a GPU wants more)", low=1)
    seed: int = opt(0, "seed of the overlay pool sample and of the overlay draws", low=0)


def overlay_draws(n_inputs: int, pool_size: int, n: int, seed: int) -> np.ndarray:
    """``(n_inputs, n)`` indices into the overlay pool: for each input, ``n`` distinct images when
    the pool holds that many (else drawn with replacement), from a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    if pool_size < 1:
        raise BadInput("STRIP: the overlay pool is empty")
    if n > pool_size:
        return rng.integers(0, pool_size, size=(n_inputs, n), dtype=np.int64)
    out = np.empty((n_inputs, n), dtype=np.int64)
    for i in range(n_inputs):
        out[i] = rng.choice(pool_size, size=n, replace=False)
    return out


def _checked(clf: Classifier, images: np.ndarray) -> tuple[np.ndarray, float]:
    """``images`` as an array of the model's shape and the factor bringing them to 0-255 pixels
    (`pixel_factor`'s rule, read once for the whole array)."""
    from backdoorlab.models.classifier import pixel_factor

    images = np.asarray(images)
    if images.ndim != 4:
        raise BadInput(f"STRIP: expected NHWC images, got an array of shape {images.shape}")
    clf.spec.check(images)
    return images, pixel_factor(images)


def mean_entropy(clf: Classifier, images: np.ndarray, factor: float, pool: np.ndarray,
                 draws: np.ndarray, alpha: float, batch: int, mode: str = "add") -> np.ndarray:
    """Mean entropy (bits) of the predictions on the pixel blends ``(1 - alpha)·images[i] +
    alpha·pool[draws[i, j]]`` (``mode="add"``: ``images[i] + pool[draws[i, j]]``; ``"add-clip"``:
    that clipped at 255), j < N,
    the N blends of many inputs in one network batch of about ``batch`` images. ``factor`` brings
    ``images`` to 0-255 pixels; ``pool`` is uint8 (on the host: each batch's inputs and overlays
    move to ``clf.device``, where they are blended and classified inside ``clf.autocast()``)."""
    import math

    import torch

    k = draws.shape[1]
    per = max(1, batch // k)  # inputs whose k blends make one network batch
    out = np.empty(len(images), dtype=np.float64)
    dev = clf.device
    clf.net.eval()
    with torch.inference_mode():
        for i in range(0, len(images), per):
            # the images travel as they are (uint8: 4x less to copy) and are blended on the device
            x = torch.as_tensor(images[i:i + per]).to(dev).to(torch.float32)
            if factor != 1.0:
                x = x * factor
            b = len(x)
            ov = torch.from_numpy(pool[draws[i:i + b].reshape(-1)]).to(dev).to(torch.float32)
            if mode in ("add", "add-clip"):
                blend = torch.repeat_interleave(x, k, dim=0).add_(ov)
                if mode == "add-clip":
                    blend.clamp_(max=255.0)
            else:
                blend = torch.repeat_interleave(x, k, dim=0).mul_(1.0 - alpha).add_(ov, alpha=alpha)
            with clf.autocast():
                logits = clf.net(clf.spec.to_tensor(blend, channels_last=clf.channels_last))
            logp = torch.log_softmax(logits.float(), dim=1)
            h = -(logp.exp() * logp).sum(dim=1) / math.log(2.0)
            out[i:i + b] = h.view(b, k).mean(dim=1).cpu().double().numpy()
    return out


class StripScore:
    """The fitted scorer: ``self(images) -> -mean entropy`` per image. ``pool`` holds the uint8
    overlay images; ``draws(n_inputs)`` the overlay indices a call on ``n_inputs`` images uses."""

    def __init__(self, clf: Classifier, pool: np.ndarray, o: Options) -> None:
        self.clf, self.pool, self.options = clf, pool, o

    def draws(self, n_inputs: int) -> np.ndarray:
        return overlay_draws(n_inputs, len(self.pool), self.options.copies, self.options.seed)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images, factor = _checked(self.clf, images)
        if len(images) == 0:
            return np.empty(0, dtype=np.float64)
        o = self.options
        return -mean_entropy(self.clf, images, factor, self.pool, self.draws(len(images)), o.alpha,
                             o.batch, o.superimpose)


def loop_scores(clf: Classifier, images: np.ndarray, pool: np.ndarray, draws: np.ndarray,
                alpha: float = 0.5, mode: str = "add") -> np.ndarray:
    """The reference computation, one input at a time: blend in pixel space with numpy, classify
    the input's N blends with `Classifier.logits`, average their entropies. Same result as
    `StripScore` for the same ``pool`` and ``draws`` (up to float rounding); slow on purpose."""
    import torch

    out = np.empty(len(images), dtype=np.float64)
    clf.net.eval()
    for i, x in enumerate(np.asarray(images)):
        if mode in ("add", "add-clip"):
            blend = x.astype(np.float32) + pool[draws[i]].astype(np.float32)
            if mode == "add-clip":
                blend = np.minimum(blend, 255.0)
        else:
            blend = (1.0 - alpha) * x.astype(np.float32) + alpha * pool[draws[i]].astype(np.float32)
        # blends of "add" exceed 255: straight through the input mapping (linear), not the
        # pixel-range check of `Classifier.logits`
        with torch.inference_mode(), clf.autocast():
            t = clf.spec.to_tensor(torch.from_numpy(blend).to(clf.device), channels_last=clf.channels_last)
            z = clf.net(t).float().cpu().numpy().astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        out[i] = -float(np.mean(-(np.exp(logp) * logp).sum(axis=1) / np.log(2.0)))
    return out


@register("strip", "input-detector", Options, paper=PAPER, revision=1,
          summary="superimpose each input with N clean images; low mean prediction entropy = trojaned",
          needs=("clean",),
          paper_setting="N = 100 held-out clean images blended linearly onto each input; threshold "
                        "at a preset FRR (e.g. 1 %) as a percentile of a normal fitted to clean "
                        "entropies; MNIST, CIFAR-10 and GTSRB BadNets-style triggers (FAR < 1 % at "
                        "1 % FRR reported)")
def fit(clf: Classifier, clean: ImageSet, o: Options) -> Scorer:
    if len(clean) == 0:
        raise BadInput("STRIP needs clean images to superimpose (got none)")
    pool = clean.images
    if o.overlays and o.overlays < len(pool):
        keep = np.sort(np.random.default_rng(o.seed).choice(len(pool), o.overlays, replace=False))
        pool = pool[keep]
    pool = np.ascontiguousarray(pool, dtype=np.uint8)
    clf.spec.check(pool, "STRIP clean data")
    details = {"options": asdict(o), "overlay_pool": int(len(pool)),
               "draws": "without replacement" if o.copies <= len(pool) else "with replacement "
                        f"(pool of {len(pool)} < N = {o.copies})"}
    return Scorer(StripScore(clf, pool, o), STATISTIC, details)
