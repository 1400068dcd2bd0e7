"""Readers for GTSRB (synthetic official + Kaggle layouts), CIFAR-10, MNIST, image folders, imageio."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backdoorlab.cli import main
from backdoorlab.data import detect_format, load_dataset
from backdoorlab.data.cifar import read_cifar10, safe_load_pickle
from backdoorlab.data.folder import read_class_folder, read_images
from backdoorlab.data.gtsrb import read_gtsrb
from backdoorlab.data.imageio import crop_box, decode_image, parse_pnm, resize
from backdoorlab.data.mnist import read_mnist
from backdoorlab.errors import BadInput

RNG = np.random.default_rng(0)


def rand_img(h: int, w: int, c: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, c), dtype=np.uint8)


def write_ppm(path: Path, img: np.ndarray, comment: bool = True) -> None:
    magic = b"P6" if img.shape[2] == 3 else b"P5"
    head = magic + b"\n" + (b"# made by a test\n" if comment else b"")
    head += f"{img.shape[1]} {img.shape[0]}\n255\n".encode()
    path.write_bytes(head + np.ascontiguousarray(img).tobytes())


def write_png(path: Path, img: np.ndarray) -> None:
    Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(path)


# --- imageio -------------------------------------------------------------------------------------

def test_parse_pnm_matches_pillow_with_comment(tmp_path):
    img = rand_img(7, 5)
    write_ppm(tmp_path / "a.ppm", img)
    buf = (tmp_path / "a.ppm").read_bytes()
    fast = parse_pnm(buf)
    assert fast is not None and fast.shape == (7, 5, 3)
    np.testing.assert_array_equal(fast, img)
    np.testing.assert_array_equal(fast, np.asarray(Image.open(tmp_path / "a.ppm")))


def test_parse_pnm_grey_and_small_maxval():
    grey = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    out = parse_pnm(b"P5 2 2 3\n" + grey.tobytes())
    assert out.shape == (2, 2, 1)
    np.testing.assert_array_equal(out[..., 0], [[0, 85], [170, 255]])


def test_parse_pnm_truncated_and_non_pnm():
    with pytest.raises(ValueError, match="truncated"):
        parse_pnm(b"P6\n4 4\n255\n" + b"\x00" * 10)
    assert parse_pnm(b"\x89PNG....") is None


def test_decode_png_modes(tmp_path):
    rgba = rand_img(4, 6, 4)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out.shape == (4, 6, 3)
    np.testing.assert_array_equal(out, rgba[..., :3])
    grey = rand_img(3, 3, 1)
    buf = io.BytesIO()
    Image.fromarray(grey[..., 0]).save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out.shape == (3, 3, 1)
    np.testing.assert_array_equal(out, grey)


def test_resize_downscale_averages_not_samples():
    checker = (np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, axis=2)
    small = resize(checker, 2)
    assert small.shape == (2, 2, 3)
    assert 100 < small.mean() < 155 and small.std() < 20  # averaged grey, not aliased black/white
    assert resize(checker, 8) is checker
    assert resize(checker[..., :1], (4, 6)).shape == (4, 6, 1)


def test_crop_box_same_frame_and_scaled():
    cols = np.tile(np.arange(40, dtype=np.uint8), (30, 1))[..., None]  # pixel value = column index
    same = crop_box(cols, (5, 6, 24, 25, 40, 30))
    assert same.shape == (20, 20, 1) and same[0, 0, 0] == 5 and same[0, -1, 0] == 24
    # the same box in a frame twice as large maps to half the coordinates
    half = crop_box(cols, (10, 12, 49, 51, 80, 60))
    assert half.shape == (20, 20, 1) and half[0, 0, 0] == 5 and half[0, -1, 0] == 24


# --- GTSRB (synthetic) ---------------------------------------------------------------------------

GT_HEAD = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"


def make_official(root: Path, per_class: dict[int, int], n_test: int = 5, stored: int = 32,
                  test_labels: bool = True) -> dict:
    """A tiny official-layout GTSRB; returns the images and labels written, in reading order."""
    out = {"train": [], "train_y": [], "test": [], "test_y": []}
    for c, n in sorted(per_class.items()):
        d = root / "Final_Training" / "Images" / f"{c:05d}"
        d.mkdir(parents=True)
        lines = [GT_HEAD]
        for i in range(n):
            img = rand_img(stored, stored)
            write_ppm(d / f"{c:05d}_{i:05d}.ppm", img)
            lines.append(f"{c:05d}_{i:05d}.ppm;{stored};{stored};1;1;{stored - 2};{stored - 2};{c}\n")
            out["train"].append(img)
            out["train_y"].append(c)
        (d / f"GT-{c:05d}.csv").write_text("".join(lines))
    d = root / "Final_Test" / "Images"
    d.mkdir(parents=True)
    lines, unl = [GT_HEAD], [GT_HEAD.replace(";ClassId", "")]
    for i in range(n_test):
        img = rand_img(stored, stored)
        c = (7 * i + 3) % 43
        write_ppm(d / f"{i:05d}.ppm", img)
        lines.append(f"{i:05d}.ppm;{stored};{stored};0;0;{stored - 1};{stored - 1};{c}\n")
        unl.append(f"{i:05d}.ppm;{stored};{stored};0;0;{stored - 1};{stored - 1}\n")
        out["test"].append(img)
        out["test_y"].append(c)
    (d / "GT-final_test.test.csv").write_text("".join(unl))
    if test_labels:
        (root / "Final_Test" / "GT-final_test.csv").write_text("".join(lines))
    return out


def test_gtsrb_official_train_and_test_exact(tmp_path):
    root = tmp_path / "GTSRB"
    ref = make_official(root, {0: 3, 2: 4, 10: 2})
    tr = read_gtsrb(root, "train")
    assert tr.num_classes == 43 and tr.images.shape == (9, 32, 32, 3)
    np.testing.assert_array_equal(tr.labels, ref["train_y"])
    np.testing.assert_array_equal(tr.images, np.stack(ref["train"]))
    te = read_gtsrb(root, "test")
    np.testing.assert_array_equal(te.labels, ref["test_y"])
    np.testing.assert_array_equal(te.images, np.stack(ref["test"]))
    assert te.meta["format"] == "gtsrb" and te.meta["layout"] == "official" and te.meta["path"] == str(root)
    assert detect_format(root) == "gtsrb"


@pytest.mark.parametrize("sub,split", [("", "train"), ("Final_Training", "train"),
                                       ("Final_Training/Images", "train"), ("Final_Test", "test"),
                                       ("Final_Test/Images", "test")])
def test_gtsrb_path_variants(tmp_path, sub, split):
    root = tmp_path / "GTSRB"
    ref = make_official(root, {1: 2, 3: 1}, n_test=3)
    data = load_dataset(str(root / sub) if sub else str(tmp_path), split=split)  # parent of GTSRB too
    assert data.meta["format"] == "gtsrb" and data.meta["split"] == split
    np.testing.assert_array_equal(data.labels, ref[f"{split}_y"])


def test_gtsrb_single_split_folder_overrides_default_split(tmp_path):
    root = tmp_path / "GTSRB"
    make_official(root, {1: 2}, n_test=3)
    data = read_gtsrb(root / "Final_Test", "train")
    assert data.meta["split"] == "test" and len(data) == 3 and "ignored" in data.meta["note"]


def test_gtsrb_unlabeled_test(tmp_path):
    root = tmp_path / "GTSRB"
    make_official(root, {0: 1}, n_test=4, test_labels=False)
    te = read_gtsrb(root, "test")
    assert te.labels is None and len(te) == 4
    assert "GT-final_test.test.csv" in te.meta["note"]


def test_gtsrb_resize_and_roi(tmp_path):
    # stored 48x48 while the CSV says the original was 96x96, ROI (32..63) -> stored 16..31
    root = tmp_path / "GTSRB"
    d = root / "Final_Training" / "Images" / "00005"
    d.mkdir(parents=True)
    img = np.zeros((48, 48, 3), np.uint8)
    img[..., 2] = 255  # blue everywhere
    img[16:32, 16:32] = (255, 0, 0)  # the sign, red
    write_ppm(d / "a.ppm", img)
    (d / "GT-00005.csv").write_text(GT_HEAD + "a.ppm;96;96;32;32;63;63;5\n")
    plain = read_gtsrb(root, size=32)
    assert plain.images.shape == (1, 32, 32, 3) and plain.images[0, 0, 0, 2] == 255
    cropped = read_gtsrb(root, size=24, roi=True)
    assert cropped.images.shape == (1, 24, 24, 3)
    np.testing.assert_array_equal(cropped.images[0], np.broadcast_to([255, 0, 0], (24, 24, 3)))
    assert read_gtsrb(root, size=None).images.shape == (1, 48, 48, 3)


def make_kaggle(root: Path) -> dict:
    root.mkdir()
    out = {}
    for split, folder, n in (("train", "Train", 6), ("test", "Test", 4)):
        rows = ["Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path\n"]
        ys = []
        for i in range(n):
            c = (5 * i) % 43
            h, w = 30 + i, 34 - i  # differing sizes, as in the Kaggle PNGs
            sub = root / folder / (str(c) if split == "train" else "")
            sub.mkdir(parents=True, exist_ok=True)
            rel = (Path(folder) / (str(c) if split == "train" else "") / f"{i:05d}.png").as_posix()
            write_png(root / rel, np.full((h, w, 3), 10 * i, np.uint8))
            rows.append(f"{w},{h},2,2,{w - 3},{h - 3},{c},{rel}\n")
            ys.append(c)
        (root / f"{folder}.csv").write_text("".join(rows))
        out[split] = ys
    (root / "Meta").mkdir()
    (root / "Meta.csv").write_text("Path,ClassId,ShapeId,ColorId,SignId\nMeta/0.png,0,1,0,1.1\n")
    return out


def test_gtsrb_kaggle_layout(tmp_path):
    root = tmp_path / "kaggle"
    ref = make_kaggle(root)
    assert detect_format(root) == "gtsrb"
    for split in ("train", "test"):
        data = load_dataset(f"gtsrb:{root}", split=split)
        assert data.meta["layout"] == "kaggle" and data.images.shape == (len(ref[split]), 32, 32, 3)
        np.testing.assert_array_equal(data.labels, ref[split])
        # uniform images stay uniform through the resize: image i has value 10 * i
        np.testing.assert_array_equal(data.images[:, 5, 5, 0], 10 * np.arange(len(ref[split])))
    assert read_gtsrb(root, "train", roi=True).images.shape == (6, 32, 32, 3)


def test_gtsrb_label_out_of_range(tmp_path):
    root = tmp_path / "GTSRB"
    make_official(root, {0: 2})
    f = root / "Final_Training/Images/00000/GT-00000.csv"
    f.write_text(f.read_text().replace(";0\n", ";43\n", 1))
    with pytest.raises(BadInput, match="ClassId 43 out of range"):
        read_gtsrb(root)


def test_gtsrb_missing_image_file(tmp_path):
    root = tmp_path / "GTSRB"
    make_official(root, {0: 2})
    (root / "Final_Training/Images/00000/00000_00001.ppm").unlink()
    with pytest.raises(BadInput, match="00000_00001.ppm: no such image file"):
        read_gtsrb(root)


def test_gtsrb_missing_column(tmp_path):
    root = tmp_path / "GTSRB"
    make_official(root, {0: 2})
    f = root / "Final_Training/Images/00000/GT-00000.csv"
    f.write_text(f.read_text().replace("ClassId", "Klasse"))
    with pytest.raises(BadInput, match="missing column.*ClassId"):
        read_gtsrb(root)


def test_gtsrb_corrupt_image(tmp_path):
    root = tmp_path / "GTSRB"
    make_official(root, {0: 2})
    p = root / "Final_Training/Images/00000/00000_00000.ppm"
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(BadInput, match="00000_00000.ppm: not a decodable image"):
        read_gtsrb(root)


def test_gtsrb_split_absent(tmp_path):
    root = tmp_path / "kaggle"
    make_kaggle(root)
    (root / "Test.csv").unlink()
    with pytest.raises(BadInput, match="test split not found.*only the train split"):
        read_gtsrb(root, "test")


# --- CIFAR-10 ------------------------------------------------------------------------------------

def cifar_batch(n: int, seed: int, byte_keys: bool = True) -> dict:
    r = np.random.default_rng(seed)
    k = (lambda s: s.encode()) if byte_keys else (lambda s: s)
    return {k("batch_label"): k(f"batch {seed}"), k("labels"): [int(v) for v in r.integers(0, 10, n)],
            k("data"): r.integers(0, 256, (n, 3072), dtype=np.uint8),
            k("filenames"): [k(f"f{i}.png") for i in range(n)]}


def make_cifar(root: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> dict:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        batches[name] = cifar_batch(3 + i, seed=i, byte_keys=i % 2 == 0)
        with open(d / name, "wb") as f:
            pickle.dump(batches[name], f, protocol=protocol)
    names = [f"class{i}".encode() for i in range(10)]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=protocol)
    return batches


def _field(b: dict, key: str):
    return b[key.encode()] if key.encode() in b else b[key]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_folder_train_and_test(tmp_path, protocol):
    batches = make_cifar(tmp_path, protocol)
    assert detect_format(tmp_path) == "cifar10"
    tr = read_cifar10(tmp_path, "train")
    train_batches = [batches[f"data_batch_{j}"] for j in range(1, 6)]
    assert len(tr) == sum(len(_field(b, "labels")) for b in train_batches)
    np.testing.assert_array_equal(tr.labels, np.concatenate([_field(b, "labels") for b in train_batches]))
    # channel-planar rows: pixel (r, c) channel ch is data[ch * 1024 + r * 32 + c]
    row = _field(train_batches[0], "data")[1]
    for r, c, ch in [(0, 0, 0), (3, 17, 1), (31, 31, 2)]:
        assert tr.images[1, r, c, ch] == row[ch * 1024 + r * 32 + c]
    assert tr.images.shape[1:] == (32, 32, 3) and tr.class_names[3] == "class3"
    te = read_cifar10(tmp_path / "cifar-10-batches-py", "test")
    np.testing.assert_array_equal(te.labels, _field(batches["test_batch"], "labels"))
    assert te.meta == {"format": "cifar10", "path": str(tmp_path / "cifar-10-batches-py"), "split": "test"}


def test_cifar_single_batch_and_archive(tmp_path):
    batches = make_cifar(tmp_path / "x")
    d = tmp_path / "x" / "cifar-10-batches-py"
    one = load_dataset(str(d / "test_batch"), split="train")
    assert one.meta["split"] == "test" and len(one) == len(_field(batches["test_batch"], "labels"))
    arc = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        tar.add(d, arcname="cifar-10-batches-py")
    assert detect_format(arc) == "cifar10"
    te = read_cifar10(arc, "test")
    np.testing.assert_array_equal(te.images, one.images)


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("func", [os.system, eval])
def test_cifar_pickle_with_forbidden_global_is_refused(tmp_path, func):
    marker = tmp_path / "pwned"
    batch = cifar_batch(2, 0)
    batch[b"labels"] = _Evil(func, f"open({str(marker)!r}, 'w')" if func is eval else f"touch {marker}")
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(BadInput, match=rf"refused to load global \w+\.{func.__name__}"):
        read_cifar10(d, "test")
    assert not marker.exists()


def test_safe_unpickler_refuses_reduce_of_other_globals():
    with pytest.raises(BadInput, match="builtins.getattr"):
        safe_load_pickle(pickle.dumps(getattr), "x")
    assert safe_load_pickle(pickle.dumps({"a": [1, b"b"]}), "x") == {"a": [1, b"b"]}


def test_cifar_missing_key(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(BadInput, match="expected keys 'data' and 'labels'"):
        read_cifar10(d, "test")


def test_cifar_wrong_shape(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(BadInput, match=r"uint8 array \(N, 3072\)"):
        read_cifar10(d, "test")


def test_cifar_label_out_of_range(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    with pytest.raises(BadInput, match="labels must lie in 0..9"):
        read_cifar10(d, "test")


def test_cifar_label_count_mismatch(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(BadInput, match="3 images but 2 labels"):
        read_cifar10(d, "test")


def test_cifar_corrupt_pickle(tmp_path):
    make_cifar(tmp_path)
    f = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(BadInput, match="data_batch_3: not a readable pickle"):
        read_cifar10(tmp_path, "train")


def test_cifar_missing_batch(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(BadInput, match="missing CIFAR-10 train batch file.*data_batch_4"):
        read_cifar10(tmp_path, "train")


# --- MNIST ---------------------------------------------------------------------------------------

def idx_bytes(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def make_mnist(d: Path, gz: bool, n_train: int = 6, n_test: int = 4) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = RNG.integers(0, 10, n).astype(np.uint8)
        for kind, arr, dims in (("images", x, "idx3"), ("labels", y, "idx1")):
            raw = idx_bytes(arr)
            name = f"{prefix}-{kind}-{dims}-ubyte"
            if gz:
                (d / (name + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (d / name).write_bytes(raw)
        out[prefix] = (x, y)
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_folder(tmp_path, gz):
    ref = make_mnist(tmp_path, gz)
    assert detect_format(tmp_path) == "mnist"
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = read_mnist(tmp_path, split)
        assert data.images.shape == (len(ref[prefix][1]), 28, 28, 1) and data.num_classes == 10
        np.testing.assert_array_equal(data.images[..., 0], ref[prefix][0])
        np.testing.assert_array_equal(data.labels, ref[prefix][1])
        assert data.images.flags.writeable


def test_mnist_single_images_file(tmp_path):
    ref = make_mnist(tmp_path, gz=True)
    f = tmp_path / "t10k-images-idx3-ubyte.gz"
    assert detect_format(f) == "mnist"
    data = load_dataset(str(f), split="train")
    assert data.meta["split"] == "test"
    np.testing.assert_array_equal(data.labels, ref["t10k"][1])


def test_mnist_bad_magic(tmp_path):
    make_mnist(tmp_path, gz=False)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(b"\x12\x34" + f.read_bytes()[2:])
    with pytest.raises(BadInput, match="bad magic number"):
        read_mnist(tmp_path)


def test_mnist_wrong_ndim(tmp_path):
    make_mnist(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros((6, 2), np.uint8)))
    with pytest.raises(BadInput, match="2 dimensions, expected 1"):
        read_mnist(tmp_path)


def test_mnist_truncated(tmp_path):
    make_mnist(tmp_path, gz=False)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(BadInput, match="header promises"):
        read_mnist(tmp_path)


def test_mnist_wrong_image_size(tmp_path):
    make_mnist(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((6, 32, 32), np.uint8)))
    with pytest.raises(BadInput, match="32x32, expected 28x28"):
        read_mnist(tmp_path)


def test_mnist_count_mismatch(tmp_path):
    make_mnist(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(BadInput, match="6 images but .* 5 labels"):
        read_mnist(tmp_path)


def test_mnist_label_out_of_range(tmp_path):
    make_mnist(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1, 2, 3, 4, 10], np.uint8)))
    with pytest.raises(BadInput, match="found 10"):
        read_mnist(tmp_path)


def test_mnist_missing_labels(tmp_path):
    make_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(BadInput, match="labels file t10k-labels-idx1-ubyte.gz not found"):
        read_mnist(tmp_path, "test")


def test_mnist_corrupt_gz(tmp_path):
    make_mnist(tmp_path, gz=True)
    f = tmp_path / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:30])
    with pytest.raises(BadInput, match="cannot read"):
        read_mnist(tmp_path)


# --- class folders and loose images --------------------------------------------------------------

def test_class_folder_numeric_order_and_files(tmp_path):
    for name, n in (("10", 1), ("2", 2), ("1", 1)):
        (tmp_path / name).mkdir()
        for i in range(n):
            write_png(tmp_path / name / f"{i}.png", np.full((8, 8, 3), int(name), np.uint8))
    (tmp_path / ".hidden").mkdir()
    assert detect_format(tmp_path) == "folder"
    data = read_class_folder(tmp_path)
    assert data.class_names == ["1", "2", "10"] and data.num_classes == 3
    np.testing.assert_array_equal(data.labels, [0, 1, 1, 2])
    np.testing.assert_array_equal(data.images[:, 0, 0, 0], [1, 2, 2, 10])
    assert data.meta["files"] == ["1/0.png", "2/0.png", "2/1.png", "10/0.png"]
    assert data.meta["format"] == "folder"


def test_class_folder_channels_and_formats(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_png(tmp_path / "a" / "g.png", np.full((6, 6, 1), 50, np.uint8))
    write_ppm(tmp_path / "b" / "p.ppm", np.full((6, 6, 1), 90, np.uint8))  # P5 grey
    assert read_class_folder(tmp_path).images.shape == (2, 6, 6, 1)  # all grey -> 1 channel
    Image.fromarray(np.full((6, 6, 4), 200, np.uint8), "RGBA").save(tmp_path / "b" / "q.png")
    Image.fromarray(np.full((6, 6, 3), 30, np.uint8)).save(tmp_path / "b" / "r.jpg", quality=95)
    Image.fromarray(np.full((6, 6, 3), 70, np.uint8)).save(tmp_path / "b" / "s.bmp")
    data = read_class_folder(tmp_path)
    assert data.images.shape == (5, 6, 6, 3)  # one colour image -> all RGB
    by_file = dict(zip(data.meta["files"], data.images, strict=True))
    assert (by_file["a/g.png"] == 50).all() and (by_file["b/q.png"] == 200).all()
    assert (by_file["b/s.bmp"] == 70).all() and abs(int(by_file["b/r.jpg"].mean()) - 30) <= 2


def test_class_folder_sizes_differ(tmp_path):
    for name, s in (("a", 8), ("b", 10)):
        (tmp_path / name).mkdir()
        write_png(tmp_path / name / "x.png", rand_img(s, s))
    with pytest.raises(BadInput, match="images differ in size.*pass a size"):
        read_class_folder(tmp_path)
    assert read_class_folder(tmp_path, size=12).images.shape == (2, 12, 12, 3)


def test_class_folder_empty(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(BadInput, match="hold no image files"):
        read_class_folder(tmp_path)
    with pytest.raises(BadInput, match="no class subfolders"):
        read_class_folder(tmp_path / "a")


def test_class_folder_too_few_classes_given(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        write_png(tmp_path / name / "x.png", rand_img(4, 4))
    with pytest.raises(BadInput, match="3 class subfolders but 2 classes"):
        read_class_folder(tmp_path, num_classes=2)
    assert read_class_folder(tmp_path, num_classes=5).num_classes == 5


def test_class_folder_corrupt_image(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(BadInput, match="bad.png: not a decodable image"):
        read_class_folder(tmp_path)


def test_images_file_and_folder(tmp_path):
    for i in (3, 1, 2):
        write_png(tmp_path / f"img{i}.png", np.full((5, 7, 3), i, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    assert detect_format(tmp_path) == "images"
    data = read_images(tmp_path)
    assert data.labels is None and data.num_classes == 1
    assert data.meta["files"] == ["img1.png", "img2.png", "img3.png"]
    np.testing.assert_array_equal(data.images[:, 0, 0, 0], [1, 2, 3])
    one = load_dataset(str(tmp_path / "img2.png"), size=4, num_classes=43)
    assert one.images.shape == (1, 4, 4, 3) and one.num_classes == 43 and one.meta["files"] == ["img2.png"]


def test_images_empty_folder(tmp_path):
    with pytest.raises(BadInput, match="no image files"):
        read_images(tmp_path)


# --- detection and the CLI -----------------------------------------------------------------------

def test_unrecognised_format(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(BadInput, match="unrecognised data format"):
        detect_format(tmp_path)


def test_cli_data_info_for_each_format(tmp_path, capsys):
    make_mnist(tmp_path / "mnist", gz=True)
    make_cifar(tmp_path / "cifar")
    make_official(tmp_path / "GTSRB", {0: 2, 4: 1}, n_test=3, test_labels=False)
    assert main(["data", "info", str(tmp_path / "mnist"), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "format:      mnist" in out and "images:      4" in out and "28x28x1" in out
    assert main(["data", "info", str(tmp_path / "cifar")]) == 0
    out = capsys.readouterr().out
    assert "cifar10" in out and "images:      25" in out  # 3 + 4 + 5 + 6 + 7 train images
    assert main(["data", "info", str(tmp_path / "GTSRB"), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "labels:      none" in out and "note:" in out and "GT-final_test.test.csv" in out


def test_cli_data_info_bad_input_one_line(tmp_path, capsys):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "test_batch").write_bytes(pickle.dumps(_Evil(os.system, "true")))
    assert main(["data", "info", str(d), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "system" in err


def test_data_info_shows_the_only_split_there_is(tmp_path, capsys):
    """`data info` defaults to the train split; a folder holding only the test split is shown with a
    note instead of refused, while an explicit --split train still names what is missing."""
    import shutil

    from backdoorlab.cli import main

    root = tmp_path / "GTSRB"
    make_official(root, {0: 2, 1: 2}, n_test=6)
    shutil.rmtree(root / "Final_Training")
    assert main(["data", "info", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 6 and info["split"] == "test" and "no train split here" in info["note"]
    assert main(["data", "info", str(root), "--split", "train"]) == 2
    assert "train split not found" in capsys.readouterr().err
