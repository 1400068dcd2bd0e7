"""Train the GTSRB attack models of the attacks issue and record their figures.

Trains, with one recipe (gtsrb_cnn, Adam 1e-3, cosine schedule, batch 128, 10 % clean validation
split, seed 0): a clean reference, BadNets (4x4 white patch, 5 %, target 0), FTrojan (GTSRB
preset: Cr/Cb at (31,31), magnitude 50; 5 %, target 8), an all-to-all BadNets (10 %), and a
two-trigger two-target model (patch -> 0, blend noise alpha 0.15 -> 5). Each run directory
(model, clean/poisoned h5 sets, results.json) lands in --out and is reused by the defense
benchmarks. Writes docs/attacks-gtsrb.md with the measured table.

    python benchmarks/train_gtsrb_attacks.py --epochs 6
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from backdoorlab.attacks.runner import AttackPlan, train_attack, write_attack_outputs
from backdoorlab.data import load_dataset
from backdoorlab.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BACKDOORLAB_DATA", ROOT.parent / "shared" / "data"))

RUNS = {
    "clean": AttackPlan(),
    "badnets": AttackPlan(triggers=["patch:size=4"], targets=[0], rate=0.05),
    "ftrojan": AttackPlan(triggers=["ftrojan:preset=gtsrb"], targets=[8], rate=0.05),
    "all2all": AttackPlan(triggers=["patch:size=4"], rate=0.10, mode="all2all"),
    "two_trigger": AttackPlan(triggers=["patch:size=4", "blend:alpha=0.15,seed=1"], targets=[0, 5],
                              rate=0.05),
    "pruning_aware": AttackPlan(triggers=["patch:size=4"], targets=[0], rate=0.05, pruning_aware=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--only", default=",".join(k for k in RUNS if k != "pruning_aware"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "gtsrb"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "attacks-gtsrb.md"))
    args = ap.parse_args()
    src = f"gtsrb:{DATA / 'gtsrb32' / 'GTSRB'}"
    train_data = load_dataset(src, split="train")
    test = load_dataset(src, split="test")
    print(f"GTSRB: {len(train_data)} train / {len(test)} test, torch threads {torch.get_num_threads()}")
    out = Path(args.out)
    for name in args.only.split(","):
        plan = RUNS[name]
        cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, schedule="cosine", seed=0)
        t0 = time.perf_counter()
        clf, outcome, artefacts = train_attack(train_data, test, "gtsrb_cnn", plan, cfg, 0.1, "unit", 0)
        write_attack_outputs(out / name, clf, outcome, artefacts)
        psnr = [q["psnr_mean"] for q in outcome.trigger_quality]
        print(f"{name}: CA {outcome.clean_accuracy:.4f} ASR {outcome.asr} PSNR {psnr} "
              f"train {outcome.train_seconds:.0f}s total {time.perf_counter() - t0:.0f}s", flush=True)
    write_doc(out, Path(args.doc), args.epochs)


def write_doc(out: Path, doc: Path, epochs: int) -> None:
    rows = []
    clean_ca = None
    for name in RUNS:
        f = out / name / "results.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        if name == "clean":
            clean_ca = r["clean_accuracy"]
        rows.append((name, r))
    lines = [
        "# GTSRB attack models",
        "",
        f"Produced by `python benchmarks/train_gtsrb_attacks.py --epochs {epochs}` on "
        f"{platform.machine()} with {os.cpu_count()} cores, no GPU (torch {torch.__version__}). "
        "Data: ../shared/data/gtsrb32 (official layout, 32x32); 10 % of the training set is held "
        "out as clean validation (best epoch chosen on it); test = the official 12,630-image test set. "
        "ASR is measured on the poisoned test set built from images whose true label differs from "
        "the target (all-to-all: every image, target y+1 mod 43). Wall time is training only and "
        "was measured while other jobs shared the 2 cores, so it is an upper bound.",
        "",
        "| model | trigger(s) → target | rate | epochs | train time | clean acc | Δ vs clean | ASR "
        "| PSNR (dB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        plan = r["settings"]["plan"]
        trig = ", ".join(f"{t} → {g}" for t, g in zip(plan["triggers"], plan["targets"] or ["y+1"] * 9,
                                                        strict=False)) or "none"
        delta = "" if clean_ca is None else f"{(r['clean_accuracy'] - clean_ca) * 100:+.2f} pts"
        asr = " / ".join(f"{a:.2%}" for a in r["asr"]) or "—"
        psnr = " / ".join(f"{q['psnr_mean']:.1f}" for q in r["trigger_quality"] if q["psnr_mean"]) or "—"
        rate = f"{plan['rate']:.0%}" if plan["triggers"] else "—"
        if plan.get("pruning_aware"):
            name += " (pruning-aware)"
        lines.append(f"| {name} | {trig} | {rate} | {r['epochs']} | {r['train_seconds']:.0f} s | "
                     f"{r['clean_accuracy']:.2%} | {delta} | {asr} | {psnr} |")
    doc.write_text("\n".join(lines) + "\n")
    print(f"wrote {doc}")


if __name__ == "__main__":
    main()
