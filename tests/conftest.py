"""Shared fixtures. Real data lives in BACKDOORLAB_DATA (default ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BACKDOORLAB_DATA", ROOT.parent / "shared" / "data"))
CSAW = DATA / "csaw-hackml-2020"
GTSRB = DATA / "gtsrb32" / "GTSRB"
# data, model and training of the small digits grids of the `run` tests (a few seconds per model)
DIGITS_GRID = """[data]
source = "digits"
size = 16
train_limit = 1200
test_limit = 300
test_fraction = 0.25
[model]
arch = "small_cnn"
[train]
epochs = 6
batch_size = 64
lr = 3e-3
"""
CSAW_FILES = ["sunglasses", "anonymous_1", "anonymous_2", "multi_trigger_multi_target", "lab3"]

os.environ.setdefault("BACKDOORLAB_PROGRESS", "0")


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set BACKDOORLAB_DATA)")
    return path


@pytest.fixture
def csaw_dir() -> Path:
    return need(CSAW)


@pytest.fixture
def gtsrb_dir() -> Path:
    return need(GTSRB)


@pytest.fixture(scope="session")
def digits_badnet():
    """A small_cnn BadNet on the bundled digits (3×3 white patch in the bottom-right corner → 0 on
    10 % of the training images, 12 epochs): ``(clf, artefacts, test)`` as `train_attack` returns
    them, with each poisoned set's per-image targets in its ``meta["targets"]``. Shared by the
    defense tests; treat it as read-only (defenses copy the model)."""
    from backdoorlab.attacks.runner import AttackPlan, train_attack
    from backdoorlab.data.digits import load_digits
    from backdoorlab.train import TrainConfig

    train_data, test = load_digits().split(0.25, seed=3)
    plan = AttackPlan(triggers=["patch:size=3"], targets=[0], rate=0.1)
    clf, _, art = train_attack(train_data, test, "small_cnn", plan,
                               TrainConfig(epochs=12, batch_size=64, lr=2e-3, seed=1))
    for key in ("poisoned_test", "poisoned_valid"):
        ps, targets = art[key][0]
        ps.meta["targets"] = targets
    return clf, art, test


@pytest.fixture(scope="session")
def badnet(digits_badnet):
    """The digits BadNet as a repair sees it: (clf, DefenderData of its clean validation split,
    clean test set, [its poisoned test set]). Test files may define their own ``badnet``."""
    from backdoorlab.poisoned import poisoned_set
    from backdoorlab.repairs import DefenderData

    clf, art, test = digits_badnet
    ps, _ = art["poisoned_test"][0]
    return clf, DefenderData(clean=art["valid"]), test, [poisoned_set(ps)]


def net_state(clf) -> dict:
    """A copy of a model's weights and buffers (to check a repair leaves the given model alone)."""
    return {k: v.clone() for k, v in clf.net.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="session")
def demo_quick(tmp_path_factory):
    """``backdoorlab demo --quick`` run once as a user runs it (a subprocess), shared by the tests
    of its outputs and of its report in a browser: ``(output folder, completed process)``."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("demo-quick") / "demo"
    r = subprocess.run([sys.executable, "-m", "backdoorlab", "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    return out, r
