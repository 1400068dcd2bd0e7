"""Poisoning speed of the batched WaNet, SIG and BppAttack triggers against per-image loops.

Images: the first ``--count`` (default 2,000) GTSRB test images, 32x32x3 uint8, or seeded smooth
synthetic images of that size with ``--synthetic`` (or when GTSRB is not found). For each trigger
(paper defaults: ``wanet`` k = 4, s = 0.5; ``sig`` delta = 20, f = 6; ``bpp`` 3 bits, dithered):

- **batched**: ``trigger.apply(images)`` on the whole batch (what ``poison`` and ``attack`` use);
- **per-image apply**: the same library call once per image (``apply(img[None])``), stacked;
- **per-image loop**: the straightforward loop one writes from the paper, in this script: WaNet,
  one ``grid_sample`` per image on the precomputed grid; SIG, float64 x + v, clip, round per
  image; BppAttack, Floyd-Steinberg pixel by pixel in Python (vectorised over the 3 channels
  only), as the authors' release does (there compiled with numba, not available here).

The fast route runs ``--repeat`` times (default 5) and the loops ``--slow-repeat`` times (default
1, the Python dither loop takes tens of seconds); minimum and median are printed; speed-up = loop
min / batched min. Every output must equal the batched one exactly.

    python benchmarks/bench_triggers.py [--count N] [--repeat R] [--slow-repeat S] [--synthetic]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from backdoorlab.triggers import make_trigger

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BACKDOORLAB_DATA", ROOT.parent / "shared" / "data"))
GTSRB = DATA / "gtsrb32" / "GTSRB"


def load_images(count: int, synthetic: bool) -> tuple[np.ndarray, str]:
    if not synthetic and GTSRB.exists():
        try:
            from backdoorlab.data import load_dataset

            x = load_dataset(f"gtsrb:{GTSRB}", split="test").images[:count]
            return np.ascontiguousarray(x), "GTSRB test"
        except Exception as e:  # noqa: BLE001 - fall back to synthetic images, say why
            print(f"(GTSRB unreadable: {e}; using synthetic images)")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    base = rng.uniform(0, 1, size=(count, 1, 1, 3, 3))
    x = 255 * (base[..., 0] + (base[..., 1] - base[..., 0]) * xx[None, :, :, None] * base[..., 2]
               + 0.3 * np.sin(6 * yy)[None, :, :, None] * (base[..., 1] - 0.5))
    x = x + rng.normal(0, 6, size=x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), "synthetic smooth"


def loop_wanet(trig, x: np.ndarray) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    h, w = x.shape[1:3]
    grid = torch.from_numpy(trig.sampling_grid((h, w)))[None]
    out = np.empty_like(x)
    with torch.no_grad():
        for i in range(len(x)):
            t = torch.from_numpy(x[i]).permute(2, 0, 1)[None].to(torch.float32)
            y = F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=True)
            out[i] = np.rint(np.clip(y[0].permute(1, 2, 0).numpy(), 0, 255)).astype(np.uint8)
    return out


def loop_sig(trig, x: np.ndarray) -> np.ndarray:
    v = trig.signal(x.shape[2])[None, :, None]
    out = np.empty_like(x)
    for i in range(len(x)):
        out[i] = np.rint(np.clip(x[i] + v, 0, 255)).astype(np.uint8)
    return out


def loop_bpp(trig, x: np.ndarray) -> np.ndarray:
    top = trig.levels - 1
    out = np.empty_like(x)
    h, w = x.shape[1:3]
    for n in range(len(x)):
        b = x[n].astype(np.float64)
        for i in range(h):
            for j in range(w):
                old = b[i, j].copy()
                new = np.clip(np.rint(old * (top / 255.0)), 0, top) * (255.0 / top)
                b[i, j] = new
                e = old - new
                if j + 1 < w:
                    b[i, j + 1] += e * (7 / 16)
                if i + 1 < h:
                    if j > 0:
                        b[i + 1, j - 1] += e * (3 / 16)
                    b[i + 1, j] += e * (5 / 16)
                    if j + 1 < w:
                        b[i + 1, j + 1] += e * (1 / 16)
        out[n] = np.rint(np.clip(b, 0, 255)).astype(np.uint8)
    return out


def per_image_apply(trig, x: np.ndarray) -> np.ndarray:
    return np.concatenate([trig.apply(x[i:i + 1]) for i in range(len(x))])


def timed(fn, x, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(x)
        times.append(time.perf_counter() - t0)
    return out, times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000, help="images (default 2,000)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of the batched route (default 5)")
    ap.add_argument("--slow-repeat", type=int, default=1, help="timed runs of each loop (default 1)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic images instead of GTSRB")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    x, source = load_images(args.count, args.synthetic)
    print(f"data: {source}, {len(x):,} images {'x'.join(map(str, x.shape[1:]))}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, numpy "
          f"{np.__version__}, torch {torch.__version__} ({args.threads} threads), Python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    ok = True
    loops = {"wanet": loop_wanet, "sig": loop_sig, "bpp": loop_bpp}
    for spec in ("wanet", "sig", "bpp"):
        trig = make_trigger(spec, x.shape[1:])
        trig.apply(x[:2])  # build the cached field / pattern once, outside the timings
        fast, t_fast = timed(trig.apply, x, args.repeat)
        per, t_per = timed(lambda a, t=trig: per_image_apply(t, a), x, args.slow_repeat)
        ref, t_loop = timed(lambda a, t=trig, f=loops[spec]: f(t, a), x, args.slow_repeat)
        f = min(t_fast)
        print(f"{spec}: {trig.to_dict()}")
        print(f"  batched apply        : {f:8.4f} / {np.median(t_fast):8.4f} s (min / median)")
        for label, out, ts in (("per-image apply", per, t_per), ("per-image loop", ref, t_loop)):
            same = np.array_equal(out, fast)
            ok &= same
            print(f"  {label:21s}: {min(ts):8.4f} / {np.median(ts):8.4f} s  speed-up {min(ts) / f:8.1f}x"
                  f"  same output: {'yes' if same else 'NO'}")
    print("check: every loop equals the batched output:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
