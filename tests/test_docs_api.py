"""docs/api.md: every python block, run in order in one namespace on a small DeepID lab.

The first block sets the paths and budgets the others read; the test replaces them with a
briefly trained 4-class DeepID BadNet (saved as Keras weights) and CSAW h5 data files, so a
snippet that raises, or that stops reading those variables, fails here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from backdoorlab.data import ImageSet
from backdoorlab.data.csaw import write_csaw_h5
from backdoorlab.models import Classifier, InputSpec
from backdoorlab.models.architectures import deepid
from backdoorlab.models.keras_h5 import save_keras_weights
from backdoorlab.poisoned import RULES
from backdoorlab.train import TrainConfig, train

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
K, H, W = 4, 55, 47
TARGET = 0


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def stamp(x: np.ndarray) -> np.ndarray:
    """A dark band across the eyes (a stand-in for the sunglasses trigger)."""
    x = x.copy()
    x[:, 18:24, 6:41] = 10
    return x


def make_files(root: Path) -> dict[str, str]:
    """A BadNet (stamped images -> TARGET) as Keras weights, clean validation/test data and a
    poisoned test file whose labels are all the target (the CSAW convention); the paths."""
    rng = np.random.default_rng(0)
    face = np.kron(rng.uniform(60, 200, (6, 5, 3)), np.ones((10, 10, 1)))[:H, :W]
    people = face + np.stack([np.kron(rng.normal(0, 14, (11, 10, 3)), np.ones((5, 5, 1)))[:H, :W]
                              for _ in range(K)])

    def faces(per_class: int) -> ImageSet:
        y = np.repeat(np.arange(K), per_class)
        x = people[y] + rng.normal(0, 40, (len(y), H, W, 3))
        return ImageSet(np.clip(np.rint(x), 0, 255).astype(np.uint8), y, K)

    train_set, valid, test = faces(40), faces(20), faces(20)
    pick = rng.choice(len(train_set), len(train_set) // 10, replace=False)
    x = np.concatenate([train_set.images, stamp(train_set.images[pick])])
    y = np.concatenate([train_set.labels, np.full(len(pick), TARGET)])
    torch.manual_seed(0)
    clf = Classifier(deepid(K, (H, W, 3)), InputSpec(H, W, 3, "unit"), K, "deepid")
    train(clf, ImageSet(x, y, K), None, TrainConfig(epochs=8, batch_size=32, lr=2e-3, seed=0))
    paths = {"MODEL": root / "bd_weights.h5", "CLEAN_VALID": root / "valid.h5",
             "CLEAN_TEST": root / "test.h5", "POISONED": root / "poisoned.h5"}
    save_keras_weights(clf, paths["MODEL"])
    write_csaw_h5(valid, paths["CLEAN_VALID"])
    write_csaw_h5(test, paths["CLEAN_TEST"])
    write_csaw_h5(ImageSet(stamp(test.images), np.full(len(test), TARGET), K), paths["POISONED"])
    return {k: str(v) for k, v in paths.items()}


def test_every_api_snippet_runs_in_order(tmp_path, monkeypatch):
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 7, "setup, load, evaluate, predict, prune, scan, repair, save"
    overrides = {**make_files(tmp_path), "OUT": str(tmp_path / "out"), "EPOCHS": 1, "NC_STEPS": 8}
    ns: dict = {"__name__": "api_doc"}
    exec(compile(blocks[0], f"{DOC.name} (setup)", "exec"), ns)
    missing = set(overrides) - set(ns)
    assert not missing, f"the setup block no longer defines {sorted(missing)}"
    ns.update(overrides)
    monkeypatch.chdir(tmp_path)  # anything relative lands in the test's folder
    for i, block in enumerate(blocks[1:], start=1):
        exec(compile(block, f"{DOC.name} (python block {i + 1})", "exec"), ns)  # raises -> fails

    # the snippets worked on the files given, not on something else
    assert ns["model"].num_classes == K and len(ns["test"]) == 20 * K
    assert ns["res"].poisoned_sets[0]["rule"] == RULES["target"] and ns["res"].poisoned_sets[0]["target"] == 0
    assert ns["res"].poisoned_sets[0]["counted"] == len(ns["poisoned"])
    assert ns["same"] == [True, True, True]
    assert ns["goodnet"].num_classes == K + 1
    assert {"unlearn", "filter"} <= set(ns["repaired"])
    for name in ("finetuned.safetensors", "finetuned.json", "goodnet.safetensors", "finetuned.h5"):
        assert os.path.isfile(os.path.join(overrides["OUT"], name)), name
