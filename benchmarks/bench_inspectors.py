"""The data inspectors (`spectral`, `ac`) on a BadNets-poisoned GTSRB training set.

Setting (as benchmarks/repairs_gtsrb.toml's badnets attack): the whole official GTSRB training
split (39,209 images, 32x32), ``patch:size=4`` stamped on round(0.05 N) = 1,960 images drawn from
outside class 0 and relabelled 0 (`poison_training_set`, seed 0); gtsrb_cnn trained on it for 4
epochs, batch 128, Adam lr 1e-3, cosine schedule (`TrainConfig` defaults otherwise, seed 0, no
validation split: the last epoch is kept). The model is cached in ``--out`` (model.safetensors)
and reused by later runs, so it is trained once; so is each finished inspector run (runs/).
Clean accuracy and ASR are measured on the official test split (reported only).

Then each inspector runs with its paper defaults — spectral: ε = 0.05 (the whole-set poisoning
rate, which the defender is assumed to know as an upper bound), 1.5 ε n_y removed per class; ac:
10 components, 2-means, relative size ≤ 0.35, with PCA (our default) and with the paper's FastICA
under three seeds (to see how much the ICA start matters). Reported per run: samples flagged, precision and
recall of the poisoned rows over the whole set and inside the target class, wall time, image
passes. Diagnostics that decide nothing (no option is chosen from them): the target class's
poisoned share; for spectral the AUROC of its score inside the target class (does the top
direction separate poisoned from clean, whichever side it removes?); for ac the agreement of the
target class's 2-means split with the truth (the larger of the two cluster-to-truth matchings).

    nice python benchmarks/bench_inspectors.py [--data PATH/TO/GTSRB] [--out runs/bench-inspectors]

Writes ``--out``/results.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BACKDOORLAB_DATA", ROOT.parent / "shared" / "data")) / "gtsrb32" / "GTSRB"
TARGET, RATE, TRIGGER = 0, 0.05, "patch:size=4"


def auroc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counted half."""
    if not len(pos) or not len(neg):
        return None
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([pos, neg]))
    return float((r[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-inspectors"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from backdoorlab.attacks.poison import make_poisoned_test_set, poison_training_set
    from backdoorlab.data import load_dataset
    from backdoorlab.evaluation import accuracy
    from backdoorlab.inspectors import inspect
    from backdoorlab.models.architectures import build
    from backdoorlab.models.classifier import Classifier
    from backdoorlab.models.files import load_model, save_model
    from backdoorlab.models.spec import InputSpec
    from backdoorlab.train import TrainConfig, seeded_init, train
    from backdoorlab.triggers import make_trigger

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    clean = load_dataset(f"gtsrb:{args.data}", split="train")
    test = load_dataset(f"gtsrb:{args.data}", split="test")
    print(f"data: {len(clean):,} train, {len(test):,} test images ({time.perf_counter() - t:.0f} s)")
    trigger = make_trigger(TRIGGER, clean.shape)
    data, info = poison_training_set(clean, trigger, TARGET, RATE, seed=0)
    truth = info.indices
    in_target = np.flatnonzero(data.labels == TARGET)
    share = len(truth) / len(in_target)
    print(f"poisoned: {info.count:,} of {info.total:,} rows -> label {TARGET}; class {TARGET} now holds "
          f"{len(in_target):,} rows, {share:.1%} of them poisoned")

    model_path = out / "model.safetensors"
    cfg = TrainConfig(epochs=4, batch_size=128, lr=1e-3, seed=0)
    if model_path.exists():
        clf = load_model(model_path)
        train_seconds = json.loads((out / "train.json").read_text())["seconds"]
        print(f"model: reused {model_path} (trained in {train_seconds:.0f} s)")
    else:
        seeded_init(0)
        h, w, c = clean.shape
        spec = InputSpec(h, w, c, scale="unit")
        clf = Classifier(build("gtsrb_cnn", clean.num_classes, spec.shape), spec, clean.num_classes,
                         "gtsrb_cnn", provenance={"trained_by": "benchmarks/bench_inspectors.py"})
        log = train(clf, data, None, cfg, desc="train")
        train_seconds = log.seconds
        save_model(clf, model_path)
        (out / "train.json").write_text(json.dumps({"seconds": log.seconds, "log": log.to_dict()}, indent=2))
        print(f"model: trained in {train_seconds:.0f} s")
    pt, tg = make_poisoned_test_set(test, trigger, TARGET)
    acc = accuracy(clf, test)
    asr = float((clf.predict(pt.images) == tg).mean())
    print(f"model: clean test accuracy {acc:.2%}, ASR {asr:.2%}")

    runs = [("spectral", {}), ("ac", {"reduce": "pca"}), ("ac", {"reduce": "ica"}),
            ("ac", {"reduce": "ica", "seed": 1}), ("ac", {"reduce": "ica", "seed": 2})]
    rows = []
    done = out / "runs"  # one file per finished run: an interrupted benchmark resumes
    done.mkdir(exist_ok=True)
    for name, opts in runs:
        key = done / (name + "".join(f"-{k}={v}" for k, v in sorted(opts.items())) + ".json")
        if key.exists():
            rows.append(json.loads(key.read_text()))
            print(f"{key.name}: reused", flush=True)
            continue
        res = inspect(name, clf, data, opts, truth=truth)
        ins = res.inspection
        f_t = np.intersect1d(ins.flagged, in_target)
        hits_t = len(np.intersect1d(f_t, truth))
        pc = ins.per_class[TARGET]
        row = {"method": name, "options": opts, "flagged": int(len(ins.flagged)),
               "precision": res.precision, "recall": res.recall,
               "target_flagged": int(len(f_t)), "target_hits": hits_t,
               "target_precision": hits_t / len(f_t) if len(f_t) else None,
               "seconds": res.seconds, "image_passes": res.passes, "target_class": pc}
        pois = np.isin(in_target, truth)
        if name == "spectral":
            s = ins.scores[in_target]
            row["target_auroc"] = auroc(s[pois], s[~pois])
        else:
            small = ins.scores[in_target] > 0.5  # the smaller cluster of the target class
            agree = float((small == pois).mean())
            row["target_split_agreement"] = max(agree, 1.0 - agree)
            row["poisoned_labels"] = ins.details["poisoned_labels"]
        rows.append(row)
        key.write_text(json.dumps(row, indent=2) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "target_class"}), flush=True)
        print(f"  class {TARGET}: {json.dumps(pc)}", flush=True)

    summary = {"setting": {"data": args.data, "train_rows": len(data), "trigger": TRIGGER,
                           "target": TARGET, "rate": RATE, "poisoned": int(info.count),
                           "target_rows": int(len(in_target)), "target_poisoned_share": share,
                           "train": {"arch": "gtsrb_cnn", "epochs": cfg.epochs,
                                     "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed},
                           "train_seconds": train_seconds, "clean_accuracy": acc, "asr": asr,
                           "threads": args.threads},
               "runs": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"

    print("\n| method | options | flagged | precision % | recall % | in class 0: flagged / poisoned "
          "among them | time s | image passes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {json.dumps(r['options']) if r['options'] else 'defaults'} | "
              f"{r['flagged']:,} | {pct(r['precision'])} | {pct(r['recall'])} | "
              f"{r['target_flagged']:,} / {r['target_hits']:,} | {r['seconds']:.1f} | "
              f"{r['image_passes']:,} |")
    print(f"\nwrote {out}/results.json")


if __name__ == "__main__":
    main()
