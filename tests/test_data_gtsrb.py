"""The real GTSRB (32x32 copy, official layout): every image loads, counts match the CSV files."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np

from backdoorlab.data import detect_format, load_dataset


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter=";"))


def test_gtsrb_full_train_and_test(gtsrb_dir):
    assert detect_format(gtsrb_dir) == "gtsrb"
    train = load_dataset(f"gtsrb:{gtsrb_dir}", split="train")
    test = load_dataset(str(gtsrb_dir), split="test")

    # labels counted independently from the CSV files
    train_counts = Counter()
    for f in sorted((gtsrb_dir / "Final_Training" / "Images").glob("*/GT-*.csv")):
        train_counts.update(int(r["ClassId"]) for r in csv_rows(f))
    test_rows = csv_rows(gtsrb_dir / "Final_Test" / "GT-final_test.csv")
    test_counts = Counter(int(r["ClassId"]) for r in test_rows)

    assert len(train) == 39209 == sum(train_counts.values())
    assert len(test) == 12630 == len(test_rows)
    assert train.num_classes == test.num_classes == 43 == len(train_counts)
    np.testing.assert_array_equal(train.label_histogram(), [train_counts[c] for c in range(43)])
    np.testing.assert_array_equal(test.label_histogram(), [test_counts[c] for c in range(43)])
    assert train.images.shape[1:] == test.images.shape[1:] == (32, 32, 3)
    assert train.images.dtype == np.uint8
    # test order follows the CSV: the first image's label is the first row's ClassId
    assert test_rows[0]["Filename"] == "00000.ppm"
    assert test.labels[0] == int(test_rows[0]["ClassId"])
    np.testing.assert_array_equal(test.labels, [int(r["ClassId"]) for r in test_rows])
    # pixels are the file's own bytes (no resize for 32x32 files): compare one image end to end
    raw = (gtsrb_dir / "Final_Test" / "Images" / "00000.ppm").read_bytes()
    np.testing.assert_array_equal(test.images[0].reshape(-1), np.frombuffer(raw[-32 * 32 * 3:], np.uint8))
    assert train.images[::97].std() > 10  # real pictures, not blank arrays
