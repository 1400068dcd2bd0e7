"""Run the repair defenses on the GTSRB attack models and write docs/defenses-gtsrb.md.

Needs the run folders of `benchmarks/train_gtsrb_attacks.py` (runs/gtsrb/<attack>). For each
backdoored model: the pruning sweep (increasing mean activation, Liu et al. 2018), guided pruning
(ranked by activation on the poisoned validation split minus clean), and Fine-Pruning (prune to a
4-point validation drop, fine-tune 5 epochs at lr 1e-3 on the clean validation split). All choices
use the clean validation split only; test figures are reported. A defense whose results.json
already exists is not rerun.

    python benchmarks/defend_gtsrb.py [--attacks badnets,ftrojan]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from backdoorlab.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], out: Path) -> dict:
    if not (out / "results.json").exists():
        rc = cli([*args, "--out", str(out)])
        if rc != 0:
            raise SystemExit(f"failed: backdoorlab {' '.join(args)}")
    return json.loads((out / "results.json").read_text())


def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attacks", default="badnets,ftrojan")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "gtsrb"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "gtsrb-defense"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "defenses-gtsrb.md"))
    a = ap.parse_args()
    lines = [
        "# Repair defenses on the GTSRB backdoored models",
        "",
        "Produced by `python benchmarks/defend_gtsrb.py` on 2 cores, no GPU, from the models of "
        "`benchmarks/train_gtsrb_attacks.py` (docs/attacks-gtsrb.md). Layer: conv_6 of gtsrb_cnn "
        "(128 channels), measured at pool_3. Drops are percentage points of clean validation accuracy "
        "(the 10 % split held out of the training data); clean test accuracy and ASR are on the official "
        "test set (ASR: poisoned test images whose true label differs from the target). Fine-Pruning: "
        "pruned to the first 4-point drop, then fine-tuned 5 epochs (Adam, lr 1e-3) on the clean validation "
        "split, best epoch picked on a 20 % part of it. Guided pruning ranks channels by mean activation on "
        "the poisoned validation split minus the clean one (the defender is assumed to hold such inputs; "
        "Neural Cleanse's reversed triggers can stand in for them).",
        "",
    ]
    for name in a.attacks.split(","):
        r = Path(a.runs) / name
        data = ["--valid", str(r / "clean_valid.h5"), "--test", str(r / "clean_test.h5"), "--poisoned",
                str(r / "poisoned_test.h5")]
        model = str(r / "model.safetensors")
        out = Path(a.out)
        plain = run(["prune", model, *data], out / f"{name}-prune")
        guided = run(["prune", model, *data, "--order", "guided", "--guide", str(r / "poisoned_valid.h5")],
                     out / f"{name}-guided")
        fp = run(["fine-prune", model, *data, "--drop", "4", "--epochs", "5", "--lr", "1e-3"],
                 out / f"{name}-fine-prune")
        lines += [f"## {name}", "",
                  "| drop (pts) | pruning: channels / test acc / ASR | GoodNet: test acc / ASR / detection "
                  "| guided: channels / test acc / ASR |", "|---|---|---|---|"]
        base = plain["sweep"]["steps"]
        first = f"0 / {pct(base['test_accuracy'][0])} / {pct(base['asr'][0])}"
        lines.append(f"| 0 (unpruned) | {first} | — | — |")
        for tp, tg in zip(plain["sweep"]["thresholds"], guided["sweep"]["thresholds"], strict=True):
            g = tp.get("goodnet") or {}
            cell_p = (f"{tp['pruned']} / {pct(tp['test_accuracy'])} / {pct(tp['asr'])}" if tp["reached"]
                      else "not reached")
            cell_g = (f"{pct(g.get('clean_accuracy'))} / {pct(g.get('asr'))} / {pct(g.get('detection_rate'))}"
                      if tp["reached"] else "—")
            cell_q = (f"{tg['pruned']} / {pct(tg['test_accuracy'])} / {pct(tg['asr'])}" if tg["reached"]
                      else "not reached")
            lines.append(f"| {tp['drop']:g} | {cell_p} | {cell_g} | {cell_q} |")
        lines += ["", f"Fine-Pruning ({len(fp['pruned_channels'])} of {fp['num_channels']} channels pruned, "
                  f"{fp['seconds']:.0f} s including the sweep):", "",
                  "| model | valid acc | clean test acc | ASR |", "|---|---|---|---|"]
        for label, key in (("before", "before"), ("after pruning", "after_pruning"),
                           ("after fine-tuning", "after_finetuning")):
            st = fp[key]
            lines.append(f"| {label} | {pct(st['valid_accuracy'])} | {pct(st['test_accuracy'])} | "
                         f"{pct(st['asr'])} |")
        lines += ["", f"Curves: `{os.path.relpath(out / f'{name}-prune' / 'curve.png', ROOT)}`, "
                  f"`{os.path.relpath(out / f'{name}-guided' / 'curve.png', ROOT)}` (not committed; "
                  "rerun the script).", ""]
    Path(a.doc).write_text("\n".join(lines))
    print(f"wrote {a.doc}")


if __name__ == "__main__":
    main()
