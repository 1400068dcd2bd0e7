"""Spectral Signatures (Tran, Li and Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018).

Idea: a network trained on a poisoned set learns a strong feature for the trigger, so in the
learned representation of the target class the poisoned samples sit apart from the clean ones
along one direction. That direction dominates the class's covariance; robust statistics then
find the poisoned samples as the ones with the largest component along it.

Algorithm, per label y with n_y training samples labelled y:
1. r_i = the representation of sample i (default: the penultimate activations, i.e. the input of
   the network's output layer; ``layer`` picks another layer's output, flattened);
2. centre: M = [r_i − mean_y(r)], an n_y × D matrix;
3. v = the top right singular vector of M (the direction of largest variance);
4. score τ_i = ((r_i − mean_y(r)) · v)², the squared projection;
5. remove the round(1.5 · ε · n_y) samples of the class with the largest τ (ε: an upper bound on
   the share of poisoned samples in a class; 1.5: the paper's safety factor, ``removal_factor``).

Every class loses its top 1.5 ε share, poisoned or not (the method does not decide which class
is the target), so on a set poisoned in one class of K the precision over the whole set is at most
about 1 / (1.5 K); the paper judges the method by how many poisoned samples the removal catches
in the target class and by the attack success after retraining on what is left. The per-class
figures (``per_class``) hold, for each label, the class size, the count removed, the top singular
value and the share of the class's variance along v (a dominant direction, share near 1, is the
"spectral signature").

Numbers: ``scores`` are the τ of each sample; they are comparable within a class, not across
classes (each class has its own direction and scale). ``flagged``: the removed rows.

Where we differ from the paper: the paper trains a ResNet on CIFAR-10 with 5 % or 10 % of the
target class poisoned (ε set to that share) and reads the representation from a late layer of
its network; we take the penultimate layer of whatever model is given, and ε is the user's
bound. ε is a share of each CLASS, not of the whole set: when the poisoned samples outnumber the
clean ones in the target class (a small class, a large whole-set rate), the clean minority becomes
the outlier group and the method removes it instead; the per-class figures show this. Classes
with fewer than 2 samples are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backdoorlab.inspectors import Inspection, class_rows, features
from backdoorlab.options import opt
from backdoorlab.registry import register


@dataclass
class Options:
    epsilon: float = opt(0.05, "upper bound on the share of poisoned samples in a class (the "
                         "paper's ε; it ran 0.05 and 0.1)", low=0, high=0.5, low_open=True)
    removal_factor: float = opt(1.5, "remove removal_factor × ε × class size samples per class "
                                "(paper 1.5)", low=0, high=10, low_open=True)
    layer: str | None = opt(None, "layer whose output is the representation (default: the input "
                            "of the output layer, the penultimate activations)")
    batch_size: int = opt(256, "images per forward pass", low=1, high=65536)


def top_direction_scores(r: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(τ per row: squared projection of the centred rows on their top right singular vector, that
    singular value, the share of the total variance along it). ``r``: (n, D), n >= 1."""
    m = np.asarray(r, dtype=np.float64)
    m = m - m.mean(axis=0, keepdims=True)
    if not np.any(m):
        return np.zeros(len(m)), 0.0, 0.0
    if m.shape[1] <= m.shape[0]:  # D x D Gram matrix: cheap for a narrow representation
        w, vecs = np.linalg.eigh(m.T @ m)
        v = vecs[:, -1]
        total, top = float(w.clip(min=0).sum()), float(max(w[-1], 0.0))
    else:  # n x n Gram matrix: the left vector, mapped back to the right one
        w, vecs = np.linalg.eigh(m @ m.T)
        top, total = float(max(w[-1], 0.0)), float(w.clip(min=0).sum())
        v = m.T @ vecs[:, -1]
        v /= np.linalg.norm(v)
    proj = m @ v
    return proj * proj, float(np.sqrt(top)), (top / total if total > 0 else 0.0)


@register("spectral", "data-inspector", Options,
          paper="Tran, Li and Madry, Spectral Signatures in Backdoor Attacks, NeurIPS 2018",
          summary="per class, remove the samples with the largest squared projection of their "
                  "centred representation on its top singular vector",
          needs=("training-set",),
          paper_setting="ResNet on CIFAR-10, 5 % or 10 % of the target class poisoned, ε = that "
                        "share, 1.5 ε n removed per class, then retrained")
def run(clf, train, o: Options) -> Inspection:
    y = train.require_labels()
    feats, where = features(clf, train, o.layer, o.batch_size)
    scores = np.zeros(len(train), dtype=np.float64)
    flagged: list[np.ndarray] = []
    per_class: dict[int, dict] = {}
    for label, rows in class_rows(y).items():
        n = len(rows)
        if n < 2:
            per_class[label] = {"n": n, "removed": 0, "note": "fewer than 2 samples: left alone"}
            continue
        tau, sv, share = top_direction_scores(feats[rows])
        scores[rows] = tau
        k = min(n, int(o.removal_factor * o.epsilon * n + 0.5))
        top = rows[np.argsort(-tau, kind="stable")[:k]]
        flagged.append(top)
        per_class[label] = {"n": n, "removed": k, "top_singular_value": round(sv, 6),
                            "variance_share": round(share, 6),
                            "score_max": float(tau.max()), "score_median": float(np.median(tau)),
                            "cutoff": float(tau[np.argsort(-tau, kind="stable")[k - 1]]) if k else None}
    out = np.sort(np.concatenate(flagged)) if flagged else np.zeros(0, dtype=np.int64)
    return Inspection(scores=scores, flagged=out.astype(np.int64),
                      statistic="squared projection on the class's top singular vector",
                      per_class=per_class,
                      details={"representation": where, "dimension": int(feats.shape[1]),
                               "epsilon": o.epsilon, "removal_factor": o.removal_factor})
