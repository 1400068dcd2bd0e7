"""Benchmark: Neural Cleanse over all 1283 labels of a real CSAW-HackML-2020 DeepID BadNet.

Fast scan (this package, ``mode="fast"``: many labels per forward pass, a screen round over every
label, full optimisation of the suspects plus a random reference sample) versus the released
code's schedule run one label at a time (batch 32, cost schedule checked once per epoch of
images/batch steps, up to 1000 epochs), measured on a few labels with a step cap and
EXTRAPOLATED to all labels. Everything is printed from this one run.

There is no clean YouTube-Face data here, so the clean set is a PROXY: seeded smooth random
images (a random 7×6 RGB grid upsampled bilinearly to 55×47, plus Gaussian pixel noise σ = 8),
unlabeled. Timings and passes do not depend on image content; detection results on a proxy
set are indicative only.

    python benchmarks/bench_neural_cleanse.py [--model sunglasses] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BACKDOORLAB_DATA", ROOT.parent / "shared" / "data"))


def proxy_clean(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random images (see module docstring), uint8 (n, 55, 47, 3)."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.random((n, 3, 7, 6)).astype(np.float32))
    big = torch.nn.functional.interpolate(small, size=(55, 47), mode="bilinear", align_corners=False)
    x = big.permute(0, 2, 3, 1).numpy() * 255.0 + rng.normal(0.0, 8.0, (n, 55, 47, 3))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sunglasses", help="CSAW weights name or path")
    ap.add_argument("--images", type=int, default=1000, help="proxy clean images (default 1000)")
    ap.add_argument("--ref-labels", type=int, default=3, help="labels timed with the released schedule")
    ap.add_argument("--ref-cap", type=int, default=2000, help="step cap per label for them")
    ap.add_argument("--labels", type=int, default=None, help="scan only labels 0..N-1 (default all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()

    from backdoorlab.data.imageset import ImageSet
    from backdoorlab.defenses.neural_cleanse import NCConfig, neural_cleanse
    from backdoorlab.models.files import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model)
    if not path.exists():
        path = DATA / "csaw-hackml-2020" / f"{args.model}_bd_weights.h5"
    if not path.exists():
        print(f"skipped: {path} not found (set BACKDOORLAB_DATA)")
        return 0
    clf = load_model(path, arch="deepid", input_scale="unit")
    clean = ImageSet(proxy_clean(args.images, args.seed), None, clf.num_classes, name="proxy")
    labels = None if args.labels is None else list(range(args.labels))
    n_labels = clf.num_classes if labels is None else len(labels)
    load0 = os.getloadavg()
    print(f"model {path.name}: {clf.describe()}")
    print(f"clean set: PROXY, {len(clean)} smooth random images (no YouTube-Face data here)")
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load average at start "
          f"{load0[0]:.1f}")

    # ---- fast scan over all labels ----
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fast = neural_cleanse(clf, clean, NCConfig(mode="fast", labels=labels, seed=args.seed),
                              state_dir=tmp)
        fast_s = time.perf_counter() - t0
    order = [r.label for r in fast.full_labels()]
    screen_rank = sorted(fast.labels, key=lambda r: (r.screen_norm is None, r.screen_norm or 0))
    print(f"\nfast scan: {n_labels} labels, {fast_s:.0f} s wall, {fast.passes:,} image passes "
          f"(fwd+bwd) + {fast.eval_passes:,} forward-only")
    print(f"  fully optimised: {len(order)} labels (suspects {fast.suspects}; reference sample of "
          f"{len(fast.reference_labels)})")
    print(f"  screen's 5 smallest: {[r.label for r in screen_rank[:5]]}")
    print(f"  median {fast.median:.1f}, MAD {fast.mad:.1f}; flagged {fast.flagged}")
    for r in fast.full_labels()[:5]:
        print(f"    label {r.label:5d} norm {r.norm:8.1f} index {r.anomaly_index:6.2f} steps {r.steps}"
              f" ASR {r.asr:.2%}")

    # ---- released schedule, one label at a time, a few labels, capped ----
    rng = np.random.default_rng(args.seed + 1)
    pool = labels if labels is not None else list(range(clf.num_classes))
    sample = sorted(int(y) for y in rng.choice(pool, size=args.ref_labels, replace=False))
    ref_cfg = NCConfig(mode="full", labels=sample, labels_per_batch=1, check_every=None,
                       max_steps=args.ref_cap, seed=args.seed)
    t0 = time.perf_counter()
    ref = neural_cleanse(clf, clean, ref_cfg)
    ref_s = time.perf_counter() - t0
    per_label_passes = ref.passes / len(sample)
    per_label_s = ref_s / len(sample)
    capped = [r.label for r in ref.labels if r.stop == "max_steps"]
    epoch_steps = len(clean) // 32
    print(f"\nreleased schedule, one label at a time (batch 32, checks every {epoch_steps} steps = "
          f"1 epoch): labels {sample}, cap {args.ref_cap} steps")
    for r in ref.labels:
        print(f"    label {r.label:5d} steps {r.steps} stop {r.stop} norm {r.norm:.1f}")
    print(f"  measured: {ref.passes:,} passes in {ref_s:.0f} s ({per_label_passes:,.0f} passes, "
          f"{per_label_s:.1f} s per label)")
    bound = " (LOWER BOUND: labels hit the step cap)" if capped else ""
    ext_passes = per_label_passes * n_labels
    ext_s = per_label_s * n_labels
    print(f"  EXTRAPOLATED to {n_labels} labels{bound}: {ext_passes:,.0f} passes, {ext_s / 3600:.1f} h")
    print(f"  uncapped the released code may run up to 1000 epochs = {1000 * epoch_steps:,} steps "
          f"= {1000 * epoch_steps * 32:,} passes per label")
    ratio_p = ext_passes / fast.passes
    ratio_t = ext_s / fast_s
    load1 = os.getloadavg()
    print(f"\nratio (extrapolated reference / fast scan): passes {ratio_p:.1f}x, wall time "
          f"{ratio_t:.1f}x{' (lower bounds)' if capped else ''}")
    print(f"load average at end {load1[0]:.1f} (2 cores shared with other jobs slow everything)")
    if args.json:
        out = {"model": path.name, "labels": n_labels, "images": len(clean), "clean_set": "proxy",
               "threads": torch.get_num_threads(), "load_start": load0[0], "load_end": load1[0],
               "fast": {"seconds": fast_s, "passes": fast.passes, "eval_passes": fast.eval_passes,
                        "flagged": fast.flagged, "suspects": fast.suspects,
                        "median": fast.median, "mad": fast.mad,
                        "top": [(r.label, r.norm, r.anomaly_index) for r in fast.full_labels()[:5]]},
               "reference": {"labels": sample, "cap": args.ref_cap, "seconds": ref_s,
                             "passes": ref.passes, "capped": capped,
                             "steps": [r.steps for r in ref.labels],
                             "extrapolated_passes": ext_passes, "extrapolated_seconds": ext_s},
               "ratio_passes": ratio_p, "ratio_seconds": ratio_t}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
