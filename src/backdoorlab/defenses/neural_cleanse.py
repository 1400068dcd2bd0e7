"""Neural Cleanse: reverse-engineer a trigger per label and flag labels whose trigger is tiny.

Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
IEEE S&P 2019. For every label ``y`` find the smallest mask ``m`` (H×W, shared by the channels)
and pattern ``p`` (H×W×C) such that stamping them on clean images,

    x' = (1 - m) · x + m · p          (pixels in [0, 1])

makes the network answer ``y``. Objective ``CE(f(x'), y) + λ·|m|₁`` with ``m = (tanh(a)+1)/2``
and ``p = (tanh(b)+1)/2`` (tanh space keeps both in [0, 1]), Adam (lr 0.1, betas 0.5/0.9). ``x'``
is mapped to the network's input with the model's own `InputSpec` (``spec.from_unit``), so the
search is identical whatever pixel scale the network was trained on. A backdoor target needs a
much smaller mask than the other labels: the L1 norms go through the MAD outlier test
(`backdoorlab.defenses.outliers`; anomaly index > 2 ⇒ flagged).

λ follows the schedule of the authors' released code: λ = 0 until the attack success rate (ASR,
share of the batch classified as ``y``) has been ≥ ``attack_succ_threshold`` for ``patience``
consecutive checks, then ``init_cost``; afterwards λ ×= ``cost_multiplier`` after ``patience``
successful checks in a row and λ /= ``cost_multiplier**1.5`` after ``patience`` failing ones.
The smallest mask seen with ASR ≥ threshold is kept. Early stop (as released): once λ has gone
both up and down, stop when that best norm has not dropped below ``early_stop_threshold`` × its
previous best for ``early_stop_patience`` checks. A check happens every ``check_every``
mini-batch steps on the ASR and norm averaged over them (the released code checks once per epoch
of N/batch steps; ``check_every=None`` reproduces that; the default 1 checks after every step).
Where the defaults differ from the authors' example scripts (``gtsrb_visualize_example.py``;
BackdoorBench's ``nc`` configuration agrees with them), checked 2026-12-07 and not changed, because
every scan on record (the zoo, the repair grid, docs/detect-gtsrb.md) was made with ours: the
check after every step rather than every epoch (docs/detect-gtsrb.md measures the per-epoch
check at 11-12 times the image passes); ``cost_multiplier`` 1.5 (the visualizer class's default)
where the scripts set 2; early stop at ``early_stop_threshold`` 0.99 after 10 × ``patience``
checks where the scripts use 1.0 (any improvement resets) after 5 × ``patience`` epochs. Each
moves when a label stops and so its norm. On the 34 digits zoo models the scripts' constants
flagged as many backdoors (9 of 22) and one clean model fewer (0 of 7), at 1.3-2.2 times the
image passes (`benchmarks/nc_schedule_zoo.py`, docs/detection.md).

Speed (CPU): many labels are optimised at once — K labels × B images form one forward/backward
pass of K·B images (each label has its own mask, pattern, λ, Adam state and schedule; a label
that stops is replaced at once by the next one). ``mode="fast"`` adds a pre-selection: a short
*screen* round over every label, then the full optimisation only for the most suspicious labels
plus a seeded random sample of labels that estimates the median and MAD (see `NCConfig`).

Every label's result depends only on (model, clean images, config, seed, label), never on which
labels share its batch: the mask/pattern start is drawn from (seed, label) and the mini-batch
order from (seed, epoch). Finished labels are written (atomically) to ``state_dir`` so a killed
scan resumes where it stopped and ends with the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backdoorlab.data.imageset import ImageSet
from backdoorlab.defenses.outliers import detect_outliers, null_flag_rate, null_p_value
from backdoorlab.errors import BadInput
from backdoorlab.io import atomic_path, write_json
from backdoorlab.models.classifier import Classifier
from backdoorlab.progress import progress

STATE_VERSION = 1
FORWARD_IMAGES = 64  # images per forward pass when labels_per_batch is None


@dataclass
class NCConfig:
    """Options of a Neural Cleanse scan. Defaults are those of the authors' released code unless
    noted.

    Optimisation (per label): ``init_cost`` (λ once the attack first succeeds), ``lr`` and
    ``betas`` (Adam), ``adam_eps`` (Keras' 1e-7), ``attack_succ_threshold`` (ASR that counts as a
    success, 0.99), ``patience`` (checks in a row before λ changes, 5), ``cost_multiplier`` (λ up
    ×1.5, down ÷1.5**1.5), ``early_stop`` / ``early_stop_threshold`` (0.99: an improvement must
    shrink the best norm by ≥ 1 %) / ``early_stop_patience`` (checks; None = 10 × patience),
    ``batch_size`` (images per label per step, 32), ``epochs`` (1000) and ``max_steps`` (cap on
    mini-batch steps per label; None = epochs × ⌊N/batch⌋), ``check_every`` (mini-batch steps per
    schedule check; None = one epoch as released, default 1), ``num_images`` (clean images used,
    a seeded sample; None = all; the released code uses 1000).

    Scan: ``mode`` ``"full"`` (every label fully optimised) or ``"fast"`` (screen + selection),
    ``labels`` (labels to scan; None = all), ``labels_per_batch`` (labels optimised together;
    None = about 64 images per forward pass, i.e. 64 // batch: on a CPU, larger passes
    run fewer images per second once the activations outgrow the cache).

    Fast mode (not in the paper): a screen round runs every label for ``screen_steps`` steps with
    ``screen_batch`` images per label and ``screen_patience`` (no early stop), and ranks the
    labels by the smallest mask norm that reached the ASR threshold (labels that never reached it
    last, by ASR). The ``suspects`` best-ranked labels plus ``reference_labels`` labels drawn at
    random (seeded) are then optimised exactly as in full mode; the median and MAD come from the
    random sample only (an unbiased sample of all labels), and every fully optimised label is
    tested against them. With fewer labels than ``suspects + reference_labels`` every label is
    optimised fully.

    Detection: ``threshold`` (anomaly index above which a label is flagged, 2; ``"auto"`` (not in
    the paper): the index that a backdoor-free network's most anomalous label exceeds in only 5 %
    of scans of this shape, see `backdoorlab.defenses.outliers.null_flag_rate`), ``top_k`` (how
    many smallest masks to list), ``asr_images`` (clean images on which the final ASR of each
    reversed trigger is measured; None = all used images). ``seed`` seeds everything.
    """

    init_cost: float = 1e-3
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    adam_eps: float = 1e-7
    attack_succ_threshold: float = 0.99
    patience: int = 5
    cost_multiplier: float = 1.5
    early_stop: bool = True
    early_stop_threshold: float = 0.99
    early_stop_patience: int | None = None
    batch_size: int = 32
    epochs: int = 1000
    max_steps: int | None = None
    check_every: int | None = 1
    num_images: int | None = 1000
    mode: str = "fast"
    labels: list[int] | None = None
    labels_per_batch: int | None = None
    screen_steps: int = 40
    screen_batch: int = 8
    screen_patience: int = 2
    suspects: int = 10
    reference_labels: int = 32
    threshold: float | str = 2.0
    top_k: int = 5
    asr_images: int | None = None
    seed: int = 0

    def validate(self) -> None:
        def pos(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BadInput(f"Neural Cleanse option {name} must be a positive integer, got {v!r}")

        for name in ("patience", "batch_size", "epochs", "screen_steps", "screen_batch",
                     "screen_patience"):
            pos(name)
        for name in ("early_stop_patience", "max_steps", "check_every", "num_images",
                     "labels_per_batch", "asr_images"):
            pos(name, allow_none=True)
        if self.mode not in ("fast", "full"):
            raise BadInput(f"Neural Cleanse mode must be 'fast' or 'full', got {self.mode!r}")
        if not 0.0 < self.attack_succ_threshold <= 1.0:
            raise BadInput(f"attack_succ_threshold must be in (0, 1], got {self.attack_succ_threshold}")
        if not 0.0 < self.early_stop_threshold <= 1.0:
            raise BadInput(f"early_stop_threshold must be in (0, 1], got {self.early_stop_threshold}")
        if self.cost_multiplier <= 1.0:
            raise BadInput(f"cost_multiplier must be > 1, got {self.cost_multiplier}")
        if self.init_cost <= 0 or self.lr <= 0:
            raise BadInput("init_cost and lr must be positive")
        if not all(0.0 <= b < 1.0 for b in self.betas) or len(self.betas) != 2:
            raise BadInput(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.suspects < 0 or self.reference_labels < 1:
            raise BadInput("suspects must be >= 0 and reference_labels >= 1")
        if self.threshold != "auto" and (
                isinstance(self.threshold, (str, bool)) or not math.isfinite(self.threshold)
                or self.threshold < 0):
            raise BadInput(f"threshold must be a non-negative number or 'auto', got {self.threshold!r}")
        if self.top_k < 0:
            raise BadInput("top_k must be non-negative")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class LabelResult:
    """Outcome for one label.

    ``stage``: ``"full"`` (fully optimised) or ``"screen"`` (fast mode: screened only). ``norm``:
    L1 norm of the kept mask (sum of mask values in [0, 1]; pixels fully covered ≈ 1 each);
    ``reached``: whether any step reached the ASR threshold (if not, the last mask is kept, as in
    the released code); ``asr``: share of clean images (of other labels, when labels are known)
    that the kept trigger sends to ``label``; ``anomaly_index``: signed MAD index (positive =
    smaller than the median); ``steps``: mini-batch steps run; ``cost``: final λ; ``stop``:
    ``"early_stop"`` or ``"max_steps"``; ``passes``: images pushed forward+backward for this label.
    ``screen_*``: the screen round's figures (fast mode). ``resumed``: read from the state folder.
    """

    label: int
    stage: str
    norm: float | None = None
    anomaly_index: float | None = None
    flagged: bool = False
    reached: bool | None = None
    asr: float | None = None
    steps: int = 0
    cost: float | None = None
    stop: str | None = None
    passes: int = 0
    screen_norm: float | None = None
    screen_reached: bool | None = None
    screen_asr: float | None = None
    screen_index: float | None = None
    resumed: bool = False


@dataclass
class CleanseResult:
    """A Neural Cleanse scan.

    ``labels``: per-label results, sorted by label. ``flagged``: labels whose anomaly index
    exceeds ``threshold`` (most anomalous first). ``median``/``mad``: of the reference labels'
    norms (``reference_labels``: all fully optimised labels in full mode, the random sample in
    fast mode). ``smallest``: the ``top_k`` fully optimised labels with the smallest norms.
    ``passes``: images pushed forward+backward by the optimisation (all labels, including those
    resumed from the state folder); ``passes_this_run``: the part computed by this call;
    ``eval_passes``: forward-only images (final ASR, screen ranking excluded). ``seconds``: wall
    time of this call. ``null_flag_rate``: chance that a network *without* a backdoor shows at least
    one flagged label in a scan of this shape (number of labels, reference sample, suspects,
    threshold), under normally distributed norms; ``null_threshold_5pct``: the anomaly index that
    such a network's most anomalous label exceeds only 5 % of the time (see
    `backdoorlab.defenses.outliers.null_flag_rate`). ``p_value``: the model-level p-value, the
    chance that such a network's most anomalous label reaches this scan's top anomaly index
    (`backdoorlab.defenses.outliers.null_p_value`); ``label_p_values``: the same for each fully
    optimised label's own index. ``triggers``: label → (mask H×W, pattern
    H×W×C), float32 in [0, 1], for every fully optimised label (not in the JSON; see
    `save_triggers`).
    """

    mode: str
    labels: list[LabelResult]
    flagged: list[int]
    median: float
    mad: float
    threshold: float
    smallest: list[int]
    reference_labels: list[int]
    suspects: list[int]
    config: dict
    passes: int
    passes_this_run: int
    eval_passes: int
    seconds: float
    num_images: int
    input_scale: str
    model: str = ""
    null_flag_rate: float | None = None
    null_threshold_5pct: float | None = None
    p_value: float | None = None
    label_p_values: dict[int, float] = field(default_factory=dict)
    triggers: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def label(self, y: int) -> LabelResult:
        for r in self.labels:
            if r.label == y:
                return r
        raise KeyError(y)

    def full_labels(self) -> list[LabelResult]:
        """Fully optimised labels sorted by norm (smallest first)."""
        return sorted((r for r in self.labels if r.stage == "full"), key=lambda r: (r.norm, r.label))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "triggers"}
        d["labels"] = [asdict(r) for r in self.labels]
        return _json_safe(d)


def _json_safe(o):
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


# -- trigger composition -------------------------------------------------------------------------

def compose(x01: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 - m)·x + m·p`` on NHWC pixels in [0, 1]; ``mask`` (…, H, W, 1), ``pattern`` (…, H, W, C)."""
    return x01 + mask * (pattern - x01)


def apply_trigger(images: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Stamp a reversed trigger on uint8 NHWC images; returns uint8 (rounded)."""
    x = images.astype(np.float32) / 255.0
    m = np.asarray(mask, dtype=np.float32)[..., None] if np.ndim(mask) == 2 else mask
    out = x + m * (np.asarray(pattern, dtype=np.float32) - x)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def save_triggers(result: CleanseResult, path: str | os.PathLike) -> None:
    """Write the reversed triggers as ``.npz`` (``labels``, ``masks`` (L,H,W), ``patterns``
    (L,H,W,C), ``norms``; float32, read back with ``np.load(path, allow_pickle=False)``)."""
    write_triggers(result.triggers, path)


def write_triggers(triggers: dict[int, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike) -> None:
    """`save_triggers` for a plain label → (mask, pattern) dict (norms = mask L1 norms)."""
    ys = sorted(triggers)
    if not ys:
        raise BadInput("no reversed triggers to save")
    masks = np.stack([triggers[y][0] for y in ys]).astype(np.float32)
    patterns = np.stack([triggers[y][1] for y in ys]).astype(np.float32)
    norms = np.abs(masks).reshape(len(ys), -1).sum(1).astype(np.float64)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, labels=np.array(ys, dtype=np.int64), masks=masks, patterns=patterns, norms=norms)


def load_triggers(path: str | os.PathLike) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Read a file written by `save_triggers`: label → (mask, pattern)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            labels, masks, patterns = z["labels"], z["masks"], z["patterns"]
            ok = (labels.ndim == 1 and masks.ndim == 3 and patterns.ndim == 4
                  and len(labels) == len(masks) == len(patterns) and masks.shape[1:] == patterns.shape[1:3]
                  and labels.dtype.kind in "iu" and masks.dtype.kind == "f" and patterns.dtype.kind == "f")
            if not ok:
                raise ValueError("labels (L,), masks (L, H, W) and patterns (L, H, W, C) do not fit")
            for what, a in (("masks", masks), ("patterns", patterns)):
                if not np.all(np.isfinite(a)) or a.min(initial=0) < 0 or a.max(initial=0) > 1:
                    raise ValueError(f"{what} must be finite values in [0, 1]")
            return {int(y): (masks[i], patterns[i]) for i, y in enumerate(labels)}
    except (OSError, KeyError, ValueError, EOFError) as e:
        raise BadInput(f"{path}: not a reversed-trigger file ({e})") from None


#: the version of `repair_labels`' rule; it enters the cache key of the `run` cells that repair
#: with a scan's reversed triggers, so that a change of the rule computes them again
REPAIR_LABEL_RULE = 1


def repair_labels(flagged: list[int], label_p_values: dict, alpha: float = 0.05) -> list[int]:
    """The labels whose reversed triggers a repair uses, from a scan's ``flagged`` labels (anomaly
    index above the threshold, most anomalous first: the paper's rule) and its calibrated
    per-label p-values (``label_p_values``, keys int or str as in results.json).

    The flagged labels whose own p-value is at most ``alpha``; when none is, the most anomalous
    flagged label alone (the paper's "infected label"); none when nothing is flagged; every
    flagged label when no p-value is on record (a detector without one, e.g. ABS, flags by its
    own rule). The index rule alone flags some label in about two of three scans of a 43-label
    network without a backdoor (``null_flag_rate``), and a repair given several triggers splits
    its work between them: on GTSRB BadNets seed 1 the scan flagged 0 (the target, p 0.17), 1, 25
    and 2 (p ≥ 0.5), and unlearning all four left 5.6 % ASR where the target's trigger alone left
    0.0 % (docs/repairs-gtsrb.md). A multi-target attack shows one small p-value per target, and
    all of them are kept."""
    p = {int(k): float(v) for k, v in (label_p_values or {}).items()}
    if not p:
        return [int(y) for y in flagged]
    strong = [y for y in flagged if p.get(int(y), 1.0) <= alpha]
    return [int(y) for y in strong] if strong else [int(y) for y in flagged[:1]]


#: `repair_labels`' rule in words, for the lines that say which triggers a repair uses
REPAIR_LABEL_TEXT = "the flags with a calibrated p-value <= 0.05, else the most anomalous one"


def scan_p_values(results: dict) -> dict:
    """The per-label p-values of a scan's results.json: at the top for `cleanse`, in ``details``
    for `detect` (empty when the scan has none)."""
    return results.get("label_p_values") or (results.get("details") or {}).get("label_p_values") or {}


def scan_repair_labels(results: dict) -> list[int]:
    """`repair_labels` of a scan's results.json (``cleanse`` or ``detect``)."""
    return repair_labels(results.get("flagged") or [], scan_p_values(results))


# -- per-label optimisation state ----------------------------------------------------------------

@dataclass
class _Stage:
    name: str
    batch: int
    patience: int
    max_steps: int
    check_every: int
    early_stop: bool
    early_stop_patience: int


@dataclass
class _Track:
    """Schedule bookkeeping of one label (mirrors the released code's counters)."""

    label: int
    slot: int
    step: int = 0
    cost: float = 0.0
    cost_set_counter: int = 0
    up_counter: int = 0
    down_counter: int = 0
    up_flag: bool = False
    down_flag: bool = False
    best_norm: float = math.inf
    best_mask: torch.Tensor | None = None
    best_pattern: torch.Tensor | None = None
    es_counter: int = 0
    es_best: float = math.inf
    acc_sum: float = 0.0
    reg_sum: float = 0.0
    window: int = 0
    best_asr: float = 0.0
    last_acc: float = 0.0
    stop: str = ""


def _atanh_init(u: np.ndarray) -> np.ndarray:
    """tanh-space parameter whose (tanh+1)/2 equals ``u`` (clipped away from 0 and 1)."""
    return np.arctanh(np.clip(2.0 * u.astype(np.float64) - 1.0, -1 + 1e-6, 1 - 1e-6)).astype(np.float32)


class _Scanner:
    """Optimises many labels at once against shared clean images (see module docstring)."""

    def __init__(self, clf: Classifier, x01: torch.Tensor, cfg: NCConfig):
        self.clf = clf
        self.x = x01  # (N, H, W, C) float32 in [0, 1]
        self.cfg = cfg
        self.n = x01.shape[0]
        self._perms: dict[int, np.ndarray] = {}
        self.passes = 0
        self.eval_passes = 0

    # data order: epoch e's permutation depends on (seed, e) only
    def _batch_index(self, step: int, batch: int) -> np.ndarray:
        per_epoch = self.n // batch
        epoch, j = divmod(step, per_epoch)
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 64:
                self._perms.clear()
            perm = np.random.default_rng([self.cfg.seed, 7919, epoch]).permutation(self.n)
            self._perms[epoch] = perm
        return perm[j * batch:(j + 1) * batch]

    def _init_params(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        h, w, c = self.clf.spec.shape
        rng = np.random.default_rng([self.cfg.seed, 104729, label])
        return _atanh_init(rng.random((h, w, 1))), _atanh_init(rng.random((h, w, c)))

    def run(self, stage: _Stage, labels: list[int],
            done: Callable[[_Track, torch.Tensor, torch.Tensor, int], None]) -> Iterator[int]:
        """Optimise ``labels``; call ``done(track, mask, pattern, passes)`` per finished label and
        yield its label (for the progress bar)."""
        cfg = self.cfg
        h, w, c = self.clf.spec.shape
        k_slots = cfg.labels_per_batch or max(1, FORWARD_IMAGES // stage.batch)
        k_slots = max(1, min(k_slots, len(labels)))
        dev = self.clf.device
        a = torch.zeros(k_slots, h, w, 1, requires_grad=True, device=dev)
        b = torch.zeros(k_slots, h, w, c, requires_grad=True, device=dev)
        state = {name: torch.zeros_like(t) for name, t in
                 (("ma", a), ("va", a), ("mb", b), ("vb", b))}
        slots: list[_Track | None] = [None] * k_slots
        passes = [0] * k_slots
        queue = list(labels)
        b1, b2 = cfg.betas
        ups, downs = cfg.cost_multiplier, cfg.cost_multiplier ** 1.5
        thr = cfg.attack_succ_threshold

        def load(slot: int) -> None:
            if not queue:
                slots[slot] = None
                return
            y = queue.pop(0)
            ia, ib = self._init_params(y)
            with torch.no_grad():
                a[slot] = torch.from_numpy(ia).to(dev)
                b[slot] = torch.from_numpy(ib).to(dev)
                for t in state.values():
                    t[slot] = 0
            slots[slot] = _Track(label=y, slot=slot)
            passes[slot] = 0

        for s in range(k_slots):
            load(s)
        while any(t is not None for t in slots):
            active = [t for t in slots if t is not None]
            idx = torch.tensor([t.slot for t in active], device=dev)
            full = len(active) == k_slots
            aa = a if full else a[idx]
            bb = b if full else b[idx]
            mask = (torch.tanh(aa) + 1) / 2
            pattern = (torch.tanh(bb) + 1) / 2
            rows = np.stack([self._batch_index(t.step, stage.batch) for t in active])
            xb = self.x[torch.from_numpy(rows.reshape(-1))].view(len(active), stage.batch, h, w, c)
            xp = compose(xb, mask[:, None], pattern[:, None]).reshape(-1, h, w, c)
            with self.clf.autocast():
                logits = self.clf.net(self.clf.spec.from_unit(xp.permute(0, 3, 1, 2))).float()
            target = torch.tensor([t.label for t in active], device=dev).repeat_interleave(stage.batch)
            ce = F.cross_entropy(logits, target, reduction="none").view(len(active), -1).mean(1)
            reg = mask.sum(dim=(1, 2, 3))
            costs = torch.tensor([t.cost for t in active], dtype=reg.dtype, device=dev)
            (ce + costs * reg).sum().backward()
            with torch.no_grad():
                acc = (logits.argmax(1) == target).float().view(len(active), -1).mean(1)
                self._adam(a, b, state, idx, [t.step + 1 for t in active], b1, b2)
            a.grad = None
            b.grad = None
            self.passes += len(active) * stage.batch
            acc_l, reg_l = acc.tolist(), reg.detach().tolist()
            for i, t in enumerate(active):
                passes[t.slot] += stage.batch
                t.step += 1
                t.acc_sum += acc_l[i]
                t.reg_sum += reg_l[i]
                t.window += 1
                t.last_acc = acc_l[i]
                if t.window >= stage.check_every:
                    self._check(t, stage, mask[i].detach(), pattern[i].detach(), thr, ups, downs)
                if not t.stop and t.step >= stage.max_steps:
                    t.stop = "max_steps"
                if t.stop:
                    if t.best_mask is None:  # never reached the threshold: keep the last mask
                        t.best_mask = mask[i].detach().clone()
                        t.best_pattern = pattern[i].detach().clone()
                    done(t, t.best_mask, t.best_pattern, passes[t.slot])
                    load(t.slot)
                    yield t.label

    def _check(self, t: _Track, stage: _Stage, mask: torch.Tensor, pattern: torch.Tensor,
               thr: float, ups: float, downs: float) -> None:
        acc, reg = t.acc_sum / t.window, t.reg_sum / t.window
        t.acc_sum = t.reg_sum = 0.0
        t.window = 0
        cfg = self.cfg
        if acc >= thr and reg < t.best_norm:
            t.best_norm = reg
            t.best_asr = acc
            t.best_mask = mask.clone()
            t.best_pattern = pattern.clone()
        if stage.early_stop:
            if t.best_norm < math.inf:
                if t.best_norm >= cfg.early_stop_threshold * t.es_best:
                    t.es_counter += 1
                else:
                    t.es_counter = 0
            t.es_best = min(t.best_norm, t.es_best)
            if t.up_flag and t.down_flag and t.es_counter >= stage.early_stop_patience:
                t.stop = "early_stop"
        if t.cost == 0 and acc >= thr:
            t.cost_set_counter += 1
            if t.cost_set_counter >= stage.patience:
                t.cost = cfg.init_cost
                t.up_counter = t.down_counter = 0
                t.up_flag = t.down_flag = False
        else:
            t.cost_set_counter = 0
        if acc >= thr:
            t.up_counter += 1
            t.down_counter = 0
        else:
            t.up_counter = 0
            t.down_counter += 1
        if t.up_counter >= stage.patience:
            t.up_counter = 0
            t.cost *= ups
            t.up_flag = True
        elif t.down_counter >= stage.patience:
            t.down_counter = 0
            t.cost /= downs
            t.down_flag = True

    def _adam(self, a: torch.Tensor, b: torch.Tensor, state: dict, idx: torch.Tensor,
              steps: list[int], b1: float, b2: float) -> None:
        """Adam as in Keras 2 (the released code), per label with its own step count."""
        t = torch.tensor(steps, dtype=torch.float64)
        lr_t = (self.cfg.lr * torch.sqrt(1 - b2 ** t) / (1 - b1 ** t)).float().view(-1, 1, 1, 1).to(a.device)
        for p, m, v in ((a, state["ma"], state["va"]), (b, state["mb"], state["vb"])):
            g = p.grad[idx]
            m_new = b1 * m[idx] + (1 - b1) * g
            v_new = b2 * v[idx] + (1 - b2) * g * g
            m[idx] = m_new
            v[idx] = v_new
            p[idx] = p[idx] - lr_t * m_new / (torch.sqrt(v_new) + self.cfg.adam_eps)

    def asr(self, label: int, mask: torch.Tensor, pattern: torch.Tensor, x: torch.Tensor,
            batch: int = 512) -> float:
        """Share of ``x`` (NHWC [0, 1]) that the trigger sends to ``label``."""
        if len(x) == 0:
            return float("nan")
        hits = 0
        with torch.no_grad():
            for i in range(0, len(x), batch):
                xp = compose(x[i:i + batch], mask, pattern)
                with self.clf.autocast():
                    out = self.clf.net(self.clf.spec.from_unit(xp.permute(0, 3, 1, 2)))
                hits += int((out.argmax(1) == label).sum())
                self.eval_passes += len(xp)
        return hits / len(x)


# -- state folder ------------------------------------------------------------------------------

def _fingerprint(clf: Classifier, images: np.ndarray, cfg: NCConfig, stage: _Stage) -> str:
    h = hashlib.sha256()
    for k, v in sorted(clf.net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    h.update(json.dumps(clf.spec.to_dict(), sort_keys=True).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    keys = ("init_cost", "lr", "betas", "adam_eps", "attack_succ_threshold", "cost_multiplier",
            "early_stop_threshold", "seed")
    opts = {k: getattr(cfg, k) for k in keys}
    opts["stage"] = asdict(stage)
    opts["version"] = STATE_VERSION
    h.update(json.dumps(opts, sort_keys=True, default=list).encode())
    return h.hexdigest()


class _State:
    """Per-label results of one stage in ``root/<stage>/`` (JSON, plus .npz for full-stage
    triggers), each written atomically; ``meta.json`` pins the settings they belong to."""

    def __init__(self, root: Path | None, stage: str, fingerprint: str):
        self.dir = None if root is None else Path(root) / stage
        self.fingerprint = fingerprint
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if meta.exists():
            try:
                old = json.loads(meta.read_text()).get("fingerprint")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                old = None
            if old != fingerprint:
                raise BadInput(f"{self.dir}: holds a scan of another model, data set or settings; "
                               f"use another output folder or delete {self.dir.parent}")
        else:
            write_json(meta, {"fingerprint": fingerprint, "version": STATE_VERSION})

    def _paths(self, label: int) -> tuple[Path, Path]:
        assert self.dir is not None
        return self.dir / f"label_{label:05d}.json", self.dir / f"label_{label:05d}.npz"

    def load(self, label: int, arrays: bool) -> tuple[dict, np.ndarray | None, np.ndarray | None] | None:
        if self.dir is None:
            return None
        js, npz = self._paths(label)
        if not js.exists() or (arrays and not npz.exists()):
            return None
        try:
            rec = json.loads(js.read_text())
            if rec.get("fingerprint") != self.fingerprint or rec.get("label") != label:
                return None
            if not arrays:
                return rec, None, None
            with np.load(npz, allow_pickle=False) as z:
                return rec, z["mask"].copy(), z["pattern"].copy()
        except (OSError, ValueError, KeyError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def save(self, label: int, rec: dict, mask: np.ndarray | None, pattern: np.ndarray | None) -> None:
        if self.dir is None:
            return
        js, npz = self._paths(label)
        if mask is not None:
            with atomic_path(npz) as tmp, open(tmp, "wb") as f:
                np.savez(f, mask=mask, pattern=pattern)
        write_json(js, {**rec, "label": label, "fingerprint": self.fingerprint})


# -- the scan ----------------------------------------------------------------------------------

def _select(screen: dict[int, dict], cfg: NCConfig, labels: list[int]) -> tuple[list[int], list[int]]:
    """Fast mode: (suspects, random reference labels) from the screen records."""
    def rank(y: int) -> tuple:
        r = screen[y]
        return (not r["reached"], r["norm"] if r["reached"] else -r["asr"], y)

    suspects = sorted(labels, key=rank)[: cfg.suspects]
    rng = np.random.default_rng([cfg.seed, 15485863])
    n_ref = min(cfg.reference_labels, len(labels))
    reference = sorted(int(y) for y in rng.choice(np.array(labels), size=n_ref, replace=False))
    return sorted(suspects), reference


def neural_cleanse(clf: Classifier, clean: ImageSet, config: NCConfig | None = None, *,
                   state_dir: str | os.PathLike | None = None,
                   on_label: Callable[[str, int, dict], None] | None = None) -> CleanseResult:
    """Run a Neural Cleanse scan of ``clf`` on ``clean`` images (labels optional).

    ``state_dir``: folder for per-label results; a re-run with the same folder skips finished
    labels (it refuses a folder from another model, data set or settings). ``on_label(stage,
    label, record)`` is called after each label is finished and saved (stage ``"screen"`` or
    ``"full"``).
    """
    cfg = config or NCConfig()
    cfg.validate()
    t0 = time.perf_counter()
    clf.spec.check(clean.images, f"clean data {clean.name!r}")
    if len(clean) == 0:
        raise BadInput("clean data: no images")
    nc = clf.num_classes
    labels = list(range(nc)) if cfg.labels is None else sorted(set(int(y) for y in cfg.labels))
    bad = [y for y in labels if not 0 <= y < nc]
    if bad or not labels:
        raise BadInput(f"labels to scan must lie in [0, {nc - 1}], got {bad or 'none'}")
    data = clean.take(cfg.num_images, seed=cfg.seed) if cfg.num_images else clean
    n = len(data)
    x01 = torch.from_numpy(data.images).float().div_(255.0).contiguous().to(clf.device)
    y_clean = data.labels
    check = cfg.check_every or max(1, n // min(cfg.batch_size, n))
    full_stage = _Stage("full", batch=min(cfg.batch_size, n), patience=cfg.patience,
                        max_steps=cfg.max_steps or cfg.epochs * (n // min(cfg.batch_size, n)),
                        check_every=check, early_stop=cfg.early_stop,
                        early_stop_patience=cfg.early_stop_patience or 10 * cfg.patience)
    screen_stage = _Stage("screen", batch=min(cfg.screen_batch, n), patience=cfg.screen_patience,
                          max_steps=cfg.screen_steps, check_every=1, early_stop=False,
                          early_stop_patience=0)
    scanner = _Scanner(clf, x01, cfg)
    root = Path(state_dir) if state_dir is not None else None
    passes_before = 0
    results: dict[int, LabelResult] = {}
    triggers: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    with clf.frozen():
        # ---- screen (fast mode) ----
        suspects: list[int] = []
        reference: list[int] = list(labels)
        full_labels = list(labels)
        if cfg.mode == "fast" and len(labels) > cfg.suspects + cfg.reference_labels:
            st = _State(root, "screen", _fingerprint(clf, data.images, cfg, screen_stage))
            screen: dict[int, dict] = {}
            todo = []
            for y in labels:
                got = st.load(y, arrays=False)
                if got is None:
                    todo.append(y)
                else:
                    screen[y] = got[0]
                    passes_before += int(got[0]["passes"])

            def screen_done(t: _Track, mask: torch.Tensor, pattern: torch.Tensor, p: int) -> None:
                rec = {"norm": float(mask.sum()), "reached": t.best_norm < math.inf,
                       "asr": t.best_asr if t.best_norm < math.inf else t.last_acc,
                       "steps": t.step, "passes": p}
                st.save(t.label, rec, None, None)
                screen[t.label] = rec
                if on_label is not None:
                    on_label("screen", t.label, rec)

            for _ in progress(scanner.run(screen_stage, todo, screen_done),
                              desc="neural cleanse: screen", total=len(todo), unit="label"):
                pass
            suspects, reference = _select(screen, cfg, labels)
            full_labels = sorted(set(suspects) | set(reference))
            s_out = detect_outliers({y: screen[y]["norm"] for y in labels}, 2.0, 0)  # indices only
            for y, ix in zip(s_out.keys, s_out.index, strict=True):
                r = screen[y]
                results[y] = LabelResult(label=y, stage="screen", steps=r["steps"], passes=r["passes"],
                                         screen_norm=r["norm"], screen_reached=r["reached"],
                                         screen_asr=r["asr"], screen_index=ix,
                                         resumed=y not in todo)

        # ---- full optimisation ----
        st = _State(root, "full", _fingerprint(clf, data.images, cfg, full_stage))
        todo = []
        for y in full_labels:
            got = st.load(y, arrays=True)
            if got is None:
                todo.append(y)
                continue
            rec, m, p = got
            passes_before += int(rec["passes"])
            triggers[y] = (m, p)
            _store_full(results, y, rec, resumed=True)

        def full_done(t: _Track, mask: torch.Tensor, pattern: torch.Tensor, p: int) -> None:
            keep = np.ones(n, dtype=bool) if y_clean is None else y_clean != t.label
            xs = x01[torch.from_numpy(np.flatnonzero(keep))]
            if cfg.asr_images is not None and len(xs) > cfg.asr_images:
                xs = xs[: cfg.asr_images]
            asr = scanner.asr(t.label, mask, pattern, xs)
            m = mask[..., 0].cpu().numpy().astype(np.float32)
            pt = pattern.cpu().numpy().astype(np.float32)
            rec = {"norm": float(m.sum(dtype=np.float64)), "reached": t.best_norm < math.inf,
                   "asr": asr, "steps": t.step, "cost": t.cost, "stop": t.stop, "passes": p}
            st.save(t.label, rec, m, pt)
            triggers[t.label] = (m, pt)
            _store_full(results, t.label, rec, resumed=False)
            if on_label is not None:
                on_label("full", t.label, rec)

        for _ in progress(scanner.run(full_stage, todo, full_done),
                          desc=f"neural cleanse: {len(todo)} labels", total=len(todo), unit="label"):
            pass

    # ---- detection ----
    screened = cfg.mode == "fast" and bool(suspects)  # median/MAD from the random reference only
    asked = None if cfg.threshold == "auto" else float(cfg.threshold)
    shape = (len(labels), len(reference), len(suspects)) if screened else (len(full_labels), None, 0)
    null = null_flag_rate(shape[0], asked, shape[1], shape[2], seed=cfg.seed)
    norms = {y: results[y].norm for y in full_labels}
    out = detect_outliers(norms, null.threshold, cfg.top_k, reference=reference if screened else None)
    for y, ix in zip(out.keys, out.index, strict=True):
        results[y].anomaly_index = ix
        results[y].flagged = ix > null.threshold
    label_p = dict(zip(out.keys, null_p_value(out.index, *shape, seed=cfg.seed), strict=True))
    total = passes_before + scanner.passes
    return CleanseResult(
        mode=cfg.mode, labels=[results[y] for y in sorted(results)], flagged=out.flagged,
        median=out.median, mad=out.mad, threshold=null.threshold, smallest=out.smallest,
        reference_labels=out.reference, suspects=suspects, config=cfg.to_dict(), passes=total,
        passes_this_run=scanner.passes, eval_passes=scanner.eval_passes,
        seconds=time.perf_counter() - t0, num_images=n, input_scale=clf.spec.scale,
        model=clf.describe(), null_flag_rate=null.rate, null_threshold_5pct=null.threshold_5pct,
        p_value=min(label_p.values()) if label_p else None, label_p_values=label_p, triggers=triggers)


def _store_full(results: dict[int, LabelResult], y: int, rec: dict, resumed: bool) -> None:
    r = results.get(y) or LabelResult(label=y, stage="full")
    r.stage = "full"
    r.norm = float(rec["norm"])
    r.reached = bool(rec["reached"])
    r.asr = rec["asr"]
    r.steps = int(rec["steps"])
    r.cost = float(rec["cost"])
    r.stop = rec["stop"]
    r.passes = int(rec["passes"]) + (r.passes if r.screen_norm is not None else 0)
    r.resumed = resumed
    results[y] = r
