"""FTrojan trigger speed on the GTSRB test set (12,630 images, 32x32x3), GTSRB preset.

Baseline: a straightforward per-image loop (per image, per channel, window by window, scipy
dctn / idctn with norm="ortho", float64), as one would write from the paper. Against it:
``FTrojanTrigger.apply`` (one precomputed spatial pattern added to the whole batch, exact by
linearity of the DCT and the colour transform) and ``FTrojanTrigger.apply_dct`` (explicit batched
matrix DCT, D @ X @ D.T over all images and windows at once, float32). In this one process the
baseline runs ``--repeat`` times (default 3) and each vectorised method ``--fast-repeat`` times
(default 10); the minimum and the median are printed, and the outputs must match the baseline
within 1 grey level.

    /work/venv/bin/python benchmarks/bench_ftrojan_speed.py [--limit N] [--repeat R] [--fast-repeat F]

Data: $BACKDOORLAB_DATA (default ../shared/data from the repository root)/gtsrb32/GTSRB.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy.fft import dctn, idctn

from backdoorlab.metrics_image import image_quality
from backdoorlab.triggers import make_trigger
from backdoorlab.triggers.ftrojan import SPACES

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BACKDOORLAB_DATA", ROOT.parent / "shared" / "data"))
GTSRB = DATA / "gtsrb32" / "GTSRB"


def load_test_images() -> np.ndarray:
    try:
        from backdoorlab.data import load_dataset

        return load_dataset(f"gtsrb:{GTSRB}", split="test").images
    except Exception as e:  # reader missing or failing: read the PPMs directly
        print(f"(GTSRB reader unavailable: {e}; reading the PPM files with Pillow)")
        from PIL import Image

        files = sorted((GTSRB / "Final_Test" / "Images").glob("*.ppm"))
        return np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32))) for f in files])


def baseline(x: np.ndarray, channels, positions, magnitude: float, window: int,
             space: str = "ycrcb") -> np.ndarray:
    """Per-image, per-channel, per-window loop with scipy's DCT."""
    m, off, _ = SPACES[space]
    inv = np.linalg.inv(m)
    out = np.empty_like(x)
    h, w = x.shape[1:3]
    for i in range(len(x)):
        s = x[i].astype(np.float64) @ m.T + off
        for ch in channels:
            for r in range(0, h - window + 1, window):
                for c in range(0, w - window + 1, window):
                    block = dctn(s[r:r + window, c:c + window, ch], norm="ortho")
                    for u, v in positions:
                        block[u, v] += magnitude
                    s[r:r + window, c:c + window, ch] = idctn(block, norm="ortho")
        out[i] = np.rint(np.clip((s - off) @ inv.T, 0, 255))
    return out


def timed(fn, x, repeat: int):
    """Run ``fn(x)`` ``repeat`` times; return (last output, list of seconds)."""
    times = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(x)
        times.append(time.perf_counter() - t0)
    return out, times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, help="use only the first N test images")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of the baseline (default 3)")
    ap.add_argument("--fast-repeat", type=int, default=10,
                    help="timed runs of each vectorised method (default 10)")
    args = ap.parse_args()
    if not GTSRB.exists():
        print(f"GTSRB not found at {GTSRB} (set BACKDOORLAB_DATA)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    x = load_test_images()
    if args.limit:
        x = x[: args.limit]
    print(f"data: GTSRB test, {len(x):,} images {'x'.join(map(str, x.shape[1:]))} "
          f"(loaded in {time.perf_counter() - t0:.1f} s)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numpy {np.__version__}, Python {platform.python_version()}, load average "
          f"{os.getloadavg()[0]:.1f}")
    spec = "ftrojan:preset=gtsrb"
    t = make_trigger(spec, x.shape[1:])
    print(f"trigger: {spec} -> {t.to_dict()}")

    r = args.repeat

    def base(a):
        return baseline(a, t.channels, t.positions, t.magnitude, t.window, t.space)

    def fresh(method):  # a new trigger per call: the pattern precomputation is inside the timing
        return lambda a: getattr(make_trigger(spec, a.shape[1:]), method)(a)

    ref, t_base = timed(base, x, r)
    fast, t_fast = timed(fresh("apply"), x, args.fast_repeat)
    viadct, t_dct = timed(fresh("apply_dct"), x, args.fast_repeat)

    print(f"timings: baseline {r} runs, vectorised {args.fast_repeat} runs each; min / median seconds; "
          "speed-up = baseline min / method min")
    b = min(t_base)
    print(f"  baseline per-image scipy loop : {b:7.3f} / {np.median(t_base):7.3f} s")
    for label, out, ts in (("apply (spatial pattern)", fast, t_fast),
                           ("apply_dct (batched matrix DCT)", viadct, t_dct)):
        diff = np.abs(out.astype(np.int16) - ref)
        print(f"  {label:30s}: {min(ts):7.3f} / {np.median(ts):7.3f} s  {b / min(ts):7.1f}x  "
              f"(median ratio {np.median(t_base) / np.median(ts):.1f}x)  max |diff| vs baseline "
              f"{int(diff.max())} ({int((diff > 0).sum())} of {diff.size:,} values differ)")
    ok = max(int(np.abs(fast.astype(np.int16) - ref).max()),
             int(np.abs(viadct.astype(np.int16) - ref).max())) <= 1
    q = image_quality(x, fast)
    print(f"quality: mean PSNR {q.psnr_mean:.2f} dB over {q.changed:,} changed images, "
          f"mean SSIM {q.ssim_mean:.4f}")
    print("check: results equal within 1 grey level:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
