"""Pruning defense: a fast channel-pruning sweep (Liu et al., "Fine-Pruning", RAID 2018).

The last convolutional layer of a (possibly backdoored) network is pruned channel by channel in
order of increasing *mean activation on clean validation data*; after every channel the sweep
records validation accuracy, clean test accuracy and attack success rate (ASR) on poisoned test
data, and marks the first steps where validation accuracy has dropped by 2, 4, 10 and 30 (percentage
points below the unpruned validation accuracy by default, or % of it with ``drop_unit="relative"``).

Mean activation of channel c = mean over validation images and spatial positions of the layer's
post-activation output, read at the *measure point* (e.g. DeepID: conv_3 measured at pool_3, after
max pooling). Pruning c = zeroing that channel there, which equals zeroing its weights (see
`backdoorlab.defenses.masking`).

Speed. The network is never re-run in full per step:

1. ``net.forward_to(point, x)`` runs once per data set; the activations are kept as float32
   (memory: images × channels × height × width × 4 bytes, e.g. 4.8 kB per DeepID image at pool_3);
2. per step the pruned channel is zeroed in the cache and only ``net.forward_from(point, h)`` runs;
3. only rows where the pruned channel was non-zero somewhere are re-run — for the others the masked
   input, hence the prediction, is unchanged (exact, not an approximation);
4. DeepID's head is fc_1(flatten(p)) + fc_2(flatten(conv_4(p))): both fc_1 and conv_4's
   pre-activation are linear in p, so pruning channel c subtracts that channel's contribution from
   them (kept in float64 so 60 subtractions do not drift); only conv_4's ReLU, fc_2 and the output
   layer are recomputed.

Networks that are not `StagedNet`s (or layers nested inside a stage) fall back to a forward hook that
masks the layer's output and re-runs the whole network on the affected rows (slower, same result).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backdoorlab.data.imageset import ImageSet
from backdoorlab.errors import BadInput
from backdoorlab.models.classifier import Classifier
from backdoorlab.poisoned import as_list, poisoned_sets
from backdoorlab.progress import progress

from .masking import PruneTarget, mask_from_channels, resolve_target

ORDERS = ("increasing", "decreasing", "abs", "random")
DROP_UNITS = ("points", "relative")
STOPS = ("all", "max_drop")
METHODS = ("auto", "incremental", "cached", "hook")
UNITS = {
    "points": "percentage points below the unpruned validation accuracy",
    "relative": "% of the unpruned validation accuracy",
}


@dataclass
class Threshold:
    """The first sweep step whose validation-accuracy drop is >= ``drop`` (in ``unit``)."""

    drop: float
    unit: str
    reached: bool
    step: int | None = None
    pruned: int | None = None
    mask: np.ndarray | None = None  # bool over channels, True = pruned
    achieved_drop: float | None = None
    valid_accuracy: float | None = None
    test_accuracy: float | None = None
    asr: float | None = None  # first poisoned set
    asr_sets: list[float] | None = None  # every poisoned set, in order

    def to_dict(self) -> dict:
        return {"drop": self.drop, "unit": self.unit, "reached": self.reached, "step": self.step,
                "pruned": self.pruned, "achieved_drop": self.achieved_drop,
                "pruned_channels": None if self.mask is None else np.flatnonzero(self.mask).tolist(),
                "valid_accuracy": self.valid_accuracy, "test_accuracy": self.test_accuracy,
                "asr": self.asr, "asr_sets": self.asr_sets}


@dataclass
class PruneSweepResult:
    """Per-step figures of a pruning sweep. Accuracies and ASR are shares in [0, 1]; step k has
    ``pruned[k]`` channels pruned (step 0 = the unpruned model); ``drop[k]`` is the validation
    accuracy drop in ``drop_unit``; ``ranking`` lists channel indices in pruning order. With
    several poisoned sets, ``asr_sets[i]`` is set i's ASR per step and ``asr`` the first's."""

    layer: str
    point: str | None
    weights: str
    order: str
    num_channels: int
    ranking: np.ndarray
    mean_activation: np.ndarray
    pruned: np.ndarray
    fraction: np.ndarray
    valid_accuracy: np.ndarray
    drop: np.ndarray
    drops: tuple[float, ...]
    drop_unit: str
    thresholds: list[Threshold]
    test_accuracy: np.ndarray | None = None
    asr: np.ndarray | None = None
    target: int | None = None
    asr_rule: str | None = None
    asr_sets: list[np.ndarray] = field(default_factory=list)
    poisoned_sets: list[dict] = field(default_factory=list)  # PoisonedSet.describe() per set
    counts: dict = field(default_factory=dict)
    stop: str = "all"
    seed: int = 0
    method: str = ""
    timings: dict = field(default_factory=dict)
    cache_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    # predictions per data set ("valid", "test", "poisoned", "poisoned:1", ...) at step 0 and at
    # each threshold step; poisoned rows are those counted for the ASR, whose targets are
    # ``poisoned_targets[i]``
    predictions: dict[int, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    poisoned_targets: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def steps(self) -> int:
        return len(self.pruned)

    def mask_at(self, step: int) -> np.ndarray:
        """Channel mask (True = pruned) after ``step`` steps."""
        return mask_from_channels(self.num_channels, self.ranking[:step])

    def threshold(self, drop: float) -> Threshold:
        for t in self.thresholds:
            if abs(t.drop - drop) < 1e-12:
                return t
        raise KeyError(drop)

    def to_dict(self) -> dict:
        def arr(a):
            return None if a is None else [float(v) for v in a]

        return {
            "layer": self.layer, "measure_point": self.point, "weights_zeroed": self.weights,
            "order": self.order, "num_channels": self.num_channels,
            "ranking": [int(c) for c in self.ranking],
            "mean_activation": arr(self.mean_activation),
            "drops": list(self.drops), "drop_unit": self.drop_unit,
            "units": {"accuracy": "share in [0, 1]", "asr": "share in [0, 1]",
                      "drop": UNITS[self.drop_unit], "fraction": "share of the layer's channels pruned",
                      "mean_activation": "mean post-activation output per channel over clean "
                                         "validation images and spatial positions at the measure point"},
            "steps": {"pruned": [int(v) for v in self.pruned], "fraction": arr(self.fraction),
                      "valid_accuracy": arr(self.valid_accuracy), "drop": arr(self.drop),
                      "test_accuracy": arr(self.test_accuracy), "asr": arr(self.asr)},
            "thresholds": [t.to_dict() for t in self.thresholds],
            "target": self.target, "asr_rule": self.asr_rule,
            "poisoned_sets": [{**d, "asr": arr(a)} for d, a in zip(self.poisoned_sets, self.asr_sets,
                                                                   strict=True)],
            "counts": self.counts,
            "stop": self.stop, "seed": self.seed, "method": self.method, "timings": self.timings,
            "cache_bytes": self.cache_bytes, "notes": self.notes,
        }


# -- threshold bookkeeping --------------------------------------------------------------------

def accuracy_drop(valid_accuracy: np.ndarray, unit: str = "points") -> np.ndarray:
    """Drop of validation accuracy below step 0, in percentage ``points`` or ``relative`` %."""
    if unit not in DROP_UNITS:
        raise BadInput(f"drop unit must be one of {', '.join(DROP_UNITS)}, got {unit!r}")
    acc = np.asarray(valid_accuracy, dtype=np.float64)
    base = acc[0]
    if unit == "points":
        return (base - acc) * 100.0
    if base <= 0:
        return np.zeros_like(acc)  # nothing to lose: a relative drop is never reached
    return (base - acc) / base * 100.0


def find_thresholds(valid_accuracy: np.ndarray, drops: tuple[float, ...] | list[float],
                    unit: str = "points") -> list[int | None]:
    """For each drop d, the first step k with drop(k) >= d (None when never reached).

    A tolerance of 1e-9 absorbs float rounding (0.5 - 0.48 is not exactly 0.02)."""
    d = accuracy_drop(valid_accuracy, unit)
    out: list[int | None] = []
    for want in drops:
        hit = np.flatnonzero(d >= float(want) - 1e-9)
        out.append(int(hit[0]) if len(hit) else None)
    return out


def parse_drops(drops) -> tuple[float, ...]:
    """Validate drops: positive numbers, returned sorted without duplicates."""
    try:
        vals = [float(v) for v in drops]
    except (TypeError, ValueError):
        raise BadInput(f"drops must be numbers, got {drops!r}") from None
    if not vals or any(not np.isfinite(v) or v <= 0 or v > 100 for v in vals):
        raise BadInput(f"drops must be numbers in (0, 100] (an accuracy drop in points or % of the "
                       f"unpruned accuracy), got {drops!r}")
    return tuple(sorted(set(vals)))


def ranking_from(mean: np.ndarray, mean_abs: np.ndarray, order: str, seed: int) -> np.ndarray:
    """Channel pruning order. Ties break by channel index (stable sort)."""
    if order == "increasing":
        return np.argsort(mean, kind="stable")
    if order == "decreasing":
        return np.argsort(-mean, kind="stable")
    if order == "abs":
        return np.argsort(mean_abs, kind="stable")
    if order == "random":
        return np.random.default_rng(seed).permutation(len(mean))
    raise BadInput(f"order must be one of {', '.join(ORDERS)}, got {order!r}")


# -- per data-set state -----------------------------------------------------------------------

@dataclass
class _Set:
    """One data set in the sweep: cached activations (or images), which channels are non-zero for
    each row, current predictions and labels (true labels; for ASR, each row's attack target)."""

    name: str
    kind: str  # "acc" | "asr"
    images: np.ndarray
    labels: torch.Tensor | None
    cache: torch.Tensor | None = None
    active: torch.Tensor | None = None  # (N, C) bool
    preds: torch.Tensor | None = None
    aux: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def keep(self, rows: np.ndarray) -> None:
        idx = torch.from_numpy(np.flatnonzero(rows))
        self.images = self.images[rows]
        if self.labels is not None:
            self.labels = self.labels[idx]
        for name in ("cache", "active", "preds"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[idx])
        self.aux = {k: v[idx] for k, v in self.aux.items()}

    def score(self) -> float:
        """Share of rows whose prediction equals their label (true label, or attack target)."""
        if len(self) == 0:
            return float("nan")
        return float((self.preds == self.labels).sum().item()) / len(self)


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _row_batches(rows: torch.Tensor | None, n: int, size: int):
    """Batches of row indices: slices over all rows, or index tensors over ``rows``."""
    if rows is None:
        yield from _chunks(n, size)
    else:
        for s in _chunks(len(rows), size):
            yield rows[s]


def _channel_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel sum, sum of |.| (float64) and per-row activity (bool) of a batch (N, C, ...)."""
    dims = tuple(d for d in range(h.dim()) if d != 1)
    spatial = tuple(range(2, h.dim()))
    s = h.sum(dim=dims, dtype=torch.float64)
    a = h.abs().sum(dim=dims, dtype=torch.float64)
    act = (h != 0).any(dim=spatial) if spatial else (h != 0)
    return s, a, act


# -- engines ----------------------------------------------------------------------------------

class _CachedEngine:
    """StagedNet: cache the activations at ``point``; per step zero a channel, run the tail."""

    method = "cached"

    def __init__(self, clf: Classifier, point: str, batch_size: int, tail_batch: int):
        self.clf, self.point = clf, point
        self.batch_size, self.tail_batch = batch_size, tail_batch

    def cache(self, s: _Set) -> tuple[torch.Tensor, torch.Tensor]:
        net, n = self.clf.net, len(s)
        sums = abss = None
        with torch.inference_mode():
            for sl in _chunks(n, self.batch_size):
                h = net.forward_to(self.point, self.clf.to_tensor(s.images[sl])).float()
                if s.cache is None:
                    fmt = torch.channels_last if h.dim() == 4 and self.clf.channels_last \
                        else torch.contiguous_format
                    s.cache = torch.empty((n, *h.shape[1:]), dtype=torch.float32, memory_format=fmt)
                    s.active = torch.empty((n, h.shape[1]), dtype=torch.bool)
                s.cache[sl] = h
                bs, ba, act = _channel_stats(h)
                s.active[sl] = act
                sums = bs if sums is None else sums + bs
                abss = ba if abss is None else abss + ba
        per = len(s) * (int(np.prod(s.cache.shape[2:])) if s.cache.dim() > 2 else 1)
        return sums / max(per, 1), abss / max(per, 1)

    def _tail(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() == 4 and self.clf.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        return self.clf.net.forward_from(self.point, h).argmax(1)

    def init_preds(self, s: _Set) -> None:
        s.preds = torch.empty(len(s), dtype=torch.int64)
        with torch.inference_mode():
            for sl in _chunks(len(s), self.tail_batch):
                s.preds[sl] = self._tail(s.cache[sl])

    def prune(self, s: _Set, c: int, rows: torch.Tensor | None) -> None:
        with torch.inference_mode():
            s.cache[:, c] = 0.0
            for r in _row_batches(rows, len(s), self.tail_batch):
                s.preds[r] = self._tail(s.cache[r])


class _DeepIDEngine(_CachedEngine):
    """DeepID head, updated incrementally: fc_1(flatten(p)) and conv_4's pre-activation lose
    channel c's contribution (float64 state); conv_4's activation, fc_2 and output are rerun."""

    method = "incremental"

    def __init__(self, clf: Classifier, point: str, batch_size: int, tail_batch: int):
        super().__init__(clf, point, batch_size, tail_batch)
        head = self.head = deepid_head(clf, point)
        assert head is not None
        c = head.conv_4.in_channels
        with torch.no_grad():
            self.w1 = head.fc_1.weight.detach().double()  # (160, h*w*C), Keras (h, w, c) order
            self.c_in = c
            self.w4 = head.conv_4.weight.detach().double()  # (80, C, kh, kw)
            # per input channel: (kh*kw, 80) so that patches @ w4c[c] gives NHWC outputs
            self.w4c = self.w4.permute(1, 2, 3, 0).reshape(c, -1, self.w4.shape[0]).contiguous()

    def init_preds(self, s: _Set) -> None:
        head, n = self.head, len(s)
        a_state = c_state = None
        s.preds = torch.empty(n, dtype=torch.int64)
        with torch.inference_mode():
            for sl in _chunks(n, self.tail_batch):
                h = s.cache[sl]
                a = F.linear(head.flatten(h), head.fc_1.weight, head.fc_1.bias)
                z = F.conv2d(h, head.conv_4.weight, head.conv_4.bias, head.conv_4.stride,
                             head.conv_4.padding, head.conv_4.dilation).permute(0, 2, 3, 1)
                if a_state is None:
                    a_state = torch.empty((n, a.shape[1]), dtype=torch.float64)
                    c_state = torch.empty((n, *z.shape[1:]), dtype=torch.float64)
                a_state[sl] = a
                c_state[sl] = z
                s.preds[sl] = self._finish(a, z)
        s.aux = {"a": a_state, "z": c_state}

    def _finish(self, a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        head = self.head
        z = torch.relu(z) if head.conv_4.act == "relu" else z
        b = head.fc_2(z.reshape(len(z), -1))  # z is (N, H, W, C): already Keras flatten order
        return head.output(torch.relu(a + b)).argmax(1)

    def _conv4_part(self, hc: torch.Tensor, c: int) -> torch.Tensor:
        """Channel c's contribution to conv_4's pre-activation, (n, H', W', out) float64.

        For DeepID's 2x2, stride-1, unpadded conv_4 this is one small matmul over 2x2 patches
        (already in the NHWC order the state uses); other settings go through conv2d."""
        conv = self.head.conv_4
        kh, kw = conv.kernel_size
        if tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1):
            sh, sw = conv.stride
            patches = hc[:, 0].unfold(1, kh, sh).unfold(2, kw, sw)  # (n, H', W', kh, kw)
            return patches.reshape(*patches.shape[:3], kh * kw) @ self.w4c[c]
        dz = F.conv2d(hc, self.w4[:, c:c + 1], None, conv.stride, conv.padding, conv.dilation)
        return dz.permute(0, 2, 3, 1)

    def prune(self, s: _Set, c: int, rows: torch.Tensor | None) -> None:
        w1c = self.w1[:, c::self.c_in].T.contiguous()  # (h*w, 160): channel c's fc_1 columns
        a_state, z_state = s.aux["a"], s.aux["z"]
        with torch.inference_mode():
            for r in _row_batches(rows, len(s), self.tail_batch):
                hc = s.cache[r, c:c + 1].double()  # (n, 1, h, w)
                a = a_state[r] - hc.reshape(len(hc), -1) @ w1c
                z = z_state[r] - self._conv4_part(hc, c)
                a_state[r] = a
                z_state[r] = z
                s.preds[r] = self._finish(a.float(), z.float())


class _HookEngine:
    """Any network: mask the output of the measure point (else the layer) with a forward hook and
    rerun the whole network."""

    method = "hook"

    def __init__(self, clf: Classifier, layer: str, channels: int, batch_size: int):
        self.clf, self.batch_size = clf, batch_size
        self.module = clf.layer(layer)
        self.keep = torch.ones(channels)
        self.capture: list[torch.Tensor] | None = None

    def _hook(self, m, inputs, out):
        if self.capture is not None:
            self.capture.append(out.detach())
        shape = (1, -1) + (1,) * (out.dim() - 2)
        return out * self.keep.to(out.device, out.dtype).view(shape)

    def _run(self, images: np.ndarray) -> torch.Tensor:
        handle = self.module.register_forward_hook(self._hook)
        try:
            return self.clf.net(self.clf.to_tensor(images)).argmax(1)
        finally:
            handle.remove()

    def cache(self, s: _Set) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(s)
        sums = abss = None
        s.preds = torch.empty(n, dtype=torch.int64)
        per = 0
        with torch.inference_mode():
            for sl in _chunks(n, self.batch_size):
                self.capture = []
                s.preds[sl] = self._run(s.images[sl])
                h = self.capture[-1].float()
                self.capture = None
                if s.active is None:
                    s.active = torch.empty((n, h.shape[1]), dtype=torch.bool)
                bs, ba, act = _channel_stats(h)
                s.active[sl] = act
                sums = bs if sums is None else sums + bs
                abss = ba if abss is None else abss + ba
                per += h.numel() // h.shape[1]
        return sums / max(per, 1), abss / max(per, 1)

    def init_preds(self, s: _Set) -> None:  # done while caching
        pass

    def prune(self, s: _Set, c: int, rows: torch.Tensor | None) -> None:
        self.keep[c] = 0.0
        with torch.inference_mode():
            for r in _row_batches(rows, len(s), self.batch_size):
                idx = r if isinstance(r, slice) else r.cpu().numpy()
                s.preds[r] = self._run(s.images[idx])


def deepid_head(clf: Classifier, point: str) -> nn.Module | None:
    """DeepID's two-branch head if it directly and solely follows ``point`` (else None)."""
    from backdoorlab.models.architectures import DeepIDHead

    names = list(getattr(clf.net, "stage_names", []))
    if point not in names or names.index(point) != len(names) - 2:
        return None
    head = clf.net.stages[names[-1]]
    if not isinstance(head, DeepIDHead):
        return None
    ok = (head.fc_1.act in (None, "linear") and head.conv_4.act in ("relu", None, "linear")
          and head.conv_4.groups == 1)
    return head if ok else None


# -- the sweep --------------------------------------------------------------------------------

def _check_set(clf: Classifier, data: ImageSet, role: str, labeled: bool) -> None:
    clf.spec.check(data.images, f"{role} data {data.name!r}")
    if len(data) == 0:
        raise BadInput(f"{role} data {data.name!r}: no images")
    if labeled:
        y = data.require_labels()
        if y.max() >= clf.num_classes:
            raise BadInput(f"{role} data {data.name!r}: label {int(y.max())} out of range for a "
                           f"model with {clf.num_classes} classes")
    if data.num_classes > clf.num_classes:
        raise BadInput(f"{role} data {data.name!r} has {data.num_classes} classes, the model "
                       f"{clf.num_classes}")


def poisoned_key(i: int) -> str:
    """Name of poisoned set ``i`` in a sweep's ``counts`` and ``predictions``."""
    return "poisoned" if i == 0 else f"poisoned:{i}"


def prune_sweep(clf: Classifier, valid: ImageSet, test: ImageSet | None = None,
                poisoned=None, target: int | list[int] | None = None,
                layer: str | None = None, order: str = "increasing",
                drops: tuple[float, ...] | list[float] = (2, 4, 10, 30), drop_unit: str = "points",
                stop: str = "all", seed: int = 0, batch_size: int = 64, *,
                tail_batch_size: int = 256, method: str = "auto",
                skip_inactive: bool = True, ranking: np.ndarray | None = None,
                poisoned_labels: str = "auto") -> PruneSweepResult:
    """Prune ``layer`` channel by channel and record accuracy and ASR after every channel.

    ``valid`` (clean, labeled) ranks the channels and defines the drops; ``test`` (clean, labeled)
    and ``poisoned`` (one set or a list: ImageSets resolved with ``target`` — one per set — and
    ``poisoned_labels`` by `backdoorlab.poisoned.poisoned_sets`, or PoisonedSets) are only
    reported. ``stop="max_drop"`` ends once the largest drop is reached.
    ``method``: ``auto`` picks ``incremental`` (DeepID head), else ``cached`` (StagedNet), else
    ``hook``. ``skip_inactive`` re-runs only rows where the pruned channel is non-zero (exact).
    ``ranking`` (a permutation of the channels) replaces the order computed from ``order`` — e.g.
    the guided ranking of `backdoorlab.defenses.guided_pruning`; ``order`` then only names it.

    The sweep computes on the CPU at fp32 whatever ``clf.device`` and ``clf.precision`` are (a
    copy of the network is moved there; fp16 does not exist on the CPU): it is inference only,
    its cached engines keep per-channel activations of every image in host memory, and on the
    CPU it already runs ~25× a naive sweep (docs/benchmarks-pruning.md). ``clf`` itself is not
    moved.
    """
    t_start = time.perf_counter()
    if clf.device.type != "cpu":
        clf = clf.copy().to("cpu", "fp32")
    if order not in ORDERS and ranking is None:
        raise BadInput(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if stop not in STOPS:
        raise BadInput(f"stop must be one of {', '.join(STOPS)}, got {stop!r}")
    if drop_unit not in DROP_UNITS:
        raise BadInput(f"drop unit must be one of {', '.join(DROP_UNITS)}, got {drop_unit!r}")
    if method not in METHODS:
        raise BadInput(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if batch_size < 1 or tail_batch_size < 1:
        raise BadInput("batch sizes must be positive")
    drops = parse_drops(drops)
    _check_set(clf, valid, "validation", labeled=True)
    if test is not None:
        _check_set(clf, test, "test", labeled=True)
    for ps in as_list(poisoned):
        if isinstance(ps, ImageSet):
            _check_set(clf, ps, "poisoned", labeled=False)
    psets = poisoned_sets(poisoned, target, poisoned_labels, clf=clf)
    tgt: PruneTarget = resolve_target(clf, layer)
    notes: list[str] = []

    engine: _CachedEngine | _HookEngine
    head_ok = tgt.point is not None and deepid_head(clf, tgt.point) is not None
    chosen = method
    if method == "auto":
        chosen = "incremental" if head_ok else ("cached" if tgt.point is not None else "hook")
    if chosen == "incremental" and not head_ok:
        raise BadInput(f"method 'incremental' needs a DeepID head right after the measure point "
                       f"(layer {tgt.layer!r}, point {tgt.point!r})")
    if chosen == "cached" and tgt.point is None:
        raise BadInput(f"method 'cached' needs a staged network and a layer that is a stage "
                       f"(layer {tgt.layer!r})")
    if chosen == "incremental":
        engine = _DeepIDEngine(clf, tgt.point, batch_size, tail_batch_size)
    elif chosen == "cached":
        engine = _CachedEngine(clf, tgt.point, batch_size, tail_batch_size)
    else:
        engine = _HookEngine(clf, tgt.point or tgt.layer, tgt.channels, batch_size)

    sets = [_Set("valid", "acc", valid.images, torch.from_numpy(valid.require_labels()))]
    if test is not None:
        sets.append(_Set("test", "acc", test.images, torch.from_numpy(test.require_labels())))
    for i, ps in enumerate(psets):
        sets.append(_Set(poisoned_key(i), "asr", ps.images, torch.from_numpy(ps.targets)))
    n_acc = len(sets) - len(psets)

    clf.net.eval()
    t0 = time.perf_counter()
    mean = mean_abs = None
    for s in sets:
        m, ma = engine.cache(s)
        if s.name == "valid":
            mean, mean_abs = m.cpu().numpy(), ma.cpu().numpy()
        if s.active is not None and s.active.shape[1] != tgt.channels:
            raise BadInput(f"layer {tgt.layer!r}: measured {s.active.shape[1]} channels at "
                           f"{tgt.point or tgt.layer!r}, its weights have {tgt.channels}")
    t_cache = time.perf_counter() - t0
    for s in sets:
        engine.init_preds(s)
    counts = {s.name: len(s) for s in sets}
    for i, ps in enumerate(psets):
        counts[f"{poisoned_key(i)}_total"] = ps.total
        notes += [f"{ps.name}: {n}" for n in ps.notes]
    t_init = time.perf_counter() - t0 - t_cache
    cache_bytes = sum(int(t.numel() * t.element_size()) for s in sets
                      for t in [s.cache, *s.aux.values()] if t is not None)

    n_ch = tgt.channels
    if ranking is None:
        ranking = ranking_from(mean, mean_abs, order, seed)
    else:
        ranking = np.asarray(ranking, dtype=np.int64)
        if sorted(ranking.tolist()) != list(range(n_ch)):
            raise BadInput(f"a custom pruning ranking must list each of the {n_ch} channels once")
    va, ta, asr = [sets[0].score()], [], [[s.score()] for s in sets[n_acc:]]
    if test is not None:
        ta.append(sets[1].score())
    max_drop = max(drops)
    snapshots: dict[int, dict[str, np.ndarray]] = {}
    pending = list(drops)

    def snapshot(step: int) -> None:
        snapshots[step] = {s.name: s.preds.cpu().numpy().copy() for s in sets}

    snapshot(0)
    t1 = time.perf_counter()
    rows_run = 0
    for c in progress(ranking.tolist(), desc="prune sweep", total=n_ch, unit="channel"):
        for s in sets:
            rows = None
            if skip_inactive and s.active is not None:
                rows = torch.nonzero(s.active[:, c]).flatten()
                if len(rows) == len(s):
                    rows = None
            rows_run += len(s) if rows is None else len(rows)
            if rows is None or len(rows):
                engine.prune(s, c, rows)
        va.append(sets[0].score())
        if test is not None:
            ta.append(sets[1].score())
        for a, s in zip(asr, sets[n_acc:], strict=True):
            a.append(s.score())
        now = accuracy_drop(np.array([va[0], va[-1]]), drop_unit)[1]
        if pending and now >= pending[0] - 1e-9:
            snapshot(len(va) - 1)
            pending = [d for d in pending if now < d - 1e-9]
        if stop == "max_drop" and now >= max_drop - 1e-9:
            break
    t_sweep = time.perf_counter() - t1

    k = len(va)
    pruned = np.arange(k)
    valid_acc = np.array(va)
    test_acc = np.array(ta) if test is not None else None
    asr_sets = [np.array(a) for a in asr]
    asr_arr = asr_sets[0] if asr_sets else None
    drop = accuracy_drop(valid_acc, drop_unit)
    thresholds = []
    for d, step in zip(drops, find_thresholds(valid_acc, drops, drop_unit), strict=True):
        if step is None:
            thresholds.append(Threshold(d, drop_unit, False))
            continue
        thresholds.append(Threshold(
            d, drop_unit, True, step, int(pruned[step]), mask_from_channels(n_ch, ranking[:step]),
            float(drop[step]), float(valid_acc[step]),
            None if test_acc is None else float(test_acc[step]),
            None if asr_arr is None else float(asr_arr[step]),
            [float(a[step]) for a in asr_sets] if asr_sets else None))
    timings = {"cache_seconds": t_cache, "init_seconds": t_init, "sweep_seconds": t_sweep,
               "total_seconds": time.perf_counter() - t_start,
               "rows_rerun": rows_run, "rows_if_dense": (k - 1) * sum(len(s) for s in sets)}
    return PruneSweepResult(
        layer=tgt.layer, point=tgt.point, weights=tgt.weights, order=order, num_channels=n_ch,
        ranking=np.asarray(ranking, dtype=np.int64), mean_activation=np.asarray(mean, np.float64),
        pruned=pruned, fraction=pruned / n_ch, valid_accuracy=valid_acc, drop=drop, drops=drops,
        drop_unit=drop_unit, thresholds=thresholds, test_accuracy=test_acc, asr=asr_arr,
        target=psets[0].target if psets else None, asr_rule=psets[0].rule if psets else None,
        asr_sets=asr_sets, poisoned_sets=[ps.describe() for ps in psets], counts=counts,
        stop=stop, seed=seed, method=engine.method, timings=timings, cache_bytes=cache_bytes,
        notes=notes, predictions=snapshots,
        poisoned_targets=[ps.targets for ps in psets])
