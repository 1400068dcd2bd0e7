"""MM-BD (Hang Wang, Zhen Xiang, David J. Miller and George Kesidis, "MM-BD: Post-Training Detection
of Backdoor Attacks with Arbitrary Backdoor Pattern Types Using a Maximum Margin Statistic", IEEE
Symposium on Security and Privacy (S&P) 2024) as a data-free model detector.

Idea. A backdoor teaches the network that one small input feature (the trigger) overrides
everything else in favour of the target class t. Whatever the trigger looks like (patch, blend,
warp, …), the network has thereby learned a direction in which the logit of t grows far faster than
every other logit, so the largest *margin* the network can be driven to give t,

    r_t = max over x in the input domain of  [ logit_t(x) - max_{j != t} logit_j(x) ],

is abnormally large compared with the same quantity for the other classes. No clean data and no
assumption about the trigger's form are needed: only the weights and the input domain.

Algorithm (ours, following the paper's):

1. For every class k, maximise the margin above over images x with pixels in [0, 255], from
   ``starts`` random uniform images, by projected gradient ascent. The variable is the image on a
   [0, 1] pixel scale (NHWC, clipped back into [0, 1] after each step); it is converted to what the
   network takes exactly as `Classifier.to_tensor` converts uint8 images (x 255, the model's own
   scale, mean and std: `InputSpec.from_unit`), so a "raw 0-255" network and a "pixels/255"
   network are searched over the same images. The statistic r_k is the largest margin seen at
   any step from any start (every such value is attained by a valid image). All (class, start)
   inputs are optimised together, ``chunk`` classes per batch, so a 1283-class network costs a few
   hundred batched passes rather than 1283 separate optimisations.
2. Null. With K classes, the largest statistic r_max is set aside and a Gamma distribution
   (shape, location, scale: maximum likelihood, `scipy.stats.gamma.fit`) is fitted to the other
   K - 1. If no class is a backdoor target, r_max is the largest of K - 1 further draws from that
   null, so its order-statistic p-value is  p = 1 - F(r_max)^(K-1)  (computed as
   -expm1((K-1) · log1p(-sf(r_max))) so small values survive). This is the paper's test.
3. Calibration (ours; ``calibration`` = 0 turns it off). The value of step 2 is a *plug-in*
   p-value: it treats the fitted Gamma as known, although it was fitted to only K − 1 values,
   and to the K − 1 *smallest* of them, which understates the null's upper tail. Under the very
   null it assumes (K independent draws from a Gamma) it is far from uniform: simulated with this
   module's own fit, it falls below 0.05 in 28–37 % of backdoor-free models with K = 10 classes
   and 13–14 % with K = 43 (shapes 3 and 10; `tests/test_detect_mm_bd.py` checks the size of the
   calibrated test). So the plug-in value p0 is calibrated against its own null distribution by a
   parametric bootstrap: draw K values from the fitted Gamma, run step 2 on them, and count how
   often that plug-in value is ≤ p0. The draws stop once 20 such draws are found (Besag & Clifford's
   sequential Monte Carlo p-value, Biometrika 1991: p = 20 / draws), else after ``calibration``
   draws (p = (exceedances + 1) / (draws + 1), so never below 1 / (draws + 1), 0.005 at the
   default 200: small enough for α = 0.05 and for `scan`'s Bonferroni share of it; a fit costs
   ~5 ms on an idle core, so the calibration adds about a second at most). The model is called backdoored
   and the arg-max class flagged when this p < ``alpha`` (the paper's 0.05).

What the numbers mean. ``scores``: r_k per label, in logit units (larger = more suspicious); only
their spread relative to each other matters, not their absolute size, which depends on the
network's logit scale. ``statistic``: the p-value above (small = backdoored). ``details``: the
margins, the fitted null (shape, loc, scale), r_max and its class, the optimisation schedule
actually run, the plug-in p-value and the calibration's draws, and the sequential plug-in p-values
of the next-largest classes (each tested the same way after removing the classes above it; not
calibrated) - for information only: like the paper, we flag at most ONE
label, the arg-max class, even for a multi-target attack.

Where we differ from the paper and its released code (30 starts, 300 plain-SGD steps of learning
rate 0.01 on an image clamped to [0, 1] inside the forward pass, stop when the batch loss changes
by less than 1e-5 relatively, Gamma null, p < 0.05):

- Optimiser: Adam, learning rate 0.1 on the [0, 1] scale, with projection onto [0, 1] after every
  step (the released code clamps inside the forward pass, which leaves the variable free to drift
  outside [0, 1] where its gradient is zero). ``optimizer="sgd", lr=0.01`` gives plain projected
  SGD as in the released code. Adam reaches a given margin in far fewer steps (on the CSAW DeepID
  sunglasses BadNet: 10 Adam steps give a larger margin than 80 SGD steps), which is what makes
  the next point affordable.
- Budget: ``starts`` = 3 and ``steps`` = 30 per class by default instead of 30 x 300, so that a
  1283-class DeepID costs about 120 k image passes (~3 CPU-minutes on one core; the paper's
  schedule there would be 11.5 M forward-backward passes, hours on a CPU). On the CSAW sunglasses
  BadNet the target's margin stands out from the others' as clearly after 20-30 Adam steps as
  after 300 (its standardised distance from the other classes' margins stays at ~5.3-5.9 on a
  64-class sample), and extra starts help more than extra steps. ``starts=30, steps=300``
  (``optimizer="sgd", lr=0.01``) restores the paper's schedule.
  A (class, start) input also stops early once its best margin has not grown by more than ``tol``
  (relative) over the last 20 steps; the paper's code stops a whole class on its summed loss.
- p-value exponent: the released code uses 1 - F(r_max)^K; we use K - 1 (the number of null
  draws the maximum is compared with), which makes p smaller by a factor of about (K-1)/K.
- The calibration of step 3 (the paper reports the plug-in value). On the model zoo
  (docs/detection.md) it removed every false flag of MM-BD on clean models and lost part of the
  detections on 10-class models, where K − 1 = 9 values say little about the null.
- Pixels are continuous in [0, 1] (as in the paper), not rounded to 8-bit levels.

Data-free: ``needs = ()``; clean data, if given, is ignored. The image shape comes from the model's
input spec (`Classifier.spec`: native sidecars store it; Keras weights files get it from the
architecture, e.g. 55x47x3 for ``deepid``). Image passes are counted at the network's input by
`backdoorlab.cost` (one per input per optimisation step; the backward pass is not counted
separately).

Device: the optimisation runs where the network lives (``clf.device``, inside ``clf.autocast()``);
the random starts are drawn by a CPU generator and then moved there, so a seed gives the same
starting images on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from backdoorlab.detectors import Detection
from backdoorlab.errors import BadInput
from backdoorlab.options import opt
from backdoorlab.registry import register

STATISTIC_NAME = "p-value (max margin under a Gamma null, calibrated)"
WINDOW = 20  # steps over which an input must still improve by more than ``tol`` to keep going
STOP_AFTER = 20  # exceedances after which the calibration stops (Besag & Clifford 1991)


@dataclass
class Options:
    steps: int = opt(30, "gradient-ascent steps per start (paper 300)", low=1, high=100_000)
    starts: int = opt(3, "random starting images per class (paper 30)", low=1, high=1000)
    lr: float = opt(0.1, "step size on the [0, 1] pixel scale (paper's SGD: 0.01)", low=0,
                    low_open=True, high=100)
    optimizer: str = opt("adam", "adam, or sgd = plain projected gradient ascent (paper's code)",
                         choices=("adam", "sgd"))
    tol: float = opt(1e-3, f"stop an input when its best margin grew by at most this fraction over "
                     f"{WINDOW} steps (0 = run every step)", low=0, high=1)
    alpha: float = opt(0.05, "flag when the p-value is below this", low=0, high=1, low_open=True,
                       high_open=True)
    chunk: int = opt(0, "classes optimised in one batch (0 = about 1024 inputs per batch)", low=0,
                     high=1_000_000)
    calibration: int = opt(200, "null draws that calibrate the plug-in p-value (0 = the paper's "
                           "plug-in value)", low=0, high=1_000_000)
    seed: int = opt(0, "seed of the random starting images and of the calibration", low=0,
                    high=2**31 - 1)


@register("mm-bd", "model-detector", Options,
          paper="Wang, Xiang, Miller and Kesidis, MM-BD: maximum margin statistic, IEEE S&P 2024",
          summary="data-free: per class the largest logit margin reachable over the input domain; "
                  "an abnormally large one (Gamma-null order-statistic p-value) is the target",
          needs=(), revision=1,
          paper_setting="no data; per class 30 random starts x 300 SGD steps (lr 0.01) on the "
                        "image; Gamma null on all but the largest statistic; plug-in p < 0.05")
def run(clf, clean, o: Options) -> Detection:
    import numpy as np

    k = clf.num_classes
    if k < 4:
        raise BadInput(f"mm-bd needs at least 4 classes (a null fitted to K - 1 >= 3 statistics); "
                       f"the model has {k}")
    margins, sched = max_margins(clf, o)
    res = order_statistic_test(margins)
    top = int(res["argmax"])
    p, calib = calibrated_p_value(res, k, o.calibration, o.seed)
    flagged = [top] if p < o.alpha else []
    notes = []
    if clean is not None:
        notes.append("mm-bd is data-free: the clean data given was not used")
    if calib["draws"] and not calib["exceedances"]:
        notes.append(f"no null draw was as extreme: the p-value is the calibration's floor "
                     f"1/{calib['draws'] + 1} (the paper's plug-in value: {res['p_value']:.3g}; "
                     f"--calibration sets the number of draws)")
    if res.get("fit") != "mle":
        notes.append(f"the Gamma null was fitted with a fallback ({res['fit']})")
    order = np.argsort(-margins)
    details = {"margins": [float(m) for m in margins], "r_max": float(margins[top]),
               "argmax": top, "num_classes": k, "alpha": o.alpha,
               "null": res["null"], "null_fit": res["fit"],
               "exponent": k - 1, "plug_in_p_value": float(res["p_value"]),
               "calibration": calib, "top": [int(i) for i in order[:10]],
               "sequential_p_values": sequential_p_values(margins, 5), **sched}
    return Detection({i: float(m) for i, m in enumerate(margins)}, flagged, bool(flagged),
                     float(p), STATISTIC_NAME, {}, details, notes, p_value=float(p))


# -- step 1: the maximum margin of every class ------------------------------------------------------

def max_margins(clf, o: Options):
    """(r_k for every class as a float64 array, schedule figures). See the module docstring."""
    import numpy as np
    import torch

    from backdoorlab.progress import progress

    net, spec, k = clf.net, clf.spec, clf.num_classes
    h, w, c = spec.shape
    per_batch = o.chunk or max(1, 1024 // o.starts)
    chunks = [list(range(a, min(k, a + per_batch))) for a in range(0, k, per_batch)]
    best = np.full(k, -np.inf)
    steps_run = 0
    stopped_early = 0
    per_chunk = o.steps + 1  # the last pass only evaluates
    # one bar over every (chunk, step): a chunk's inputs are optimised together for up to
    # ``per_chunk`` passes, so the ETA is right from the first steps (a chunk that stops early
    # skips its remaining ticks)
    ticks = iter(progress(range(len(chunks) * per_chunk), desc="mm-bd", unit="step"))
    with clf.frozen():
        for classes in chunks:
            labels = torch.tensor(classes, device=clf.device).repeat_interleave(o.starts)
            x = torch.cat([_starts(o.seed, y, o.starts, (h, w, c)) for y in classes]).to(clf.device)
            with clf.autocast():
                r, n, early, passes = _ascend(net, spec, clf.channels_last, x, labels, o,
                                              tick=lambda: next(ticks, None))
            for _ in range(per_chunk - passes):
                next(ticks, None)
            steps_run += n
            stopped_early += early
            best[classes] = r.view(len(classes), o.starts).amax(1).cpu().double().numpy()
    next(ticks, None)  # ends the bar (and writes the final status)
    return best, {"steps": o.steps, "starts": o.starts, "optimizer": o.optimizer, "lr": o.lr,
                  "tol": o.tol, "chunks": len(chunks), "input_steps": steps_run,
                  "inputs_stopped_early": stopped_early, "inputs": k * o.starts}


def _starts(seed: int, label: int, n: int, shape: tuple[int, int, int]):
    """``n`` uniform random images for ``label`` (NHWC, [0, 1], on the CPU); the same whatever the
    chunking and the device."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + label)  # CPU-only: same starts on every device
    return torch.rand((n, *shape), generator=g)


def _margin(logits, labels):
    """logit_k - max_{j != k} logit_j per row, k = labels."""
    import torch

    own = logits.gather(1, labels[:, None])[:, 0]
    rest = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return own - torch.where(torch.isfinite(rest), rest, own)  # one class: margin 0


def _ascend(net, spec, channels_last: bool, x, labels, o: Options, tick=None):
    """Projected gradient ascent of the margin for a batch of NHWC [0, 1] images ``x`` (one class
    per row, ``labels``), on the device of ``x``; the caller holds the network's autocast.
    ``tick()``, if given, is called after every batched pass. Returns (best margin per row,
    input-steps run, rows stopped early, batched passes run)."""
    import torch

    n = len(x)
    best = torch.full((n,), float("-inf"), device=x.device)
    at_check = best.clone()
    active = torch.arange(n, device=x.device)
    m1 = torch.zeros_like(x)
    m2 = torch.zeros_like(x)
    b1, b2, eps = 0.9, 0.999, 1e-8
    steps_run = 0
    stopped = 0
    passes = 0
    for step in range(o.steps + 1):  # the last pass only evaluates the final images
        xa = x[active].requires_grad_(step < o.steps)
        inp = spec.from_unit(xa.permute(0, 3, 1, 2))  # NCHW view with channels-last memory
        if not channels_last and spec.layout == "NCHW":
            inp = inp.contiguous()
        with torch.set_grad_enabled(step < o.steps):
            m = _margin(net(inp).float(), labels[active])
        steps_run += len(active)
        passes += 1
        if tick is not None:
            tick()
        best[active] = torch.maximum(best[active], m.detach())
        if step == o.steps:
            break
        (g,) = torch.autograd.grad(m.sum(), xa)
        with torch.no_grad():
            if o.optimizer == "adam":
                t = step + 1
                m1[active] = b1 * m1[active] + (1 - b1) * g
                m2[active] = b2 * m2[active] + (1 - b2) * g * g
                upd = (m1[active] / (1 - b1 ** t)) / ((m2[active] / (1 - b2 ** t)).sqrt() + eps)
            else:
                upd = g
            x[active] = (xa.detach() + o.lr * upd).clamp_(0.0, 1.0)
        if o.tol > 0 and (step + 1) % WINDOW == 0:
            b, prev = best[active], at_check[active]
            grown = (b - prev) > o.tol * torch.clamp(prev.abs(), min=1.0)
            keep = grown | ~torch.isfinite(prev)
            at_check[active] = b
            stopped += int((~keep).sum())
            active = active[keep]
            if len(active) == 0:
                break
    return best, steps_run, stopped, passes


# -- step 2: the order-statistic test under a Gamma null ------------------------------------------

def fit_gamma(null) -> tuple[tuple[float, float, float], str]:
    """((shape, loc, scale), how) of a Gamma fitted to ``null``: maximum likelihood with free
    location ("mle", the paper's); if that fails or degenerates, maximum likelihood with the
    location fixed just below the smallest value ("mle, loc fixed")."""
    import warnings

    import numpy as np
    from scipy import stats

    null = np.asarray(null, dtype=np.float64)

    def ok(p) -> bool:
        return all(math.isfinite(v) for v in p) and p[0] > 0 and p[2] > 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            p = tuple(float(v) for v in stats.gamma.fit(null))
            if ok(p):
                return p, "mle"
        except (ValueError, RuntimeError, FloatingPointError):
            pass
        spread = float(null.max() - null.min()) or max(1.0, abs(float(null.mean())))
        loc = float(null.min()) - 1e-3 * spread
        try:
            p = tuple(float(v) for v in stats.gamma.fit(null, floc=loc))
            if ok(p):
                return p, "mle, loc fixed"
        except (ValueError, RuntimeError, FloatingPointError):
            pass
    raise BadInput("mm-bd: no Gamma distribution could be fitted to the margin statistics")


def order_statistic_test(stats_) -> dict:
    """The paper's test on per-class statistics: Gamma fitted to all but the largest, p-value of
    the largest as the maximum of K - 1 null draws. Returns p_value, argmax, null {shape, loc,
    scale}, fit."""
    import numpy as np
    from scipy import stats

    s = np.asarray(stats_, dtype=np.float64)
    if s.ndim != 1 or len(s) < 4 or not np.all(np.isfinite(s)):
        raise BadInput("mm-bd: the test needs at least 4 finite statistics")
    top = int(np.argmax(s))
    null = np.delete(s, top)
    if float(null.max() - null.min()) == 0.0:  # a constant null: nothing to fit
        p = 0.0 if s[top] > null[0] else 1.0
        return {"p_value": p, "argmax": top, "null": {"shape": None, "loc": float(null[0]),
                                                      "scale": 0.0}, "fit": "constant"}
    (a, loc, scale), how = fit_gamma(null)
    sf = float(stats.gamma.sf(s[top], a, loc=loc, scale=scale))
    p = 1.0 if sf >= 1.0 else float(-math.expm1(len(null) * math.log1p(-sf)))
    return {"p_value": min(1.0, max(0.0, p)), "argmax": top,
            "null": {"shape": a, "loc": loc, "scale": scale}, "fit": how}


def calibrated_p_value(res: dict, k: int, draws: int, seed: int) -> tuple[float, dict]:
    """(calibrated p-value, what the calibration did) for the result ``res`` of
    `order_statistic_test` on ``k`` statistics: the share of data sets of k independent draws
    from the fitted Gamma whose own plug-in p-value is ≤ the observed one (module docstring, step
    3), by sequential Monte Carlo. ``draws`` = 0, or a null with nothing fitted (constant), gives
    the plug-in value back."""
    import numpy as np
    from scipy import stats

    from backdoorlab.progress import progress

    p0, null = float(res["p_value"]), res["null"]
    if draws == 0 or null["shape"] is None:
        return p0, {"draws": 0, "exceedances": None, "method": "none (the plug-in value)"}
    rng = np.random.default_rng([seed, 0x6D6D6264])  # its own stream, apart from the starts
    hits = n = 0
    for n in progress(range(1, draws + 1), desc="mm-bd null", unit="draw"):
        sample = stats.gamma.rvs(null["shape"], loc=null["loc"], scale=null["scale"], size=k,
                                 random_state=rng)
        hits += order_statistic_test(sample)["p_value"] <= p0
        if hits >= STOP_AFTER:
            return hits / n, {"draws": n, "exceedances": hits,
                              "method": f"sequential Monte Carlo, stopped at {STOP_AFTER} exceedances"}
    return (hits + 1) / (n + 1), {"draws": n, "exceedances": hits, "method": "Monte Carlo"}


def sequential_p_values(stats_, n: int) -> list[dict]:
    """For information: the test repeated on the statistics left after removing the largest, the
    two largest, … (``n`` rounds, while at least 4 remain): [{label, margin, p_value}]."""
    import numpy as np

    s = np.asarray(stats_, dtype=np.float64)
    idx = np.arange(len(s))
    out = []
    for _ in range(n):
        if len(s) < 4:
            break
        r = order_statistic_test(s)
        out.append({"label": int(idx[r["argmax"]]), "margin": float(s[r["argmax"]]),
                    "p_value": r["p_value"]})
        s, idx = np.delete(s, r["argmax"]), np.delete(idx, r["argmax"])
    return out
