"""Shared fixtures. Real data lives in BACKDOORLAB_DATA (default ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BACKDOORLAB_DATA", ROOT.parent / "shared" / "data"))
CSAW = DATA / "csaw-hackml-2020"
GTSRB = DATA / "gtsrb32" / "GTSRB"
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
