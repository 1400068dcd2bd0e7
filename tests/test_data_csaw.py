"""CSAW-HackML h5 data files: reading, validation, and bad input through ``backdoorlab data info``."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest

from backdoorlab.cli import main
from backdoorlab.data import ImageSet, detect_format, load_dataset
from backdoorlab.data.csaw import read_csaw_h5, write_csaw_h5
from backdoorlab.errors import BadInput


def write_h5(path, data=None, label=None, **attrs):
    with h5py.File(path, "w") as f:
        if data is not None:
            f.create_dataset("data", data=data)
        if label is not None:
            f.create_dataset("label", data=label)
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


@pytest.fixture
def nhwc():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (6, 55, 47, 3), dtype=np.uint8), rng.integers(0, 20, 6)


def test_nchw_float_0_255_like_the_csaw_files(tmp_path, nhwc):
    x, y = nhwc
    f = write_h5(tmp_path / "clean.h5", x.transpose(0, 3, 1, 2).astype(np.float64), y.astype(np.float64))
    assert detect_format(f) == "csaw"
    data = read_csaw_h5(f)
    assert data.images.dtype == np.uint8 and data.images.shape == (6, 55, 47, 3)
    np.testing.assert_array_equal(data.images, x)
    np.testing.assert_array_equal(data.labels, y)
    assert data.labels.dtype == np.int64
    assert data.num_classes == y.max() + 1 and data.meta == {"format": "csaw", "path": str(f)}


def test_nhwc_uint8_and_num_classes(tmp_path, nhwc):
    x, y = nhwc
    f = write_h5(tmp_path / "d.h5", x, y, num_classes=1283)
    data = load_dataset(str(f))
    np.testing.assert_array_equal(data.images, x)
    assert data.num_classes == 1283
    assert read_csaw_h5(f, num_classes=50).num_classes == 50


def test_unlabeled(tmp_path, nhwc):
    data = read_csaw_h5(write_h5(tmp_path / "u.h5", nhwc[0]))
    assert data.labels is None and len(data) == 6


def test_write_read_round_trip(tmp_path, nhwc):
    x, y = nhwc
    src = ImageSet(x, y, 1283, name="t")
    write_csaw_h5(src, tmp_path / "rt.h5")
    with h5py.File(tmp_path / "rt.h5") as f:
        assert f["data"].shape == (6, 3, 55, 47)  # stored channels-first, as CSAW does
    back = read_csaw_h5(tmp_path / "rt.h5")
    np.testing.assert_array_equal(back.images, x)
    np.testing.assert_array_equal(back.labels, y)
    assert back.num_classes == 1283


def test_pixels_out_of_range(tmp_path, nhwc):
    x = nhwc[0].astype(np.float32)
    x[0, 0, 0, 0] = 300.0
    with pytest.raises(BadInput, match=r"pixels must lie in 0-255, found 0\.\.300"):
        read_csaw_h5(write_h5(tmp_path / "o.h5", x))


def test_negative_pixels(tmp_path, nhwc):
    x = nhwc[0].astype(np.int16)
    x[1, 2, 3, 0] = -4
    with pytest.raises(BadInput, match="pixels must lie in 0-255"):
        read_csaw_h5(write_h5(tmp_path / "n.h5", x))


def test_unit_scaled_pixels_refused(tmp_path, nhwc):
    with pytest.raises(BadInput, match=r"scaled to \[0, 1\]"):
        read_csaw_h5(write_h5(tmp_path / "s.h5", nhwc[0] / 255.0))


def test_nan_pixels(tmp_path, nhwc):
    x = nhwc[0].astype(np.float64)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(BadInput, match="NaN"):
        read_csaw_h5(write_h5(tmp_path / "nan.h5", x))


def test_missing_data_key(tmp_path, nhwc):
    f = tmp_path / "k.h5"
    with h5py.File(f, "w") as h:
        h.create_dataset("images", data=nhwc[0])
        h.create_dataset("label", data=nhwc[1])
    with pytest.raises(BadInput, match=r"expected a dataset 'data'.*\['images', 'label'\]"):
        read_csaw_h5(f)
    with pytest.raises(BadInput, match="unrecognised data format"):
        load_dataset(str(f))  # not detected as CSAW either


def test_label_count_mismatch(tmp_path, nhwc):
    with pytest.raises(BadInput, match="6 images but 5 labels"):
        read_csaw_h5(write_h5(tmp_path / "m.h5", nhwc[0], nhwc[1][:5]))


def test_fractional_labels(tmp_path, nhwc):
    with pytest.raises(BadInput, match="whole numbers"):
        read_csaw_h5(write_h5(tmp_path / "fl.h5", nhwc[0], nhwc[1] + 0.5))


def test_label_beyond_stored_class_count(tmp_path, nhwc):
    y = nhwc[1].copy()
    y[0] = 40
    with pytest.raises(BadInput, match="label 40 out of range for 30 classes"):
        read_csaw_h5(write_h5(tmp_path / "r.h5", nhwc[0], y, num_classes=30))


def test_wrong_rank_and_channels(tmp_path):
    with pytest.raises(BadInput, match="must be 4-D"):
        read_csaw_h5(write_h5(tmp_path / "r3.h5", np.zeros((4, 55, 47), np.uint8)))
    with pytest.raises(BadInput, match="1 or 3 channels"):
        read_csaw_h5(write_h5(tmp_path / "c5.h5", np.zeros((4, 5, 8, 5), np.uint8)))


def test_corrupt_file(tmp_path):
    f = tmp_path / "bad.h5"
    f.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(BadInput, match="not a readable HDF5 file"):
        read_csaw_h5(f)


def test_missing_file(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        read_csaw_h5(tmp_path / "absent.h5")


def test_cli_data_info_ok(tmp_path, nhwc, capsys):
    f = write_h5(tmp_path / "ok.h5", nhwc[0].transpose(0, 3, 1, 2), nhwc[1])
    assert main(["data", "info", str(f)]) == 0
    out = capsys.readouterr().out
    assert "format:      csaw" in out and "55x47x3" in out and "images:      6" in out


@pytest.mark.parametrize("case", ["corrupt", "missing_key", "out_of_range", "mismatch"])
def test_cli_data_info_bad_input(tmp_path, nhwc, capsys, case):
    x, y = nhwc
    f = tmp_path / f"{case}.h5"
    if case == "corrupt":
        f.write_bytes(b"not an hdf5 file at all")
    elif case == "missing_key":
        write_h5(f, label=y)
    elif case == "out_of_range":
        write_h5(f, x.astype(np.float64) * 2, y)
    else:
        write_h5(f, x, y[:4])
    assert main(["data", "info", f"csaw:{f}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert str(f) in captured.err and captured.out == ""


def test_cli_subprocess_exit_status(tmp_path):
    f = tmp_path / "bad.h5"
    f.write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "backdoorlab", "data", "info", f"csaw:{f}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "not a readable HDF5" in r.stderr
