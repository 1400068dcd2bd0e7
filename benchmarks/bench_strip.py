"""STRIP (Gao et al., ACSAC 2019) on the GTSRB BadNets and blend models of the repair benchmark:
detection rate at 5 % false alarms, the false-alarm rate measured, AUROC, and the speed of the
batched scorer against a one-input-at-a-time loop.

For each cell folder (``model.safetensors`` + ``clean_valid.h5``, ``clean_test.h5``,
``poisoned_test.h5``, as `benchmarks/repairs_gtsrb.py` writes them): STRIP at the paper's
defaults (N = 100, equal-weight blend) is fitted on 80 % of clean_valid and its threshold set at
``--far`` on the other 20 % (`backdoorlab.input_detectors.evaluate`); clean inputs come from
clean_test, poisoned ones from poisoned_test (its per-image targets; inputs whose true label is
the target are left out, `backdoorlab.poisoned`). ``--limit`` takes a seeded sample of each test
set (default 2000; 0 = all 12,630 / 12,570 — about 2.5 M image passes per model).

Speed: on ``--loop`` clean test inputs (default 300), the same scorer (same overlay pool and
draws) scores them batched (`StripScore`, twice, the faster kept) and with `loop_scores` (one
input at a time, its N blends as one network batch, once), in this one process; the scores must
agree to 1e-4.

    python benchmarks/bench_strip.py [--cells DIR ...] [--limit N] [--loop N] [--far F]
        [--option superimpose=add] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from backdoorlab import registry
from backdoorlab.data import load_dataset
from backdoorlab.input_detectors import evaluate, resolve_options
from backdoorlab.input_detectors.strip import loop_scores
from backdoorlab.models.files import load_model
from backdoorlab.poisoned import poisoned_set

ROOT = Path(__file__).resolve().parents[1]
CELLS = [ROOT / "runs/repairs-gtsrb/cells/badnets-s0-de3b16f30329",
         ROOT / "runs/repairs-gtsrb/cells/blend-s0-36befe59311d"]


def sample(n: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of ``limit`` out of ``n`` (all when ``limit`` is 0)."""
    if not limit or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def bench_cell(cell: Path, limit: int, n_loop: int, far: float, opts: dict | None = None) -> dict:
    clf = load_model(cell / "model.safetensors")
    valid = load_dataset(str(cell / "clean_valid.h5"))
    test = load_dataset(str(cell / "clean_test.h5"))
    ps = poisoned_set(load_dataset(str(cell / "poisoned_test.h5")))
    test = test.subset(sample(len(test), limit, 1))
    k = sample(len(ps), limit, 2)
    ps = replace(ps, images=ps.images[k], targets=ps.targets[k],
                 true_labels=None if ps.true_labels is None else ps.true_labels[k])
    asr = ps.success_rate(clf)
    options = resolve_options("strip", opts or {})
    res = evaluate("strip", clf, valid, test, ps, options=options, far=far)
    out = {"cell": cell.name, "model": clf.describe(), "triggers": clf.provenance.get("triggers"),
           "target": ps.target, "asr": asr, "valid": len(valid), "options": asdict(options),
           "n_clean": res.n_clean, "n_poisoned": res.n_poisoned, "far_requested": far,
           "threshold": res.threshold, "far_measured": res.far_measured,
           "detection_rate": res.detection_rate, "auroc": res.auroc,
           "eval_seconds": res.seconds, "eval_image_passes": res.passes, "speed": None}
    if n_loop < 1:  # --loop 0: no speed comparison
        return out
    # speed: same scorer, same overlays, batched vs one input at a time
    scorer = registry.get("strip", "input-detector").run(clf, valid, options)
    score = scorer.score
    x = test.images[:n_loop]
    draws = score.draws(len(x))
    fast = []
    for _ in range(2):
        t0 = time.perf_counter()
        sb = score(x)
        fast.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    sl = loop_scores(clf, x, score.pool, draws, score.options.alpha, score.options.superimpose)
    slow = time.perf_counter() - t0
    diff = float(np.max(np.abs(sb - sl)))
    assert diff < 1e-4, f"batched and loop scores differ by {diff}"
    out["speed"] = {"inputs": len(x), "batched_seconds": min(fast), "loop_seconds": slow,
                    "ratio": slow / min(fast), "max_abs_diff": diff}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", nargs="+", type=Path, default=CELLS)
    ap.add_argument("--limit", type=int, default=2000, help="inputs per test set (0 = all)")
    ap.add_argument("--loop", type=int, default=300, help="inputs of the speed comparison (0: none)")
    ap.add_argument("--far", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a STRIP option (superimpose=add, copies=N, ...); repeatable")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# STRIP on GTSRB — torch {torch.__version__}, {a.threads} threads, "
          f"{platform.processor() or platform.machine()}")
    rows = []
    for cell in a.cells:
        r = bench_cell(cell, a.limit, a.loop, a.far, dict(kv.split("=", 1) for kv in a.option))
        rows.append(r)
        s = r["speed"]
        print(f"{r['cell']}: target {r['target']}, ASR {r['asr']:.2%}; threshold {r['threshold']:.4f} "
              f"(fitted on clean_valid, {r['valid']} images)")
        print(f"  detection {r['detection_rate']:.2%} of {r['n_poisoned']} poisoned at FAR "
              f"{r['far_requested']:.0%} requested; FAR measured {r['far_measured']:.2%} of "
              f"{r['n_clean']} clean; AUROC {r['auroc']:.4f}; {r['eval_seconds']:.0f} s, "
              f"{r['eval_image_passes']:,} image passes")
        if s:
            print(f"  speed on {s['inputs']} inputs: batched {s['batched_seconds']:.1f} s, loop "
                  f"{s['loop_seconds']:.1f} s, ratio {s['ratio']:.2f}x (max |diff| "
                  f"{s['max_abs_diff']:.1e})", flush=True)
        if a.json:  # after every cell: a long run keeps what it measured
            a.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
