import numpy as np
import pytest

from backdoorlab.data import ImageSet, load_dataset
from backdoorlab.data.digits import load_digits
from backdoorlab.errors import BadInput


def make(n=100, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    y = np.arange(n) % classes
    return ImageSet(x, y, classes, name="toy")


def test_validation_rejects_bad_arrays():
    with pytest.raises(BadInput, match="uint8"):
        ImageSet(np.zeros((2, 4, 4, 3), np.float32), np.zeros(2, np.int64), 2)
    with pytest.raises(BadInput, match="4-D"):
        ImageSet(np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int64), 2)
    with pytest.raises(BadInput, match="labels must lie"):
        ImageSet(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 2]), 2)
    with pytest.raises(BadInput, match="2 images but labels"):
        ImageSet(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1, 1]), 2)


def test_split_is_seeded_stratified_and_disjoint():
    d = make(100, 5)
    rest, part = d.split(0.2, seed=3)
    rest2, part2 = d.split(0.2, seed=3)
    assert np.array_equal(part.images, part2.images) and np.array_equal(rest.labels, rest2.labels)
    assert len(rest) + len(part) == 100
    assert np.bincount(part.labels).tolist() == [4] * 5  # 20 % of 20 per class
    other = d.split(0.2, seed=4)[1]
    assert not np.array_equal(other.images, part.images)
    # disjoint: every image row appears exactly once across the two parts
    rows = {r.tobytes() for r in rest.images} | {r.tobytes() for r in part.images}
    assert len(rows) == 100


def test_take_and_subset():
    d = make(50)
    t = d.take(10, seed=1)
    assert len(t) == 10 and np.array_equal(t.take(10, 1).images, t.images)
    assert len(d.take(80)) == 50
    assert d.subset(d.labels == 1).labels.tolist() == [1] * 10


def test_digits_embedded():
    d = load_digits(size=16)
    assert d.images.shape == (1797, 16, 16, 1) and d.images.dtype == np.uint8
    assert d.num_classes == 10 and d.images.max() == 255
    assert np.bincount(d.labels).min() >= 170
    # nearest-neighbour upscale: 2x2 blocks are constant
    assert np.array_equal(d.images[:, ::2, ::2], d.images[:, 1::2, 1::2])
    assert load_dataset("digits").images.shape == (1797, 16, 16, 1)
    assert load_dataset("digits", size=32, rgb=True).images.shape == (1797, 32, 32, 3)


def test_unknown_format_and_missing_path(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        load_dataset(str(tmp_path / "nope"))
    f = tmp_path / "x.txt"
    f.write_text("hello")
    with pytest.raises(BadInput, match="unrecognised data format"):
        load_dataset(str(f))
    with pytest.raises(BadInput, match="unknown data format"):
        load_dataset(str(f), format="parquet")
