"""Throughput per device and precision, as ratios to the CPU at fp32, measured in one run.

Four workloads on one model: a training epoch, a Neural Cleanse scan of a few labels (full mode,
capped steps), the pruning sweep (always on the CPU: see `prune_sweep`) and one repair
(``anp``, 100 mask steps). Every (device, precision) this machine has runs each workload on the same data; the
table gives seconds and the ratio to CPU fp32 (> 1 = faster), plus what the precision does to
the numbers: clean accuracy of the trained model, the reversed triggers' mask norms, the
repaired model's accuracy. On a GPU machine the CUDA rows appear by themselves.

    OMP_NUM_THREADS=2 python benchmarks/bench_device.py [--data gtsrb:PATH] [--arch gtsrb_cnn]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def combos() -> list[tuple[str, str]]:
    out = [("cpu", "fp32"), ("cpu", "bf16")]
    if torch.cuda.is_available():
        out += [("cuda", "fp32"), ("cuda", "bf16"), ("cuda", "fp16")]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out += [("mps", "fp32"), ("mps", "fp16")]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits", help="data source (default: the bundled digits)")
    ap.add_argument("--arch", default="gtsrb_cnn")
    ap.add_argument("--train-limit", type=int, default=4000)
    ap.add_argument("--labels", default="0,1,2,3", help="labels of the Neural Cleanse scan")
    ap.add_argument("--steps", type=int, default=150, help="steps per label of the scan")
    a = ap.parse_args(argv)

    from backdoorlab.attacks.runner import AttackPlan, train_attack
    from backdoorlab.data import load_dataset
    from backdoorlab.defenses.neural_cleanse import NCConfig, neural_cleanse
    from backdoorlab.defenses.pruning import prune_sweep
    from backdoorlab.evaluation import accuracy
    from backdoorlab.repairs import DefenderData, repair
    from backdoorlab.train import TrainConfig, train

    if a.data == "digits":
        from backdoorlab.data.digits import load_digits

        train_data, test = load_digits().split(0.25, seed=3)
    else:
        train_data = load_dataset(a.data, split="train").take(a.train_limit, seed=0)
        test = load_dataset(a.data, split="test").take(2000, seed=0)
    plan = AttackPlan(triggers=["patch:size=4"], targets=[0], rate=0.1)
    cfg = TrainConfig(epochs=1, batch_size=128, lr=1e-3, seed=0)
    base, _, art = train_attack(train_data, test, a.arch, plan, TrainConfig(epochs=4, seed=0))
    valid = art["valid"]
    labels = [int(x) for x in a.labels.split(",")]
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{a.arch} on {a.data}: {len(train_data)} training images, {len(valid)} clean validation")
    rows = []
    for dev, prec in combos():
        r = {"device": dev, "precision": prec}
        clf = base.copy().to(dev, prec)
        t0 = time.perf_counter()
        train(clf, train_data, None, cfg, desc=f"{dev}/{prec}")
        r["train_s"] = time.perf_counter() - t0
        r["train_acc"] = accuracy(clf, test)
        clf = base.copy().to(dev, prec)
        t0 = time.perf_counter()
        nc = neural_cleanse(clf, valid, NCConfig(mode="full", labels=labels, max_steps=a.steps,
                                                  num_images=500))
        r["nc_s"] = time.perf_counter() - t0
        r["norms"] = [round(x.norm, 1) for x in nc.labels]
        t0 = time.perf_counter()
        prune_sweep(clf, valid, stop="max_drop")
        r["sweep_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        fixed, res = repair("anp", clf, DefenderData(clean=valid), test, None, {"iterations": 100})
        r["repair_s"] = time.perf_counter() - t0
        r["repair_acc"] = res.after.clean_accuracy
        rows.append(r)
        print(r, flush=True)
    ref = rows[0]
    print("\n| device | precision | train epoch s (×) | NC s (×) | sweep s (×) | repair s (×) | "
          "clean acc after 1 epoch | NC mask norms | ANP clean acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k]:.1f} ({ref[k] / r[k]:.2f}×)" for k in ("train_s", "nc_s", "sweep_s", "repair_s")]
        print(f"| {r['device']} | {r['precision']} | " + " | ".join(cells)
              + f" | {100 * r['train_acc']:.2f} % | {', '.join(map(str, r['norms']))} | "
              f"{100 * r['repair_acc']:.2f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
