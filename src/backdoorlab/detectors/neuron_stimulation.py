"""ABS (Yingqi Liu, Wen-Chuan Lee, Guanhong Tao, Shiqing Ma, Yousra Aafer and Xiangyu Zhang, "ABS:
Scanning Neural Networks for Back-doors by Artificial Brain Stimulation", ACM CCS 2019) as a
model detector, registered as ``abs``.

Why a third detector. MM-BD and Neural Cleanse both test *labels*: one statistic per label and an
outlier test over the K labels. With K = 10 (the digits) that test has 9 reference values and
little power: the zoo's 4x4 BadNets -> 0 digits models are missed by both in 3 of 5 seeds
(docs/detection.md). ABS looks at *neurons* instead, and confirms a suspect by what a small
trigger built for it does, so its answer does not rest on the spread of K per-label statistics.

Idea. A backdoor is carried by a few inner neurons: driving one of them high sends every input to
the target label, whatever the input's own class. A benign neuron raises its label only together
with the rest of the image's evidence.

Algorithm (ours, following the paper):

1. Stimulation analysis. Run the seed images (``images``, a seeded sample of the clean data spread
   over the labels) up to layer ``layer`` (a stage of the network; default the model's pruning
   point, e.g. ``pool_3``; every output channel is one neuron). For every neuron, set its whole
   channel to each stimulation value v in {0, a/2, a, 2a, 4a, ...} (``levels`` values, a = the
   largest activation of that layer on the seeds), run the rest of the network, and record per
   label its *elevation*: the largest logit reached over the values minus the image's own logit.
   The image's elevated label is the arg-max; its *elevation margin* is the difference between
   the two largest elevations. A neuron is a candidate when at least 90 % of the seed images have
   the same elevated label t (the paper: "regardless of the input"; 0.9 as in the authors'
   released scanner) and its score is the smallest margin over the seeds of other labels that
   elevate t. The ``candidates`` best-scoring neurons, at most one per label (as the authors'
   scanner picks them), go to step 2.
2. Trigger reverse-engineering. For each candidate, optimise a mask m (H x W) and a pattern p (H x
   W x C, through tanh so it stays in [0, 1]) so that the stamped seeds (1 - m) x + m p drive
   the candidate's activation as high as possible (in units of a), with a small penalty on the
   layer's other neurons (weight 1e-4, as in the authors' release), with the mask's L1 size held
   within the bound ``max_size`` x H x W (the paper's pixel-trigger bound, 6 % of the input). The
   paper holds it there by a penalty on the size; by default here the mask is a budget instead, m =
   min(1, bound x softmax(a)), whose sum cannot exceed the bound (``bound_by="penalty"`` restores a
   hinge penalty of weight 50 per bound's worth of excess): a penalty must outweigh the activation,
   and when it does, Adam's normalised steps shrink the whole mask, the neuron's pixels included
   (measured on a network built with a one-neuron trigger, tests/test_detect_abs.py: the penalised
   mask collapsed to a total of 0.5 pixels, REASR 0; the budget put it on the watched corner, REASR
   1). That is the paper's objective: the trigger is built for the neuron, never for the label, so
   a trigger that flips the label confirms that the neuron alone carries a shortcut.
   ``logit_weight`` > 0 adds the label's cross-entropy (x3 in the second half), as the authors'
   later TrojAI scanner adds the label's logit: the search then also finds label-level universal
   patches, which a backdoor-free network has too (see below). The mask is then cut to its
   ``max_size`` x H x W largest pixels (so the bound holds exactly), and the trigger is stamped,
   rounded to 8-bit, on ``eval_images`` clean images that are not seeds and not of label t.
3. Verdict. REASR (reverse-engineered attack success rate) of a candidate = the share of those
   images the network then assigns to t. The model is reported backdoored when a candidate's
   REASR reaches ``reasr`` (default 0.8: the authors' released scanner reports the triggers above
   80 % REASR as its findings); the flagged labels are those candidates' labels, largest REASR
   first.

What the numbers mean. ``statistic``: the largest REASR (0-1). ``scores``: per label, the largest
REASR of its candidate neuron (labels without a candidate are absent). ``details``: the layer and
its size, the stimulation values, the candidates (layer channel, label, stimulation score, REASR,
mask pixels), and the image passes of each step. ``triggers``: the reversed trigger of every flagged
label (mask H x W, pattern H x W x C), like Neural Cleanse's.

ABS has no null distribution and so no p-value: `scan` counts it by its own verdict (see
`backdoorlab.detectors.verdict`), and its false-flag rate is what the zoo's clean models show.

The two objectives, measured 2026-12-07 by hand (`backdoorlab detect abs`, defaults otherwise;
docs/detection.md). GTSRB (gtsrb_cnn at pool_3): the paper's objective gave two clean models a
largest REASR of 0.16 and 0.19 and the blend and FTrojan models 1.00 at their targets (2, 8), but
missed a 4x4 BadNets (its target was no candidate); with the label's cross-entropy
(``logit_weight=1``, mask as a penalty or budget) the clean models reached 0.92-0.94 on 4-6 labels:
a 61-pixel patch is a universal adversarial patch for a 32x32 traffic-sign network. Digits
(small_cnn at pool_2, 5 clean and 5 BadNets models of the zoo): the paper's objective flagged no
clean model (largest REASR 0.01-0.21) and 2 of the 5 BadNets (0.96, 0.87; the others 0.35-0.47:
their trigger is spread over several of the layer's 32 channels), ``logit_weight=1`` all 5 BadNets
(1.00) and one clean model (label 4, 0.82). The default is the paper's.

Where we differ from the paper and its released code: the seed images are a sample of the
defender's clean data (``images`` = 50) rather than exactly one per label; the stimulation values
are fixed multiples of the layer's largest seed activation (the released TrojAI scanner's
schedule) and the elevation is measured against the image's unstimulated logits; the optimiser is
Adam (``steps`` = 150 at learning rate 0.1 on the tanh parameters, all seeds every step); the
REASR is measured on clean images that were not used to build the trigger; only pixel-space
triggers are reverse-engineered (the paper's feature-space variant, with its filter trigger, is
not built).
"""

from __future__ import annotations

from dataclasses import dataclass

from backdoorlab.detectors import Detection
from backdoorlab.errors import BadInput
from backdoorlab.options import opt
from backdoorlab.registry import register

CONSISTENT = 0.9  # share of seeds that must elevate the same label (authors' release)
OTHERS_WEIGHT = 1e-4  # penalty on the layer's other neurons during reversal (authors' release)
ROWS = 4096  # rows per batch of the stimulation passes
STATISTIC_NAME = "largest REASR (share of clean images its reversed small trigger sends to the label)"


@dataclass
class Options:
    layer: str = opt("", "stage whose output channels are the neurons stimulated (default: the "
                     "model's pruning point, e.g. pool_3)")
    images: int = opt(50, "seed images: a seeded sample of the clean data, spread over the labels "
                      "(at most half of it)",
                      low=2, high=100_000)
    levels: int = opt(6, "stimulation values per neuron: 0 and a x 1/2, 1, 2, 4, ... (a = the "
                      "layer's largest seed activation)", low=2, high=32)
    candidates: int = opt(10, "neurons whose trigger is reverse-engineered (paper: 10)", low=1,
                          high=10_000)
    max_size: float = opt(0.06, "trigger bound: share of the image's pixels the mask may cover "
                          "(paper: 0.06)", low=0, high=1, low_open=True)
    bound_by: str = opt("budget", "how the reversal keeps the mask within the bound: budget = "
                        "mask = min(1, bound x softmax) (its sum never exceeds it), penalty = the "
                        "paper's hinge penalty on the mask's size (weight 50)",
                        choices=("budget", "penalty"))
    steps: int = opt(150, "optimisation steps per candidate", low=1, high=100_000)
    logit_weight: float = opt(0.0, "weight of the label's cross-entropy in the reversal (0 = the "
                              "paper's neuron-only objective; the authors' TrojAI scanner adds the "
                              "label's logit, e.g. 1)", low=0, high=1000)
    lr: float = opt(0.1, "Adam learning rate on the tanh parameters", low=0, low_open=True, high=100)
    reasr: float = opt(0.8, "flag a label when its reversed trigger sends at least this share of "
                       "clean images of other labels to it", low=0, high=1, low_open=True)
    eval_images: int = opt(500, "clean images (not seeds) on which REASR is measured; 0 = all "
                           "the rest", low=0)
    seed: int = opt(0, "seed of the image sample and the starting patterns", low=0, high=2**31 - 1)


@register("abs", "model-detector", Options,
          paper="Liu et al., ABS: Scanning Neural Networks for Back-doors by Artificial Brain "
                "Stimulation, ACM CCS 2019",
          summary="stimulate each inner neuron; a neuron that sends every input to one label is "
                  "confirmed by the success rate of a small trigger reversed for it (REASR)",
          paper_setting="one seed image per label; top 10 candidate neurons; pixel triggers "
                        "bounded to 6 % of the input; the model is trojaned when a reversed "
                        "trigger's REASR is high",
          in_scan=False)
def run(clf, clean, o: Options) -> Detection:
    import numpy as np

    from backdoorlab.progress import progress

    if clean is None or clean.labels is None or len(clean) < 3:
        raise BadInput("abs needs labelled clean images (at least 3)")
    layer = _layer(clf, o.layer)
    n_seeds = min(o.images, len(clean) // 2)  # the rest measures REASR
    seeds, rest = _split(clean.labels, n_seeds, o.seed)
    stim = stimulation(clf, layer, clean.images[seeds], clean.labels[seeds], o)
    cands = pick_candidates(stim, o.candidates)
    rng = np.random.default_rng([o.seed, 2])
    eval_pool = rest if o.eval_images == 0 or o.eval_images >= len(rest) else \
        np.sort(rng.choice(rest, o.eval_images, replace=False))
    found = []
    triggers = {}
    reverse_passes = 0
    for c in progress(cands, desc="abs: reverse triggers", unit="neuron"):
        mask, pattern, passes = reverse_trigger(clf, layer, clean.images[seeds], c["neuron"],
                                                c["label"], stim["amax"], o, seed=o.seed * 7919 + c["neuron"])
        reverse_passes += passes
        others = eval_pool[clean.labels[eval_pool] != c["label"]]
        rate = reasr(clf, clean.images[others], mask, pattern, c["label"])
        found.append({**c, "reasr": rate, "mask_pixels": int((mask > 0).sum()),
                      "eval_images": int(len(others))})
        if rate >= o.reasr:
            triggers.setdefault(c["label"], (mask, pattern))
    scores: dict[int, float] = {}
    for f in found:
        scores[f["label"]] = max(scores.get(f["label"], 0.0), f["reasr"])
    flagged = sorted((y for y, r in scores.items() if r >= o.reasr), key=lambda y: (-scores[y], y))
    top = max(scores.values(), default=0.0)
    h, w, _ = clf.spec.shape
    details = {"layer": layer, "neurons": stim["neurons"], "seed_images": int(len(seeds)),
               "stimulation_values": stim["values"], "consistent_neurons": stim["consistent"],
               "candidates": found, "bound_pixels": bound_pixels(o.max_size, h, w),
               "reasr_threshold": o.reasr, "rule": f"REASR >= {o.reasr:g}",
               "passes": {"stimulation": stim["passes"], "reverse": reverse_passes}}
    notes = []
    if n_seeds < o.images:
        notes.append(f"{len(clean)} clean images: {n_seeds} seeds (not {o.images}), the other "
                     f"{len(rest)} measure REASR")
    if not cands:
        notes.append(f"no neuron elevated one label on {CONSISTENT:.0%} of the seed images")
    return Detection({int(k): float(v) for k, v in scores.items()}, flagged, bool(flagged),
                     float(top), STATISTIC_NAME, triggers, details, notes, p_value=None)


def bound_pixels(max_size: float, h: int, w: int) -> int:
    """Largest number of mask pixels a trigger may use (at least 1)."""
    return max(1, int(max_size * h * w))


def _layer(clf, name: str) -> str:
    if not clf.staged:
        raise BadInput("abs needs a network that can be run from an inner layer (a built-in "
                       "architecture or an imported Keras model)")
    if not name:
        name = clf.default_prune_layer()[1]
    if name not in clf.net.stage_names:
        raise BadInput(f"abs: {name!r} is not a stage of this network (stages: "
                       f"{', '.join(clf.net.stage_names)})")
    return name


def _split(labels, n: int, seed: int):
    """(seed indices, the other indices): ``n`` images taken round-robin over the labels in a
    seeded order, so the seeds cover as many labels as they can."""
    import numpy as np

    rng = np.random.default_rng([seed, 1])
    order = rng.permutation(len(labels))
    by_label: dict[int, list[int]] = {}
    for i in order:
        by_label.setdefault(int(labels[i]), []).append(int(i))
    queues = [by_label[y] for y in sorted(by_label, key=lambda y: by_label[y][0])]
    picked: list[int] = []
    depth = 0
    while len(picked) < min(n, len(labels)):
        for q in queues:
            if depth < len(q) and len(picked) < n:
                picked.append(q[depth])
        depth += 1
    seeds = np.sort(np.array(picked, dtype=np.int64))
    rest = np.setdiff1d(np.arange(len(labels)), seeds)
    return seeds, rest


# -- step 1: stimulation analysis ----------------------------------------------------------------

def stimulation(clf, layer: str, images, labels, o: Options) -> dict:
    """Per neuron of ``layer``: its elevated label, the share of seeds agreeing, and its score (see
    the module docstring). Returns a dict with ``neurons`` (count), ``values``, ``amax``, ``table``
    (one record per neuron), ``consistent`` (count) and ``passes``."""
    import numpy as np
    import torch

    from backdoorlab import cost
    from backdoorlab.progress import progress

    net = clf.net
    passes = 0
    with clf.frozen(), torch.inference_mode(), clf.autocast():
        x = clf.to_tensor(images)
        with cost.counting() as pc:
            h0 = net.forward_to(layer, x).float()
            base = net.forward_from(layer, h0.to(x.dtype)).float()
        passes += pc.images
        n, c = h0.shape[0], h0.shape[1]
        amax = float(h0.max().clamp(min=1e-6))
        values = [0.0] + [amax * 2.0 ** (k - 1) for k in range(o.levels - 1)]
        per = max(1, ROWS // (n * len(values)))
        elev_top = np.zeros((c, n), dtype=np.int64)
        elev_margin = np.zeros((c, n), dtype=np.float64)
        for a in progress(range(0, c, per), desc="abs: stimulate neurons", unit="batch"):
            chans = list(range(a, min(c, a + per)))
            hs = h0.unsqueeze(0).unsqueeze(0).repeat(len(chans), len(values),
                                                      *([1] * h0.dim()))
            for i, ch in enumerate(chans):
                for j, v in enumerate(values):
                    hs[i, j, :, ch] = v
            flat = hs.reshape(-1, *h0.shape[1:])
            with cost.counting() as pc:
                z = net.forward_from(layer, flat.to(x.dtype)).float()
            passes += pc.images
            z = z.view(len(chans), len(values), n, -1)
            elev = z.amax(1) - base.unsqueeze(0)  # (chans, n, labels)
            top2 = elev.topk(2, dim=-1)
            elev_top[chans] = top2.indices[..., 0].cpu().numpy()
            elev_margin[chans] = (top2.values[..., 0] - top2.values[..., 1]).cpu().numpy()
    labels = np.asarray(labels)
    table = []
    for ch in range(c):
        t = int(np.bincount(elev_top[ch]).argmax())
        share = float((elev_top[ch] == t).mean())
        agree = (elev_top[ch] == t) & (labels != t)
        score = float(elev_margin[ch][agree].min()) if agree.any() else 0.0
        table.append({"neuron": ch, "label": t, "share": share, "score": score})
    return {"neurons": c, "values": values, "amax": amax, "table": table, "passes": passes,
            "consistent": sum(r["share"] >= CONSISTENT for r in table)}


def pick_candidates(stim: dict, k: int) -> list[dict]:
    """The ``k`` best-scoring consistent neurons, at most one per label."""
    rows = sorted((r for r in stim["table"] if r["share"] >= CONSISTENT and r["score"] > 0),
                  key=lambda r: (-r["score"], r["neuron"]))
    out, seen = [], set()
    for r in rows:
        if r["label"] in seen:
            continue
        seen.add(r["label"])
        out.append(dict(r))
        if len(out) == k:
            break
    return out


# -- step 2: trigger reverse-engineering ---------------------------------------------------------

def reverse_trigger(clf, layer: str, images, neuron: int, label: int, amax: float, o: Options,
                    seed: int):
    """(mask H x W, pattern H x W x C, image passes): a trigger of at most ``max_size`` of the
    pixels that drives ``neuron`` of ``layer`` high on ``images`` (uint8 NHWC)."""
    import numpy as np
    import torch

    from backdoorlab import cost
    from backdoorlab.defenses.neural_cleanse import compose

    net, spec = clf.net, clf.spec
    h, w, ch = spec.shape
    bound = bound_pixels(o.max_size, h, w)
    g = torch.Generator().manual_seed(seed)  # CPU-only: the same starting pattern on every device
    if o.bound_by == "budget":  # mask = min(1, bound x softmax(a)): its sum never exceeds the bound
        mask_p = torch.zeros((h, w), device=clf.device, requires_grad=True)  # uniform start
    else:  # the paper's penalty; every pixel starts at the bound spread evenly over the image
        m0 = torch.full((h, w), float(np.arctanh(2 * min(0.5, bound / (h * w)) - 1)))
        mask_p = m0.to(clf.device).requires_grad_(True)

    def mask_of(a):
        if o.bound_by == "budget":
            return torch.clamp(bound * torch.softmax(a.flatten(), 0), max=1.0).view(h, w)
        return torch.tanh(a) / 2 + 0.5

    pat_p = (torch.rand((h, w, ch), generator=g) * 2 - 1).to(clf.device).requires_grad_(True)
    x01 = torch.as_tensor(images, dtype=torch.float32, device=clf.device) / 255.0
    opt_ = torch.optim.Adam([mask_p, pat_p], lr=o.lr)
    passes = 0
    with clf.frozen():
        for step in range(o.steps):
            mask = mask_of(mask_p)
            pattern = torch.tanh(pat_p) / 2 + 0.5
            xs = compose(x01, mask[..., None], pattern)
            inp = spec.from_unit(xs.permute(0, 3, 1, 2))
            if not clf.channels_last and spec.layout == "NCHW":
                inp = inp.contiguous()
            with clf.autocast(), cost.counting() as pc:
                act = net.forward_to(layer, inp)
                logits = net.forward_from(layer, act).float() if o.logit_weight else None
                act = act.float()
            passes += pc.images
            act = act.flatten(2).mean(2) if act.dim() > 2 else act  # (n, channels)
            own = act[:, neuron].mean() / amax
            rest = (act.sum(1) - act[:, neuron]).mean() / max(1, act.shape[1] - 1) / amax
            loss = -own + OTHERS_WEIGHT * rest
            if o.bound_by == "penalty":
                loss = loss + 50.0 * torch.relu(mask.sum() - bound) / bound
            if logits is not None:  # the authors' release: the label's logit too, x3 late on
                want = torch.full((len(logits),), label, device=logits.device)
                late = 3.0 if step >= o.steps // 2 else 1.0
                loss = loss + late * o.logit_weight * torch.nn.functional.cross_entropy(logits, want)
            opt_.zero_grad(set_to_none=True)
            loss.backward()
            opt_.step()
    with torch.no_grad():
        mask = mask_of(mask_p).cpu().numpy().astype(np.float32)
        pattern = (torch.tanh(pat_p) / 2 + 0.5).cpu().numpy().astype(np.float32)
    keep = np.argsort(mask.ravel())[::-1][:bound]  # the bound holds exactly
    cut = np.zeros(mask.size, dtype=np.float32)
    cut[keep] = mask.ravel()[keep]
    return cut.reshape(h, w), pattern, passes


def reasr(clf, images, mask, pattern, label: int) -> float:
    """Share of ``images`` (uint8 NHWC) classified as ``label`` once the trigger is stamped and the
    pixels rounded to 8-bit."""
    from backdoorlab.defenses.neural_cleanse import apply_trigger

    if len(images) == 0:
        return 0.0
    pred = clf.predict(apply_trigger(images, mask, pattern))
    return float((pred == label).mean())
