"""DeepID inference on a CPU: memory layout × autograd mode × batch size.

Times the full prediction (uint8 NHWC images → scaled tensor → logits, as `Classifier.logits` does)
of the real CSAW-HackML-2020 sunglasses DeepID on 11,547 random uint8 55×47×3 inputs (the size of the
CSAW clean test set) for every combination of

- layout: ``nchw`` (contiguous NCHW input and weights) or ``channels_last`` (NHWC memory),
- mode: ``torch.inference_mode()`` or ``torch.no_grad()``,
- batch size: 32, 64, 256,

plus `Classifier.logits` itself (channels_last + inference_mode, batch 256 today). Each configuration
runs ``--repeats`` times, interleaved round-robin so a change in machine load hits all alike; the
median wall time is reported, with the ratio to `Classifier.logits`, and the median CPU time of
the process (all threads), which waiting for a core shared with other programs inflates less.

    python benchmarks/bench_deepid_inference.py [--n 11547] [--repeats 3] [--json out.json]
        [--batches 32,64,256] [--layouts nchw,channels_last] [--modes inference_mode,no_grad]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from backdoorlab.models import load_model

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BACKDOORLAB_DATA", ROOT.parent / "shared" / "data"))
WEIGHTS = DATA / "csaw-hackml-2020" / "sunglasses_bd_weights.h5"


def predict(clf, images: np.ndarray, batch: int, channels_last: bool, mode: str) -> np.ndarray:
    """`Classifier.logits` with the layout and autograd mode made explicit."""
    ctx = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    out = np.empty((len(images), clf.num_classes), dtype=np.float32)
    with ctx():
        for i in range(0, len(images), batch):
            x = clf.spec.to_tensor(images[i:i + batch], channels_last=channels_last)
            out[i:i + len(x)] = clf.net(x).float().numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=11547, help="number of random inputs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="32,64,256")
    ap.add_argument("--layouts", default="nchw,channels_last")
    ap.add_argument("--modes", default="inference_mode,no_grad")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if not WEIGHTS.exists():
        raise SystemExit(f"real weights not found at {WEIGHTS} (set BACKDOORLAB_DATA)")

    clf = load_model(WEIGHTS, arch="deepid")
    images = np.random.default_rng(0).integers(0, 256, (args.n, 55, 47, 3), dtype=np.uint8)
    batches = [int(b) for b in args.batches.split(",")]
    configs = [("Classifier.logits", None, None, 256)]
    layouts, modes = args.layouts.split(","), args.modes.split(",")
    if not set(layouts) <= {"nchw", "channels_last"} or not set(modes) <= {"inference_mode", "no_grad"}:
        raise SystemExit("--layouts: nchw,channels_last; --modes: inference_mode,no_grad")
    configs += [(f"{lay} {mode} b{b}", lay, mode, b) for lay in layouts for mode in modes for b in batches]

    def run(cfg) -> np.ndarray:
        _, lay, mode, b = cfg
        if lay is None:
            clf.net.to(memory_format=torch.channels_last)
            return clf.logits(images)
        clf.net.to(memory_format=torch.channels_last if lay == "channels_last" else torch.contiguous_format)
        return predict(clf, images, b, lay == "channels_last", mode)

    print(f"DeepID (CSAW sunglasses), {args.n:,} random uint8 55x47x3 inputs, {args.repeats} repeats, "
          f"median; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    with contextlib.suppress(OSError):
        print(f"load average at start: {os.getloadavg()[0]:.2f}")
    small = images[:256]
    for cfg in configs:  # warm-up (allocator, kernels) on a small slice
        _, lay, mode, b = cfg
        clf.net.to(memory_format=torch.channels_last if lay != "nchw" else torch.contiguous_format)
        predict(clf, small, b or 256, lay != "nchw", mode or "inference_mode")
    times: dict[str, list[float]] = {c[0]: [] for c in configs}
    cpu: dict[str, list[float]] = {c[0]: [] for c in configs}
    reference = None
    max_diff = 0.0
    for _ in range(args.repeats):
        for cfg in configs:
            t0, c0 = time.perf_counter(), time.process_time()
            out = run(cfg)
            times[cfg[0]].append(time.perf_counter() - t0)
            cpu[cfg[0]].append(time.process_time() - c0)
            if reference is None:
                reference = out
            max_diff = max(max_diff, float(np.abs(out - reference).max()))
    base = statistics.median(times["Classifier.logits"])
    cpu_base = statistics.median(cpu["Classifier.logits"])
    print(f"\n{'configuration':<34}{'median s':>10}{'min s':>8}{'max s':>8}{'images/s':>10}"
          f"{'vs logits':>11}{'CPU s':>8}{'CPU vs logits':>15}")
    rows = []
    for name, *_ in configs:
        med, cmed = statistics.median(times[name]), statistics.median(cpu[name])
        rows.append({"config": name, "median_s": med, "min_s": min(times[name]),
                     "max_s": max(times[name]), "images_per_s": args.n / med, "ratio": med / base,
                     "cpu_median_s": cmed, "cpu_ratio": cmed / cpu_base, "wall_s": times[name],
                     "cpu_s": cpu[name]})
        print(f"{name:<34}{med:>10.2f}{min(times[name]):>8.2f}{max(times[name]):>8.2f}"
              f"{args.n / med:>10.0f}{med / base:>10.2f}x{cmed:>8.1f}{cmed / cpu_base:>14.2f}x")
    print(f"\nlargest logit difference between configurations: {max_diff:.2e}")
    def ratio(a: str, b: str, what: dict) -> float:
        return statistics.median(what[a]) / statistics.median(what[b])

    for mode in modes if len(layouts) == 2 else ():
        for b in batches:
            a, c = f"nchw {mode} b{b}", f"channels_last {mode} b{b}"
            print(f"nchw / channels_last, {mode}, batch {b}: wall {ratio(a, c, times):.2f}, "
                  f"CPU {ratio(a, c, cpu):.2f}")
    for lay in layouts if len(modes) == 2 else ():
        for b in batches:
            a, c = f"{lay} no_grad b{b}", f"{lay} inference_mode b{b}"
            print(f"no_grad / inference_mode, {lay}, batch {b}: wall {ratio(a, c, times):.2f}, "
                  f"CPU {ratio(a, c, cpu):.2f}")
    with contextlib.suppress(OSError):
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": args.n, "repeats": args.repeats, "rows": rows,
                                               "max_logit_diff": max_diff}, indent=2) + "\n")


if __name__ == "__main__":
    main()
