"""Adversarial Neuron Pruning (Wu and Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep
Models", NeurIPS 2021).

A backdoored network collapses much more easily than a clean one when its neurons are perturbed
adversarially: small multiplicative changes of a few neurons' weights make it predict the target
label on clean inputs. ANP learns which neurons these are. Every neuron k gets a mask m_k in
[0, 1], initialised to 1, and perturbations δ_k (of its weights) and ξ_k (of its bias). With L the
cross-entropy on a batch of the defender's clean data,

    min over m of   α · L(m ⊙ w, b) + (1 − α) · max over δ, ξ of L((m + δ) ⊙ w, (1 + ξ) ⊙ b)

Neurons: where the network has batch norm, its BN channels (gamma is the weight w, beta the bias
b), and nothing else, as in the paper's code; a network without any BN (small_cnn, DeepID) gets
its conv output channels and hidden dense units instead (kernel rows and biases; never the
logits; see `backdoorlab.repairs._neurons`). The inner maximum is approximated per batch as the
paper's code does it: δ and ξ start uniform in [−ε, ε] and take ``steps`` signed-gradient ascent
steps of size ε / ``steps`` (``step_size``), not projected back (one step can reach 2ε). The outer
minimum is SGD with momentum on the masks, clipped to [0, 1] after every step. Everything is
applied through `torch.func.functional_call` on a copy: the given model is never touched.

Neurons whose mask ends below ``threshold`` are pruned (the paper's rule); alternatively the
``count`` lowest-mask neurons, or as many lowest-mask neurons as keep the clean accuracy on a
held-back share of the defender's data within ``drop`` points. Pruning switches a neuron off
exactly: BN gamma and beta zeroed, or the kernel row and bias zeroed (output 0, and 0 after the
activation, checked). Details list the pruned neurons per layer (layer → channels), every mask
value and the neurons not masked.

Deviations from the paper's code, and why:

- Its pruning zeroes gamma only, so a pruned BN channel still outputs its beta; here a pruned
  neuron is switched off entirely (beta zeroed too), the same as every other pruning repair here.
- BN layers use batch statistics while the masks are optimised, as the paper's code does (it runs
  the network in training mode); ``bn_stats = "running"`` uses the stored ones. Dropout stays off.
  The paper's CIFAR augmentation (random crop, horizontal flip) is not applied: a mirrored digit or
  traffic sign is another class.
- Schedule. Paper (CIFAR-10, ResNet-18, 500 clean images = 1 % of the training set): ε = 0.4,
  one inner step (of ε / steps = 0.4 in its code), α = 0.2, masks by SGD lr 0.2 momentum 0.9,
  batch 128, 2000 iterations, prune below 0.2. Ours: all of that but the length. An iteration is
  three forward and backward passes of 128 images (perturbation step, perturbed and unperturbed
  loss); for gtsrb_cnn on 32x32 images that is about 0.9 s of CPU time on one core, so 2000
  iterations would take about half an hour. The default ``iterations = 300`` (a seventh of the
  paper's mask steps) stays within 5 minutes there; ``--iterations 2000`` runs the paper's
  schedule. All of the defender's clean data is used (the paper: 500 images), or all but the
  held-back share for ``prune_by = drop``.

Revision 1 (2026-12-07) brought the perturbation in line with the paper's code: revision 0 took
inner steps of 0.2 (half the code's) clipped back to [−ε, ε], let the mask scale the biases (the
code perturbs them by 1 + ξ and never masks them), and also masked the hidden dense units of
networks that have batch norm (gtsrb_cnn's fc_1: 256 of its 704 neurons). On the GTSRB BadNets
of docs/repairs-gtsrb.md revision 0 pruned 2 of 704 neurons and left ASR 96.3 %, revision 1
prunes 3 of 448 and leaves 96.1 %: the faithful perturbation does not expose this backdoor either.
"""

from __future__ import annotations

from dataclasses import dataclass

from backdoorlab.options import opt
from backdoorlab.registry import register
from backdoorlab.repairs import DefenderData, Repaired


@dataclass
class Options:
    eps: float = opt(0.4, "perturbation budget ε: |δ|, |ξ| ≤ ε (paper 0.4)", low=0, high=10)
    steps: int = opt(1, "signed-gradient steps of the inner maximisation (paper 1)", low=1, high=100)
    step_size: float | None = opt(None, "step size of the inner maximisation (default ε / steps, as "
                                  "the paper's code)", low=0, high=10, low_open=True)
    alpha: float = opt(0.2, "weight α of the unperturbed loss; 1 − α on the perturbed one (paper 0.2)",
                       low=0, high=1)
    lr: float = opt(0.2, "mask learning rate, SGD (paper 0.2)", low=0, high=100, low_open=True)
    momentum: float = opt(0.9, "SGD momentum (paper 0.9)", low=0, high=1, high_open=True)
    iterations: int = opt(300, "mask optimisation steps (paper 2000; shortened to fit CPUs)", low=1,
                          high=1_000_000)
    batch_size: int = opt(128, "batch size, sampled with replacement (paper 128)", low=2)
    bn_stats: str = opt("batch", "BatchNorm statistics while optimising: of the batch (paper's code) or "
                        "the stored running ones", choices=("batch", "running"))
    prune_by: str = opt("threshold", "prune neurons with mask < threshold (paper), the count lowest, or "
                        "the lowest while held-back clean accuracy drops at most drop points",
                        choices=("threshold", "count", "drop"))
    threshold: float = opt(0.2, "prune_by=threshold: mask value below which a neuron is pruned (paper "
                           "0.2)", low=0, high=1, low_open=True)
    count: int | None = opt(None, "prune_by=count: number of lowest-mask neurons to prune", low=1)
    drop: float = opt(4.0, "prune_by=drop: largest clean-accuracy drop (points) on the held-back data",
                      low=0, high=100)
    select_fraction: float = opt(0.2, "prune_by=drop: share of the clean data held back to measure the "
                                 "drop (the masks learn on the rest)", low=0, high=1, low_open=True,
                                 high_open=True)
    seed: int = opt(0, "seed (batches and perturbation starts)", low=0)


PAPER_SETTING = ("ResNet-18 on CIFAR-10, 500 clean images (1 %): ε 0.4, 1 inner step of 0.4, α 0.2, SGD "
                 "lr 0.2 momentum 0.9, batch 128, 2000 iterations, prune mask < 0.2")


@register("anp", "repair", Options, paper="Wu and Wang, Adversarial Neuron Pruning, NeurIPS 2021", revision=1,
          summary="prune the neurons that adversarial neuron perturbations expose, masks learnt on "
                  "clean data", needs=("clean",), paper_setting=PAPER_SETTING)
def run(clf, data: DefenderData, o: Options) -> Repaired:
    import numpy as np
    import torch

    from backdoorlab.errors import BadInput
    from backdoorlab.repairs import _neurons

    if o.prune_by == "count" and o.count is None:
        raise BadInput("anp: prune_by=count needs count")
    if o.count is not None and o.prune_by != "count":
        raise BadInput(f"anp: count goes with prune_by=count (prune_by is {o.prune_by})")
    torch.manual_seed(o.seed)
    work = clf.copy()
    found = _neurons.find(work)
    groups = found.groups
    if not groups:
        raise BadInput(f"anp: the network has no prunable neurons (skipped: {found.skipped or 'none'})")
    skipped = dict(found.skipped)
    if any(g.kind == "bn" for g in groups):  # the paper's code masks batch-norm channels only
        for g in groups:
            if g.kind != "bn":
                skipped[g.name] = ("no batch norm (where a network has batch norm, ANP masks its "
                                   "channels only)")
        groups = [g for g in groups if g.kind == "bn"]
    total = sum(g.size for g in groups)
    if o.count is not None and o.count > total:
        raise BadInput(f"anp: count {o.count} exceeds the {total} prunable neurons")
    clean = data.clean
    clean.require_labels()
    if len(clean) == 0:
        raise BadInput("anp: the clean data is empty")
    tune, select = clean, None
    if o.prune_by == "drop":
        from backdoorlab.defenses.fine_pruning import finetune_split

        tune, select = finetune_split(clean, o.select_fraction, o.seed)
        if len(tune) == 0 or len(select) == 0:
            raise BadInput(f"anp: {len(clean)} clean images are too few to hold back "
                           f"{o.select_fraction:g} of them")

    mask = _optimise(work, groups, tune, o)

    order = np.argsort(mask, kind="stable")
    notes: list[str] = []
    extra: dict = {}
    if o.prune_by == "threshold":
        chosen = np.flatnonzero(mask < o.threshold)
    elif o.prune_by == "count":
        chosen = order[:o.count]
    else:
        k, extra = _to_drop(clf.copy(), groups, mask, order, select, o.drop)  # the given BN statistics
        chosen = order[:k]
    flags = np.zeros(total, dtype=bool)
    flags[chosen] = True

    fixed = clf.copy()
    pruned: dict[str, np.ndarray] = {}
    per_layer: dict[str, list[int]] = {}
    masks_out: dict[str, list[float]] = {}
    start = 0
    for g in groups:
        idx = np.flatnonzero(flags[start:start + g.size])
        masks_out[g.name] = [round(float(v), 6) for v in mask[start:start + g.size]]
        start += g.size
        if idx.size:
            _neurons.zero(fixed.net, g, idx)
            pruned[g.path] = idx
            per_layer[g.name] = [int(i) for i in idx]
    _neurons.verify_zero(fixed, pruned, groups, seed=o.seed)
    n = int(flags.sum())
    fixed.provenance["anp"] = {"pruned": per_layer, "of": total, "prune_by": o.prune_by}
    if skipped:
        notes.append("not masked, left alone: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    rule = {"threshold": f"mask < {o.threshold:g}", "count": f"{o.count} lowest masks",
            "drop": f"≤ {o.drop:g} points held-back drop"}[o.prune_by]
    details = {"pruned": per_layer, "pruned_count": n, "neurons": total,
               "layers": {g.name: {"kind": g.kind, "size": g.size} for g in groups},
               "output_layer": found.output, "skipped": skipped, "prune_by": o.prune_by,
               "iterations": o.iterations, "tune_images": len(tune),
               "mask_min": float(mask.min()), "mask_mean": float(mask.mean()),
               "masks_below_threshold": int((mask < o.threshold).sum()), "mask": masks_out, **extra}
    return Repaired(fixed, details, notes, f"pruned {n}/{total} neurons ({rule})")


def _forward(net, groups, base, cw, cb, x):
    """``net`` on ``x`` with group g's weights scaled by ``cw`` and its biases by ``cb`` (flat
    per-neuron coefficients)."""
    from torch.func import functional_call

    params = {}
    start = 0
    for g, (w, b) in zip(groups, base, strict=True):
        sl = slice(start, start + g.size)
        start += g.size
        params[g.path + ".weight"] = w * cw[sl].view((-1,) + (1,) * (w.dim() - 1))
        if b is not None:
            params[g.path + ".bias"] = b * cb[sl]
    return functional_call(net, params, (x,))


def _optimise(work, groups, tune, o: Options):
    """The masks (flat, in group order) after ``o.iterations`` ANP steps on ``tune``."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from backdoorlab.progress import progress
    from backdoorlab.repairs._neurons import _BN

    net = work.net
    for p in net.parameters():
        p.requires_grad_(False)
    modules = dict(net.named_modules())
    base = [(modules[g.path].weight.detach(),
             None if modules[g.path].bias is None else modules[g.path].bias.detach()) for g in groups]
    total = sum(g.size for g in groups)
    net.eval()
    if o.bn_stats == "batch":
        for m in net.modules():
            if isinstance(m, _BN):
                m.train()
    dev = work.device
    # the batches and perturbation starts are drawn on the host (the same draws on every device)
    gen = torch.Generator().manual_seed(o.seed)  # CPU-only: draws moved to ``dev``
    images, labels = tune.images, torch.from_numpy(tune.require_labels())
    mask = torch.ones(total, requires_grad=True, device=dev)
    ones = torch.ones(total, device=dev)
    step = o.step_size if o.step_size is not None else o.eps / o.steps
    velocity = None  # SGD with momentum (torch.optim.SGD's rule, written out: no optimiser import)
    robust = o.eps > 0 and o.alpha < 1
    try:
        for _ in progress(range(o.iterations), desc="anp masks", total=o.iterations, unit="step"):
            idx = torch.randint(0, len(images), (o.batch_size,), generator=gen)
            x = work.to_tensor(images[idx.numpy()])  # CPU-only: idx is drawn on the host
            y = labels[idx].to(dev)
            if robust:
                m0 = mask.detach()
                d = ((torch.rand(total, generator=gen) * 2 - 1) * o.eps).to(dev)
                xi = ((torch.rand(total, generator=gen) * 2 - 1) * o.eps).to(dev)
                for _ in range(o.steps):  # signed ascent, not projected back (the paper's code)
                    d.requires_grad_(True)
                    xi.requires_grad_(True)
                    with work.autocast():
                        z = _forward(net, groups, base, m0 + d, 1 + xi, x)
                    loss = F.cross_entropy(z.float(), y)
                    gd, gx = torch.autograd.grad(loss, (d, xi), allow_unused=True)
                    d = d.detach() + step * (gd.sign() if gd is not None else 0)
                    xi = xi.detach() + step * (gx.sign() if gx is not None else 0)
            with work.autocast():
                z = _forward(net, groups, base, mask, ones, x)
            loss = F.cross_entropy(z.float(), y)
            if robust:
                with work.autocast():
                    z = _forward(net, groups, base, mask + d, 1 + xi, x)
                rob = F.cross_entropy(z.float(), y)
                loss = o.alpha * loss + (1 - o.alpha) * rob
            (grad,) = torch.autograd.grad(loss, (mask,))
            with torch.no_grad():
                velocity = grad if velocity is None else o.momentum * velocity + grad
                mask.sub_(o.lr * velocity).clamp_(0.0, 1.0)
    finally:
        net.eval()
    return mask.detach().cpu().numpy().astype(np.float64)


def _to_drop(work, groups, mask, order, select, drop: float) -> tuple[int, dict]:
    """How many of the lowest-mask neurons can be pruned (one more at a time) before the clean
    accuracy on ``select`` falls more than ``drop`` points below the unpruned network's."""
    import torch

    net = work.net
    net.eval()
    modules = dict(net.named_modules())
    base = [(modules[g.path].weight.detach(),
             None if modules[g.path].bias is None else modules[g.path].bias.detach()) for g in groups]
    y = select.require_labels()

    def accuracy(keep: torch.Tensor) -> float:
        right = 0
        with torch.no_grad(), work.autocast():
            for i in range(0, len(select), 256):
                out = _forward(net, groups, base, keep, keep, work.to_tensor(select.images[i:i + 256]))
                right += int((out.argmax(1).cpu().numpy() == y[i:i + 256]).sum())
        return 100.0 * right / len(select)

    keep = torch.ones(len(mask), device=work.device)
    first = accuracy(keep)
    k, acc = 0, first
    for j in order:
        keep[int(j)] = 0.0
        a = accuracy(keep)
        if first - a > drop:
            break
        k, acc = k + 1, a
    return k, {"select_images": len(select), "select_accuracy_before": round(first / 100, 6),
               "select_accuracy_after": round(acc / 100, 6)}
