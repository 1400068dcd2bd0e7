"""FTrojan (Wang et al., ECCV 2022): attack success rate against the training budget.

One row per setting, one column per training budget (epochs); each cell is a separate training
run from scratch with that many epochs (cosine schedule over that budget), so a cell is what a
victim training for that long gets. Every run also records the ASR after each of its epochs (the
"trace"), because the model that is kept is the epoch with the best clean validation accuracy,
and a backdoor learned late can be missing from an earlier tied epoch.

Settings:

- ``gtsrb``: GTSRB 32x32 training images (a seeded ``--n``-image subset, 10 % of it held out as
  clean validation), ``ftrojan:preset=gtsrb``, gtsrb_cnn, Adam 1e-3, batch 128, ``--rate``
  poisoned, target 0; clean accuracy and ASR on a seeded 4,000-image subset of the GTSRB test split.
- ``cifar10``: the same images and model with ``ftrojan:preset=cifar10`` (the paper's CIFAR-10
  trigger: Cr and Cb, (31,31) and (15,15), magnitude 20, one 32x32 window). There is no CIFAR-10
  copy here; GTSRB images stand in for "CIFAR-sized" data.
- ``digits``: the demo's FTrojan attack exactly as `backdoorlab demo` trains it (its trigger,
  rate, architecture and training settings from ``backdoorlab.demo``) on the bundled digits,
  upscaled to 32x32 RGB; the epochs are the only thing varied.

    python benchmarks/bench_ftrojan_budget.py --settings gtsrb,cifar10,digits --epochs 2,4,8 \\
        --json /tmp/ftrojan_budget.json

Results are appended to ``--json`` after every run (a rerun skips the cells already there), and
``--doc`` (default docs/ftrojan.md) gets the table between generated-section markers.
Data: $BACKDOORLAB_DATA (default ../shared/data from the repository root)/gtsrb32/GTSRB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from backdoorlab.attacks.poison import attack_success, make_poisoned_test_set, poison_training_set
from backdoorlab.data.imageset import ImageSet
from backdoorlab.evaluation import accuracy
from backdoorlab.metrics_image import image_quality
from backdoorlab.models.architectures import build
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.spec import InputSpec
from backdoorlab.train import TrainConfig, seeded_init, train
from backdoorlab.triggers import make_trigger

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BACKDOORLAB_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT / "benchmarks"))
BEGIN, END = "<!-- bench_ftrojan_budget: begin -->", "<!-- bench_ftrojan_budget: end -->"


def gtsrb_sets(n: int, seed: int = 0) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(training rest, clean validation, test): n seeded training images, 10 % validation."""
    from backdoorlab.data import load_dataset

    src = f"gtsrb:{DATA / 'gtsrb32' / 'GTSRB'}"
    full = load_dataset(src, split="train")
    rng = np.random.default_rng(seed)
    data = full.subset(np.sort(rng.choice(len(full), min(n, len(full)), replace=False)))
    tst = load_dataset(src, split="test")
    test = tst.subset(np.sort(rng.choice(len(tst), min(4000, len(tst)), replace=False)))
    rest, valid = data.split(0.1, seed=seed)
    return rest, valid, test


def digits_sets(seed: int = 0) -> tuple[ImageSet, ImageSet, ImageSet]:
    """The demo's split: 25 % test, then 10 % of the rest as clean validation."""
    from backdoorlab.data.digits import load_digits

    train_data, test = load_digits(size=32, rgb=True).split(0.25, seed=seed)
    rest, valid = train_data.split(0.1, seed=seed)
    return rest, valid, test


def setting(name: str, rate: float | None) -> dict:
    if name in ("gtsrb", "cifar10"):
        return {"spec": f"ftrojan:preset={name}", "rate": rate or 0.10, "arch": "gtsrb_cnn",
                "train": {"batch_size": 128, "lr": 1e-3, "schedule": "cosine"}, "target": 0}
    if name == "digits":
        from backdoorlab import demo

        plan = demo.ATTACKS["ftrojan"]
        base = demo.ftrojan_train_config(TrainConfig(batch_size=64, lr=2e-3))  # as run_demo
        return {"spec": plan.triggers[0], "rate": rate or plan.rate, "arch": demo.FTROJAN_ARCH,
                "train": {"batch_size": base.batch_size, "lr": base.lr, "keep_best": base.keep_best},
                "target": plan.targets[0]}
    raise SystemExit(f"unknown setting {name!r} (gtsrb, cifar10, digits)")


def run(sets: tuple[ImageSet, ImageSet, ImageSet], st: dict, epochs: int, seed: int = 0) -> dict:
    rest, valid, test = sets
    trig = make_trigger(st["spec"], rest.shape)
    poisoned, info = poison_training_set(rest, trig, st["target"], st["rate"], seed=seed)
    pv, tv = make_poisoned_test_set(valid, trig, st["target"], "all2one")
    pt, tt = make_poisoned_test_set(test, trig, st["target"], "all2one")
    seeded_init(seed)
    k = rest.num_classes
    clf = Classifier(build(st["arch"], k, rest.shape), InputSpec(*rest.shape, scale="unit"), k,
                     st["arch"])
    trace: list[dict] = []

    def score() -> tuple[float, dict]:  # the default selection (clean validation accuracy), logged
        va = accuracy(clf, valid)
        trace.append({"valid_accuracy": round(va, 4), "valid_asr": round(attack_success(clf, pv, tv), 4)})
        return va, {}

    cfg = TrainConfig(epochs=epochs, seed=seed, **st["train"])
    t0 = time.perf_counter()
    log = train(clf, poisoned, valid, cfg, score=score)
    seconds = time.perf_counter() - t0
    src = test.images[np.asarray(pt.meta["source_indices"])]
    q = image_quality(src, pt.images).to_dict()
    return {"epochs": epochs, "best_epoch": log.best_epoch, "clean_accuracy": accuracy(clf, test),
            "asr": attack_success(clf, pt, tt), "final_valid_asr": trace[-1]["valid_asr"],
            "trace": trace[1:] if cfg.keep_best else trace, "psnr": q["psnr_mean"], "poisoned": info.count,
            "train_images": len(rest), "seconds": round(seconds, 1), "spec": st["spec"],
            "rate": st["rate"], "arch": st["arch"]}


def table(results: dict) -> str:
    epochs = sorted({r["epochs"] for rs in results.values() for r in rs.values()})
    head = ["setting", "trigger", "train images / poisoned", "PSNR (dB)"] + [f"{e} ep" for e in epochs]
    rows = []
    for name, rs in results.items():
        any_r = next(iter(rs.values()))
        cells = []
        for e in epochs:
            r = rs.get(str(e))
            if r is None:
                cells.append("—")
                continue
            kept = "last" if r["best_epoch"] < 0 else r["best_epoch"]
            cells.append(f"{100 * r['asr']:.1f} % (last epoch {100 * r['final_valid_asr']:.0f} %, "
                         f"kept {kept}, acc {100 * r['clean_accuracy']:.1f} %, {r['seconds']:.0f} s)")
        rows.append([name, f"`{any_r['spec']}` ({any_r['arch']})",
                     f"{any_r['train_images']} / {any_r['poisoned']}", f"{any_r['psnr']:.1f}", *cells])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="gtsrb,cifar10,digits")
    ap.add_argument("--epochs", default="2,4,8")
    ap.add_argument("--n", type=int, default=20000, help="GTSRB training images (before validation)")
    ap.add_argument("--rate", type=float, default=None,
                    help="poisoning rate (default: 0.10; digits: the demo's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="/tmp/ftrojan_budget.json")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "ftrojan.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.json)
    results: dict = json.loads(path.read_text()) if path.exists() else {}
    cache: dict = {}
    for name in args.settings.split(","):
        st = setting(name, args.rate)
        for e in (int(x) for x in args.epochs.split(",")):
            if str(e) in results.get(name, {}):
                continue
            key = "digits" if name == "digits" else "gtsrb"
            if key not in cache:
                cache[key] = digits_sets() if key == "digits" else gtsrb_sets(args.n)
            r = run(cache[key], st, e)
            results.setdefault(name, {})[str(e)] = r
            path.write_text(json.dumps(results, indent=1))
            print(f"{name} {e} ep: ASR {r['asr']:.4f} (last-epoch valid ASR {r['final_valid_asr']:.3f}, "
                  f"kept epoch {r['best_epoch']}) acc {r['clean_accuracy']:.4f} PSNR {r['psnr']:.1f} "
                  f"{r['seconds']:.0f} s", flush=True)
    body = table(results)
    print(body)
    if args.doc:
        from doc_section import replace_section

        replace_section(Path(args.doc), f"{BEGIN}\n{body}\n{END}", BEGIN, END, head="# FTrojan\n\n")


if __name__ == "__main__":
    main()
