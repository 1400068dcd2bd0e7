"""The input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020) on the bundled digits: does it
implant, and are its triggers input-specific? → docs/attacks-input-aware.md.

small_cnn on the digits at 16x16 (75 % for training, of which 10 % clean validation; 25 % test),
rate 0.1 (the paper's p_attack), target 0, Adam lr 3e-3, batch 64, 150 epochs, the last kept. Per
setting and seed: clean test accuracy, ASR (test images of other labels with their own triggers)
and the cross-trigger accuracy (test images stamped with a randomly paired image's trigger that
keep their true label; the paper's cross test: high = triggers are not reusable). Settings: the
paper's MNIST generators (width 16, steps 2) with its mask density 0.032 and 25 mask epochs; the
same with masks of density 0.1 (10 mask epochs), the setting of the test suite; and that without
cross-trigger samples (cross_rate 0), the ablation.

    nice python benchmarks/input_aware_digits.py [--seeds 1,2,3] [--epochs 150] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from backdoorlab.attacks.runner import AttackPlan, train_attack
from backdoorlab.data import load_dataset
from backdoorlab.train import TrainConfig

DENSE = "input-aware:mask_epochs=10,width=16,steps=2,mask_density=0.1"
SETTINGS = {
    "paper (density 0.032)": "input-aware:width=16,steps=2",
    "density 0.1": DENSE,
    "density 0.1, no cross samples": DENSE + ",cross_rate=0",
}


def ms(v: list[float]) -> str:
    return f"{100 * statistics.fmean(v):.1f}" + (f" ± {100 * statistics.stdev(v):.1f}" if len(v) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    train, test = load_dataset("digits", size=16).split(0.25, seed=1000)
    rows = []
    for name, spec in SETTINGS.items():
        for seed in [int(s) for s in a.seeds.split(",")]:
            plan = AttackPlan(triggers=[spec], targets=[0], rate=0.1)
            cfg = TrainConfig(epochs=a.epochs, batch_size=64, lr=3e-3, seed=seed)
            t0 = time.perf_counter()
            _, out, _ = train_attack(train, test, "small_cnn", plan, cfg, 0.1, seed=seed)
            info = out.poison["trigger_training"]
            rows.append({"setting": name, "spec": spec, "seed": seed, "clean": out.clean_accuracy,
                         "asr": out.asr[0], "cross": info["cross_accuracy"],
                         "mask_density": info["mask_density"], "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
            if a.json:
                a.json.write_text(json.dumps(rows, indent=1) + "\n")
    print("| setting | seeds | clean acc (%) | ASR (%) | cross-trigger acc (%) | mask coverage (%) |")
    print("|---|---|---|---|---|---|")
    for name in SETTINGS:
        rs = [r for r in rows if r["setting"] == name]
        print(f"| {name} | {len(rs)} | {ms([r['clean'] for r in rs])} | {ms([r['asr'] for r in rs])} | "
              f"{ms([r['cross'] for r in rs])} | {ms([r['mask_density'] for r in rs])} |")


if __name__ == "__main__":
    main()
