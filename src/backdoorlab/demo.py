"""`backdoorlab demo`: the main job on the embedded digits data.

Stage so far: train the small CNN on scikit-learn's bundled digits (16×16, 10 classes) with a
seeded train/validation/test split and report its clean accuracy. Attacks, defenses and the
report join as they land.
"""

from __future__ import annotations

import time
from pathlib import Path

from backdoorlab.data.digits import load_digits
from backdoorlab.evaluate import accuracy
from backdoorlab.io import atomic_dir, write_json
from backdoorlab.models.architectures import build
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.files import save_model
from backdoorlab.models.spec import InputSpec
from backdoorlab.train import TrainConfig, seeded_init, train


def run_demo(out: Path | None = None, quick: bool = False, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    data = load_digits(size=16)
    rest, test = data.split(0.25, seed=seed)
    train_set, valid = rest.split(0.15, seed=seed + 1)
    print(f"data: digits, {len(train_set)} train / {len(valid)} validation / {len(test)} test, "
          "16x16 grey, 10 classes")
    seeded_init(seed)
    spec = InputSpec(16, 16, 1, scale="unit")
    clf = Classifier(build("small_cnn", 10, spec.shape), spec, 10, "small_cnn",
                     provenance={"trained_on": "digits", "seed": seed})
    cfg = TrainConfig(epochs=8 if quick else 20, batch_size=64, lr=2e-3, seed=seed)
    log = train(clf, train_set, valid, cfg, desc="clean model")
    ca = accuracy(clf, test)
    results = {
        "data": {"name": "digits", "train": len(train_set), "valid": len(valid), "test": len(test)},
        "clean_model": {"arch": "small_cnn", "epochs": cfg.epochs,
                        "best_valid_accuracy": log.best_valid_accuracy,
                        "test_clean_accuracy": ca, "train_seconds": round(log.seconds, 2)},
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(f"clean model (small_cnn, {cfg.epochs} epochs, {log.seconds:.1f} s): "
          f"validation accuracy {log.best_valid_accuracy:.2%}, test clean accuracy {ca:.2%}")
    if out is not None:
        with atomic_dir(out) as tmp:
            save_model(clf, tmp / "clean_model.safetensors")
            write_json(tmp / "results.json", results)
        print(f"outputs: {out}/results.json, {out}/clean_model.safetensors")
    return results
