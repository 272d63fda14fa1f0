"""Datasets shipped with the package, as plug-ins: one [`EmbeddedDataset`] entry per dataset holds everything the code
knows about it (its loader, split rule and labels, and the evaluation extras a labelled one enables). Nothing else in
the package tests a dataset's name; `register_embedded_dataset` adds one."""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import numpy as np
import PIL.Image


@dataclass(frozen=True)
class EmbeddedDataset:
    """
    One embedded dataset.

    Args:
        name (`str`): what `--dataset` / `load_image_dataset` call it.
        load_arrays (`Callable[[], tuple[np.ndarray, np.ndarray | None]]`): its images `(N, H, W)` or `(N, H, W, C)`
            as uint8 and their integer labels `(N,)` (None when unlabelled).
        split_of (`Callable[[int], str]`): the split of image `i` (`"train"` / `"test"`); `"all"` is both.
        label_names (`tuple[str, ...]`, *optional*): class names of the labels, in label order.
        evaluation (`str`, *optional*): `"module:attribute"` of its [`~evaluation.metrics.DatasetExtras`] (a classifier
            fitted on its train split only, and the figures it enables). A reference, not an import, so this layer
            never imports the evaluation layer; `evaluation.metrics.dataset_extras` resolves it.
    """

    name: str
    load_arrays: Callable[[], tuple[np.ndarray, np.ndarray | None]]
    split_of: Callable[[int], str]
    label_names: tuple[str, ...] = ()
    evaluation: str | None = None

    def __post_init__(self):
        if self.evaluation is not None and self.evaluation.count(":") != 1:
            raise ValueError(f"embedded dataset {self.name!r}: evaluation must be 'module:attribute', got "
                             f"{self.evaluation!r}")

    def split_indices(self, split: str, count: int) -> np.ndarray:
        """Indices `(M,)` of the `count` images that fall in `split` (`"all"`: every one)."""
        return np.array([i for i in range(count) if split == "all" or self.split_of(i) == split], dtype=np.int64)

    def load(self) -> datasets.DatasetDict:
        """Its `train` and `test` splits: columns `image` (PIL, values 0..255) and, when labelled, `label`."""
        images, labels = self.load_arrays()
        unknown = sorted({self.split_of(i) for i in range(len(images))} - {"train", "test"})
        if unknown:
            raise ValueError(f"embedded dataset {self.name!r}: split_of must give 'train' or 'test', got {unknown}")
        features = {"image": datasets.Image()}
        if labels is not None:
            if len(labels) != len(images) or not self.label_names or int(labels.max()) >= len(self.label_names):
                raise ValueError(f"embedded dataset {self.name!r}: {len(labels)} labels for {len(images)} images, "
                                 f"with values up to {int(labels.max())}, need one per image and label_names for each "
                                 f"value (got {len(self.label_names)} names)")
            features["label"] = datasets.ClassLabel(names=list(self.label_names))
        splits = {}
        for split in ("train", "test"):
            index = self.split_indices(split, len(images))
            columns = {"image": [PIL.Image.fromarray(images[i]) for i in index]}
            if labels is not None:
                columns["label"] = labels[index].tolist()
            splits[split] = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
        return datasets.DatasetDict(splits)

    def labels(self, split: str) -> np.ndarray | None:
        """The labels `(M,)` of `split` in order; None when unlabelled."""
        images, labels = self.load_arrays()
        return None if labels is None else labels[self.split_indices(split, len(images))]


EMBEDDED_DATASETS: dict[str, EmbeddedDataset] = {}
SPLITS = ("train", "test", "all")


def register_embedded_dataset(entry: EmbeddedDataset) -> EmbeddedDataset:
    """Make `entry` loadable by name (`--dataset <name>`); `ValueError` if the name is taken."""
    if entry.name in EMBEDDED_DATASETS:
        raise ValueError(f"an embedded dataset called {entry.name!r} is already registered")
    EMBEDDED_DATASETS[entry.name] = entry
    return entry


def embedded_dataset(source: object) -> EmbeddedDataset | None:
    """The entry `source` names, or None (a path, a Hub id, a Datasets object)."""
    return EMBEDDED_DATASETS.get(source) if isinstance(source, str) else None


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target


# scikit-learn's `load_digits`: 1797 grey 8x8 images of digits 0..9; `test` holds every sixth image (300), `train` the
# rest (1497).
DIGITS = register_embedded_dataset(EmbeddedDataset(
    name="digits",
    load_arrays=_digits_arrays,
    split_of=lambda index: "test" if index % 6 == 0 else "train",
    label_names=tuple(str(digit) for digit in range(10)),
    evaluation="diffusers_robust.evaluation.digits:DIGITS_EXTRAS",
))


@functools.cache
def _photo_arrays() -> tuple[np.ndarray, np.ndarray]:
    from .photos import PHOTO_SOURCES, photo_tiles

    tiles, sources = photo_tiles(32, "all")
    tiles.flags.writeable = False
    split = np.array([PHOTO_SOURCES[index].split for index in sources])
    split.flags.writeable = False
    return tiles, split


# Real photos (`data/photos.py`): RGB 32x32 tiles of seven photographs for `train` (547 tiles) and of two others for
# `test` (192 tiles: chelsea the cat, a flower), unlabelled.
PHOTOS = register_embedded_dataset(EmbeddedDataset(
    name="photos",
    load_arrays=lambda: (_photo_arrays()[0], None),
    split_of=lambda index: str(_photo_arrays()[1][index]),
))
