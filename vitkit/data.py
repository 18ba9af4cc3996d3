"""Datasets for the `vitkit` command: the bundled 8x8 digits, or a folder of images.

Everything comes back as numpy arrays, channels-last, scaled to [0, 1], so it feeds
`model.fit` on any backend. Nothing here touches the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ValueError):
    """A dataset that cannot be used; the message says what is wrong and where."""


@dataclass
class Dataset:
    x_train: np.ndarray  # (n, h, w, c) float32 in [0, 1]
    y_train: np.ndarray  # (n,) int32
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[-1])

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.x_train.shape[1:3])


def _split(x, y, test_fraction, seed):
    """A stratified split: the same seed gives the same held-out images."""
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test.extend(members[: max(1, round(len(members) * test_fraction))])
    mask = np.zeros(len(y), bool)
    mask[test] = True
    return x[~mask], y[~mask], x[mask], y[mask]


def load_digits(test_fraction=0.2, seed=0) -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits: 1,797 images, 10 classes, 1 channel."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DataError(
            "the digits dataset needs scikit-learn (pip install 'vitkit[cli]')"
        ) from None
    digits = sklearn_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    return Dataset(*_split(x, y, test_fraction, seed), [str(i) for i in range(10)])


def read_image(path, size, channels) -> np.ndarray:
    """One image file -> (h, w, channels) float32 in [0, 1], resized to `size` (h, w)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            image = image.resize((size[1], size[0]), Image.BILINEAR)
            array = np.asarray(image, dtype="float32") / 255.0
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot read image {path}: {err.__class__.__name__}") from None
    return array[..., None] if channels == 1 else array


def load_folder(root, size, channels=3, test_fraction=0.2, seed=0) -> Dataset:
    """A folder with one sub-folder of images per class (the layout of Keras'
    `image_dataset_from_directory`), read into memory and resized to `size`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(
            f"dataset folder {root} has {len(classes)} class sub-folder(s); "
            "it needs at least 2 (one sub-folder of images per class)"
        )
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {root / name} holds no images")
        images.extend(read_image(f, size, channels) for f in files)
        labels.extend([label] * len(files))
    x, y = np.stack(images), np.asarray(labels, "int32")
    return Dataset(*_split(x, y, test_fraction, seed), classes)


def resize(x: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of a batch of channels-last images to `size` (h, w), in numpy."""
    size = tuple(size)
    if x.shape[1:3] == size:
        return x
    from PIL import Image

    out = np.empty((len(x), *size, x.shape[-1]), "float32")
    for i, image in enumerate(x):
        for c in range(x.shape[-1]):
            plane = Image.fromarray(image[..., c].astype("float32"), mode="F")
            out[i, ..., c] = np.asarray(plane.resize((size[1], size[0]), Image.BILINEAR))
    return out


def _shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate channels-last images by (dy, dx) pixels, filling with zeros."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, yd, xd] = images[:, ys, xs]
    return out


def augmented_batches(x, y, batch_size, max_shift, seed=0, channels_first=False):
    """A `keras.utils.PyDataset` of shuffled batches, each image randomly translated by up to
    `max_shift` pixels (the classic augmentation for digits); works with `fit` on any backend."""
    import keras

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.order = self.rng.permutation(len(x))

        def __len__(self):
            return -(-len(x) // batch_size)

        def __getitem__(self, index):
            take = self.order[index * batch_size : (index + 1) * batch_size]
            images = x[take].transpose(0, 2, 3, 1) if channels_first else x[take].copy()
            for i in range(len(images)):
                dy, dx = self.rng.integers(-max_shift, max_shift + 1, size=2)
                images[i : i + 1] = _shift(images[i : i + 1], int(dy), int(dx))
            if channels_first:
                images = images.transpose(0, 3, 1, 2)
            return images, y[take]

        def on_epoch_end(self):
            self.order = self.rng.permutation(len(x))

    return Batches()
