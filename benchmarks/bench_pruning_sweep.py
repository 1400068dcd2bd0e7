"""Benchmark: the pruning sweep of DeepID's conv_3 (60 channels, measured at pool_3) on the real
CSAW-HackML-2020 sunglasses BadNet, with CSAW-sized random inputs (11,547 validation + 12,830 test +
12,830 poisoned images, 55x47x3 uint8).

Times, from one run:
  (a) ours: `prune_sweep` (head once, cached pool_3 activations, incremental DeepID head, only rows
      where the pruned channel is non-zero re-run); also the generic cached path with and without
      row skipping;
  (b) naive: after every channel, rebuild the model with zeroed weights and run it in full on all
      three sets (same batch size 64 and channels_last layout as ours);
  (c) Keras-style: NCHW contiguous, batch 32, two full predicts per step (validation and test), as
      the CSAW lab's Keras loop does;
  floor: one head pass (input -> pool_3) over the three sets + 60 tail passes (pool_3 -> logits over
      all rows).
(b) and (c) may be timed on a subset of steps (--naive-steps, --keras-steps) and extrapolated
linearly to 61 evaluations (unpruned + 60 channels): every step of these costs the same, since the
whole network runs densely whatever is zeroed. The output says when that was done.

Run:  python benchmarks/bench_pruning_sweep.py [--keras-steps 5] [--naive-steps 61]
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backdoorlab.data import ImageSet
from backdoorlab.defenses.masking import apply_channel_mask, mask_from_channels
from backdoorlab.defenses.pruning import prune_sweep
from backdoorlab.models import Classifier, load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BACKDOORLAB_DATA", ROOT.parent / "shared" / "data"))
WEIGHTS = DATA / "csaw-hackml-2020" / "sunglasses_bd_weights.h5"


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def load() -> float:
    return os.getloadavg()[0]


def make_sets(clf: Classifier, sizes: tuple[int, int, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for name, n in zip(("valid", "test", "poisoned"), sizes, strict=True):
        x = rng.integers(0, 256, size=(n, 55, 47, 3), dtype=np.uint8)
        y = clf.predict(x) if name != "poisoned" else None  # labels = unpruned answers: 100 % at start
        out.append(ImageSet(x, y, clf.num_classes, name=name))
    return out


def scores(clf: Classifier, valid: ImageSet, test: ImageSet, poisoned: ImageSet, target: int,
           batch: int) -> tuple[float, float, float]:
    return (float((clf.predict(valid.images, batch) == valid.labels).mean()),
            float((clf.predict(test.images, batch) == test.labels).mean()),
            float((clf.predict(poisoned.images, batch) == target).mean()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--sizes", default="11547,12830,12830", help="validation,test,poisoned counts")
    ap.add_argument("--naive-steps", type=int, default=61, help="naive evaluations to time (61 = all)")
    ap.add_argument("--keras-steps", type=int, default=5, help="Keras-style evaluations to time")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not Path(args.weights).exists():
        print(f"weights not found: {args.weights} (set BACKDOORLAB_DATA)", file=sys.stderr)
        return 2
    sizes = tuple(int(s) for s in args.sizes.split(","))
    load_start = load()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average at start {load_start:.2f}")
    clf = load_model(args.weights, arch="deepid")
    valid, test, poisoned = make_sets(clf, sizes)
    n_all = sum(sizes)
    print(f"data: {sizes[0]:,} validation + {sizes[1]:,} test + {sizes[2]:,} poisoned random 55x47x3 "
          f"images ({n_all:,}); labels = unpruned predictions; target 0")
    bs, steps = args.batch_size, 61

    # (a) ours
    t = time.perf_counter()
    ours = prune_sweep(clf, valid, test, poisoned, target=0, batch_size=bs)
    t_ours = time.perf_counter() - t
    rss_ours = maxrss_mb()
    print(f"(a) ours [{ours.method}]: {t_ours:.2f} s  (head pass {ours.timings['cache_seconds']:.2f} s, "
          f"init {ours.timings['init_seconds']:.2f} s, 60 steps {ours.timings['sweep_seconds']:.2f} s; "
          f"rows re-run {ours.timings['rows_rerun']:,} of {ours.timings['rows_if_dense']:,})")
    print(f"    cache {ours.cache_bytes / 1e6:.0f} MB; peak RSS so far {rss_ours:.0f} MB "
          f"(includes the {n_all * 55 * 47 * 3 / 1e6:.0f} MB of uint8 inputs)")
    t = time.perf_counter()
    gen = prune_sweep(clf, valid, test, poisoned, target=0, batch_size=bs, method="cached")
    t_gen = time.perf_counter() - t
    print(f"    generic cached path, rows skipped: {t_gen:.2f} s")
    t = time.perf_counter()
    dense = prune_sweep(clf, valid, test, poisoned, target=0, batch_size=bs, method="cached",
                        skip_inactive=False)
    t_dense = time.perf_counter() - t
    print(f"    generic cached path, every row re-run: {t_dense:.2f} s")
    for other in (gen, dense):
        assert np.allclose(other.valid_accuracy, ours.valid_accuracy, atol=1e-6)
        assert np.allclose(other.asr, ours.asr, atol=1e-6)

    # floor: one head pass + 60 tail passes over all rows
    net = clf.net
    with torch.inference_mode():
        t = time.perf_counter()
        cache = []
        for s in (valid, test, poisoned):
            for i in range(0, len(s), bs):
                cache.append(net.forward_to("pool_3", clf.to_tensor(s.images[i:i + bs])))
        t_head = time.perf_counter() - t
        tails = []
        for _ in range(3):
            t = time.perf_counter()
            for h in cache:
                net.forward_from("pool_3", h).argmax(1)
            tails.append(time.perf_counter() - t)
        t_tail = statistics.median(tails)
        del cache
        t = time.perf_counter()
        for s in (valid, test, poisoned):
            for i in range(0, len(s), bs):
                net(clf.to_tensor(s.images[i:i + bs])).argmax(1)
        t_full = time.perf_counter() - t
    t_floor = t_head + 60 * t_tail
    print(f"one full forward pass over the three sets: {t_full:.2f} s; head pass {t_head:.2f} s, "
          f"tail pass {t_tail:.3f} s (median of 3)")
    print(f"floor = head + 60 tails = {t_floor:.2f} s")

    # (b) naive: full model with zeroed weights, every step, all three sets
    k_naive = min(args.naive_steps, steps)
    pick = np.linspace(0, steps - 1, k_naive).round().astype(int)
    t = time.perf_counter()
    for k in pick:
        m = apply_channel_mask(clf, "conv_3", mask_from_channels(60, ours.ranking[:k]))
        got = scores(m, valid, test, poisoned, 0, bs)
        assert abs(got[0] - ours.valid_accuracy[k]) < 1e-6 and abs(got[2] - ours.asr[k]) < 1e-6, (k, got)
    t_naive_meas = time.perf_counter() - t
    t_naive = t_naive_meas * steps / k_naive
    how = "measured in full" if k_naive == steps else \
        f"measured on {k_naive} of {steps} evaluations ({t_naive_meas:.1f} s), extrapolated linearly"
    print(f"(b) naive (batch {bs}, channels_last, zeroed weights, 3 sets x {steps} evaluations): "
          f"{t_naive:.1f} s, {how}")

    # (c) Keras-style: NCHW contiguous, batch 32, two full predicts (valid, test) per step
    knet = copy.deepcopy(clf.net).to(memory_format=torch.contiguous_format)
    kclf = Classifier(knet, clf.spec, clf.num_classes, clf.arch, channels_last=False)
    k_keras = min(args.keras_steps, steps)
    pick = np.linspace(0, steps - 1, k_keras).round().astype(int)
    t = time.perf_counter()
    worst = 0.0
    for k in pick:
        m = apply_channel_mask(kclf, "conv_3", mask_from_channels(60, ours.ranking[:k]))
        va = float((m.predict(valid.images, 32) == valid.labels).mean())
        float((m.predict(test.images, 32) == test.labels).mean())
        worst = max(worst, abs(va - ours.valid_accuracy[k]))
    t_keras_meas = time.perf_counter() - t
    # NCHW sums in another order than channels_last: on random inputs a few near-tied argmaxes flip
    print(f"    Keras-style vs ours: largest validation-accuracy difference {worst:.2e} "
          f"({round(worst * len(valid))} of {len(valid):,} images)")
    assert worst < 1e-3, worst
    t_keras = t_keras_meas * steps / k_keras
    how = "measured in full" if k_keras == steps else \
        f"measured on {k_keras} of {steps} evaluations ({t_keras_meas:.1f} s), extrapolated linearly"
    print(f"(c) Keras-style (NCHW, batch 32, valid + test per step x {steps}): {t_keras:.1f} s, {how}")

    print("\nratios:")
    print(f"  naive / ours        = {t_naive / t_ours:6.1f}x   (target >= 7x)")
    print(f"  ours / floor        = {t_ours / t_floor:6.2f}    (target <= 1.3)")
    print(f"  Keras-style / ours  = {t_keras / t_ours:6.1f}x   (target >= 30x)")
    print(f"  generic cached (skip) / ours = {t_gen / t_ours:.2f}; generic dense / floor = "
          f"{t_dense / t_floor:.2f}")
    print(f"peak RSS (whole run) {maxrss_mb():.0f} MB; after (a) {rss_ours:.0f} MB")
    print(f"load average: start {load_start:.2f}, end {load():.2f} (2 cores; > ~2 means other work "
          "shared the machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
