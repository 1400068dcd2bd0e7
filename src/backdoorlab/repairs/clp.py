"""Channel Lipschitzness-based Pruning (Zheng, Tang, Li and Liu, "Data-free Backdoor Removal based
on Channel Lipschitzness", ECCV 2022).

Data-free: the model's weights alone decide. The channel Lipschitz constant (CLC) of channel k of a
conv layer bounds how much that channel's output can change for a change of the layer's input; a
trigger is a small input change that moves a few backdoor channels a lot, so those channels have
an unusually large constant. Its upper bound (UCLC) is the spectral norm (largest singular value)
of the channel's kernel W_k, shaped (in_channels, kh · kw) — one row per input channel, one column
per kernel position — and, where a BatchNorm follows the conv, folded with it: W_k · |γ_k / σ_k|,
σ_k = sqrt(running_var_k + eps), the factor the BN actually multiplies the channel by. Within each
conv layer the channels with UCLC > mean + u · std of that layer (unbiased std) are pruned, u = 3
by default (the paper's default; it studies a range of u and reports CLP as robust to it). Larger
u prunes fewer channels.

Pruning switches a channel off exactly: the following BN's gamma and beta are zeroed (the paper's
choice), or, for a conv without a BN (small_cnn, DeepID, residual convs), its kernel row and bias;
the channel is then 0 after its activation (checked on noise images). Every conv layer but an
output layer is scanned; dense layers are not (the paper defines CLP for convolutions). A conv
whose fused activation maps 0 to a non-zero value cannot be switched off and is left alone (noted).

Which BN follows which conv is read from one pass of a blank image through a copy of the network
(tensor identity, not data, not counted as an image pass); the paper's code pairs each BN with the
conv defined before it, which here differs only where a BN reads a residual sum (PreAct-ResNet's
bn1 and final BN): those BNs are not scored or pruned here (the paper's code scores them with the
kernel of the conv registered just before them, which does not produce their input), and the
convs before them (conv2, shortcut) are scored on their own kernel and pruned by zeroing it. The
paper's code also leaves out eps in sigma; with it, a channel whose running variance is 0 gets a
finite bound here (an infinite one there, which disables its whole layer). ``needs =
("clean",)`` is declared because the repair framework measures on the defender's clean data; the
method never reads it.

Paper's setting: ResNet-18 / VGG on CIFAR-10 (and others), u = 3, no data. Ours: the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from backdoorlab.options import opt
from backdoorlab.registry import register
from backdoorlab.repairs import DefenderData, Repaired


@dataclass
class Options:
    u: float = opt(3.0, "prune channels whose UCLC exceeds mean + u·std of their layer (paper 3)",
                   low=0, high=1000)


@register("clp", "repair", Options,
          paper="Zheng, Tang, Li and Liu, Channel Lipschitzness-based Pruning, ECCV 2022",
          summary="data-free: prune conv channels with an outlying channel Lipschitz upper bound",
          needs=("clean",), paper_setting="ResNet-18 on CIFAR-10, no data, u = 3")
def run(clf, data: DefenderData, o: Options) -> Repaired:
    import numpy as np

    from backdoorlab.repairs import _neurons

    fixed = clf.copy()
    found = _neurons.find(fixed)
    layers, per_layer, pruned, notes = [], {}, {}, []
    scored = 0
    for g, conv_name, uclc in uclc_scores(fixed, found.groups):
        mean, std = float(uclc.mean()), float(uclc.std(ddof=1)) if len(uclc) > 1 else 0.0
        limit = mean + o.u * std
        idx = np.flatnonzero(uclc > limit) if len(uclc) > 1 else np.array([], dtype=np.int64)
        scored += g.size
        layers.append({"layer": conv_name, "zeroed_at": g.name, "channels": g.size,
                       "pruned": [int(i) for i in idx], "uclc_mean": mean, "uclc_std": std,
                       "limit": limit, "uclc_max": float(uclc.max()),
                       "uclc": [round(float(v), 5) for v in uclc]})
        if idx.size:
            _neurons.zero(fixed.net, g, idx)
            pruned[g.path] = idx
            per_layer[conv_name] = [int(i) for i in idx]
    if not layers:
        from backdoorlab.errors import BadInput

        raise BadInput(f"clp: the network has no conv layer that can be pruned by channel "
                       f"(skipped: {found.skipped or 'none'})")
    _neurons.verify_zero(fixed, pruned, found.groups)
    n = sum(len(v) for v in per_layer.values())
    skipped = {k: v for k, v in found.skipped.items()}
    if skipped:
        notes.append("not prunable, left alone: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    fixed.provenance["clp"] = {"pruned": per_layer, "of": scored, "u": o.u}
    return Repaired(fixed, {"u": o.u, "pruned": per_layer, "pruned_count": n, "channels": scored,
                            "layers": layers, "skipped": skipped}, notes,
                    f"pruned {n}/{scored} channels (u={o.u:g})")


def uclc_scores(clf, groups):
    """(group, conv layer name, UCLC per channel as float64) for every neuron group that holds a
    conv layer's channels (the conv itself, or the BN that reads it). Computed on the host in
    float64 from a copy of the weights (wherever the network lives; MPS has no float64)."""
    import numpy as np
    import torch
    from torch import nn

    from backdoorlab.repairs._neurons import display_names

    net = clf.net
    modules = dict(net.named_modules())
    names = display_names(net)
    out = []
    for g in groups:
        conv = modules.get(g.source) if g.source else None
        if not isinstance(conv, nn.Conv2d):
            continue
        with torch.no_grad():
            w = conv.weight.detach().cpu().double()
            mats = w.reshape(w.shape[0], w.shape[1], -1)  # (out, in_channels / groups, kh * kw)
            uclc = torch.linalg.matrix_norm(mats, ord=2)
            if g.kind == "bn":
                bn = modules[g.path]
                if bn.running_var is None:
                    continue  # no stored statistics: the BN's factor depends on the batch
                scale = (bn.weight.detach().cpu().double()
                         / torch.sqrt(bn.running_var.detach().cpu().double() + bn.eps))
                uclc = uclc * scale.abs()
        out.append((g, names[g.source], uclc.cpu().numpy().astype(np.float64)))
    return out
