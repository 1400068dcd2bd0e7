"""How long reading the real GTSRB takes (39,209 train + 12,630 test 32x32 PPM files).

Run: ``python benchmarks/bench_data_gtsrb.py [PATH/TO/GTSRB]`` (default ``../shared/data/gtsrb32/GTSRB``
or ``$BACKDOORLAB_DATA/gtsrb32/GTSRB``). Prints, from one run:

1. end-to-end ``read_gtsrb`` times for both splits (default thread pool), and with ``roi=True``;
2. the train files read with 1 thread vs the default pool, from the page cache (warm) and after
   dropping the files from the cache with ``posix_fadvise`` (cold, Linux only);
3. decoding alone, the numpy PPM path vs Pillow, on the test split's file bytes.

The end-to-end reads in 1. may include cold-cache disk time if the files were not read recently.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from backdoorlab.data import imageio
from backdoorlab.data.gtsrb import _plan, read_gtsrb


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def evict(files) -> None:
    """Drop these files from the page cache (Linux), so the next read comes from disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    data = Path(os.environ.get("BACKDOORLAB_DATA", root.parent / "shared" / "data"))
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else data / "gtsrb32" / "GTSRB"
    if not path.exists():
        sys.exit(f"GTSRB not found at {path}")
    print(f"GTSRB at {path}; {os.cpu_count()} CPU cores; default workers {imageio.default_workers()}")

    tr, t_tr = timed(lambda: read_gtsrb(path, "train"))
    te, t_te = timed(lambda: read_gtsrb(path, "test"))
    print(f"read_gtsrb train: {len(tr):,} images in {t_tr:.2f} s ({len(tr) / t_tr:,.0f} img/s)")
    print(f"read_gtsrb test:  {len(te):,} images in {t_te:.2f} s ({len(te) / t_te:,.0f} img/s)")
    print(f"both splits:      {t_tr + t_te:.2f} s")
    _, t_roi = timed(lambda: read_gtsrb(path, "train", roi=True))
    print(f"read_gtsrb train roi=True (crop + bilinear resize each image): {t_roi:.2f} s")

    files = _plan(path, "train", False).files
    n = imageio.default_workers()
    for cold in (False, True):
        if cold and not hasattr(os, "posix_fadvise"):
            print("cold-cache comparison skipped (no posix_fadvise here)")
            break
        times = {}
        for workers in (1, n):
            if cold:
                evict(files)
            _, times[workers] = timed(lambda w=workers: imageio.load_images(files, size=32, channels=3,
                                                                              workers=w))
        print(f"train files, {'cold' if cold else 'warm'} cache: 1 thread {times[1]:.2f} s, {n} threads "
              f"{times[n]:.2f} s (1-thread / {n}-thread time = {times[1] / times[n]:.2f})")

    test_files = _plan(path, "test", False).files
    blobs = [Path(f).read_bytes() for f in test_files]
    fast, t_fast = timed(lambda: [imageio.parse_pnm(b) for b in blobs])
    slow, t_pil = timed(lambda: [imageio._decode_pil(b) for b in blobs])
    assert all(np.array_equal(a, b) for a, b in zip(fast, slow, strict=True)), "decoders disagree"
    print(f"decode {len(blobs):,} test PPMs: numpy {t_fast:.2f} s, Pillow {t_pil:.2f} s "
          f"(Pillow / numpy = {t_pil / t_fast:.1f}x); outputs identical")


if __name__ == "__main__":
    main()
