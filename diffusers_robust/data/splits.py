"""Where training and held-out images come from: local sources and their splits, and a seeded hold-out.

A run always scores held-out images that training never saw. [`plan_held_out`] picks them: the dataset's
`validation_split` when it has one, else separate `validation_data` when given, else a seeded share of the training
split ([`HoldOut`]), which the training data then leaves out.
"""

import glob
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

logger = logging.getLogger(__name__)

DatasetLike = datasets.Dataset | datasets.DatasetDict | datasets.IterableDataset | datasets.IterableDatasetDict
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
# File-name words that name a split, as Datasets reads them from `data_dir` (a file with none of them is "train").
SPLIT_WORDS = {"train": "train", "training": "train", "test": "test", "testing": "test", "eval": "test",
               "evaluation": "test", "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation"}
DEFAULT_VALIDATION_SPLIT = "test"


@dataclass(frozen=True)
class HoldOut:
    """A seeded share of a split set aside for validation: `part="rest"` keeps the records training uses,
    `part="held_out"` the others. The permutation depends only on `(seed, number of records)`, never the training seed."""

    share: float
    seed: int = 0
    part: str = "rest"

    def __post_init__(self):
        if not 0 < self.share < 1:
            raise ValueError(f"validation_share must be in (0, 1), got {self.share}")
        if self.part not in ("rest", "held_out"):
            raise ValueError(f"part must be 'rest' or 'held_out', got {self.part!r}")

    def other(self) -> "HoldOut":
        """The complementary part."""
        return HoldOut(self.share, self.seed, "rest" if self.part == "held_out" else "held_out")

    def held_out_count(self, count: int) -> int:
        return min(count - 1, max(1, math.ceil(self.share * count)))

    def indices(self, count: int) -> list[int]:
        """Sorted record indices of this part among `count` records."""
        if count < 2:
            raise ValueError(f"holding out a share for validation needs at least 2 images, got {count}")
        order = np.random.default_rng(self.seed).permutation(count)
        cut = self.held_out_count(count)
        return sorted(order[:cut].tolist() if self.part == "held_out" else order[cut:].tolist())

    def apply(self, dataset: datasets.Dataset | datasets.IterableDataset) -> datasets.Dataset:
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError("a streamed Hub dataset cannot hold out a share for validation: pass validation_data, name "
                             "its held-out split with validation_split, or set validation_split: null")
        return dataset.select(self.indices(len(dataset)))


@dataclass(frozen=True)
class HeldOutPlan:
    """Where the training records and the held-out records come from (`source` None: no held-out images)."""

    train_hold_out: HoldOut | None
    source: Any
    split: str | None
    hold_out: HoldOut | None
    description: str

    def summary(self) -> dict[str, Any]:
        """For `metrics.json`: what the held-out images are."""
        return {"source": describe_source(self.source), "split": self.split,
                "held_out_share": self.hold_out.share if self.hold_out else None,
                "held_out_seed": self.hold_out.seed if self.hold_out else None}


def describe_source(source: Any) -> str | None:
    """A name for a dataset source: the string itself, or the type and fingerprint of a Datasets object."""
    if source is None or isinstance(source, str):
        return source
    fingerprint = getattr(source, "_fingerprint", None)
    return f"{type(source).__name__}" + (f" {fingerprint}" if fingerprint else "")


def looks_like_path(source: str) -> bool:
    """Local unless it reads as a Hub id (`name` or `owner/name`) that is not an existing path."""
    return (source.startswith((os.sep, ".", "~")) or os.path.exists(source) or any(c in source for c in "*?")
            or source.count("/") > 1 or source.endswith("/"))


def split_of_file(path: str) -> str:
    """The split a data file belongs to by its name (`test.parquet`, `data/validation-00000.arrow`); "train" by default."""
    words = re.split(r"[^a-z0-9]+", os.path.splitext(os.path.basename(path))[0].lower())
    return next((SPLIT_WORDS[word] for word in words if word in SPLIT_WORDS), "train")


def _data_files(files: list[str], source: str) -> tuple[str, dict[str, list[str]]]:
    """The Datasets builder for `files` and the files of each split, grouped by name (never merged into training)."""
    kinds = {os.path.splitext(f)[1].lower() for f in files}
    builder = DATA_FILE_BUILDERS.get(kinds.pop()) if len(kinds) == 1 else None
    if builder is None:
        raise ValueError(f"dataset files of {source} must all be .parquet or all .arrow, got {sorted(files)[:5]}")
    grouped: dict[str, list[str]] = {}
    for file in files:
        grouped.setdefault(split_of_file(file), []).append(file)
    return builder, grouped


def is_saved_dataset(path: str) -> bool:
    """Whether `path` is a `save_to_disk` folder (a `Dataset` or a `DatasetDict`)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json"))


def load_local(source: str, cache_dir: str | None) -> datasets.DatasetDict:
    """A local source as a `DatasetDict`: a `save_to_disk` folder, a folder of parquet/arrow files, an image folder
    (train/test subfolders become splits), or parquet/arrow files or a glob (split by file name)."""
    path = os.path.expanduser(source)
    if os.path.isdir(path) and is_saved_dataset(path):
        loaded = datasets.load_from_disk(path)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    if os.path.isdir(path):
        files = [f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                 if os.path.splitext(f)[1].lower() in DATA_FILE_BUILDERS]
        if not files:
            if not any(os.path.isfile(f) and not os.path.basename(f).startswith(".")
                       for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)):
                raise ValueError(f"dataset folder {source} holds no file: put images in it (or train/ and test/ "
                                 "subfolders of images), or parquet/arrow files")
            try:
                return datasets.load_dataset("imagefolder", data_dir=path, cache_dir=cache_dir)
            except ValueError as error:  # Datasets' own words ('Instruction "train" corresponds to no data!') name nothing
                raise ValueError(f"dataset folder {source} holds no image Datasets can read ({error})") from None
    else:
        files = sorted(glob.glob(path))
        if not files:
            raise FileNotFoundError(f"dataset path {source} does not exist")
    builder, grouped = _data_files(sorted(files), source)
    return datasets.load_dataset(builder, data_files=grouped, cache_dir=cache_dir)


def select_split(loaded: DatasetLike, split: str, name: str) -> datasets.Dataset | datasets.IterableDataset:
    """`split` of a Datasets object; a single `Dataset` / `IterableDataset` is its own "train" split."""
    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
        if split != "train":
            raise ValueError(f"{name} is one split (its 'train'), got split '{split}'")
        return loaded
    if split not in loaded:
        raise ValueError(f"{name} has splits {list(loaded)}, got split '{split}': name one of them (training: "
                         "--dataset_split, held-out: --validation_split, or held-out files: --validation_data)")
    return loaded[split]


def split_names(source: Any, cache_dir: str | None = None) -> list[str] | None:
    """The splits `source` has; None when it cannot be told without loading it (a Hub dataset offline)."""
    from .embedded import SPLITS, embedded_dataset

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return ["train"]
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return list(source)
    if embedded_dataset(source) is not None:
        return list(SPLITS)
    if looks_like_path(source):
        return list(load_local(source, cache_dir))
    try:
        return datasets.get_dataset_split_names(source)
    except Exception:  # noqa: BLE001 - offline or private: the load itself reports what is wrong
        return None


def plan_held_out(
    source: Any,
    split: str = "train",
    validation_split: str | None = DEFAULT_VALIDATION_SPLIT,
    validation_data: Any = None,
    share: float = 0.1,
    seed: int = 0,
    cache_dir: str | None = None,
) -> HeldOutPlan:
    """
    Decide which images are held out for validation and the report.

    Args:
        source: the training dataset (a name, path, Hub id or Datasets object); `split` its training split.
        validation_split (`str`, *optional*): the held-out split of `source` (or of `validation_data`); None: no held-out
            images. The default `"test"` falls back to a hold-out when `source` has no such split; another missing name
            is an error.
        validation_data (*optional*): held-out images from elsewhere (files, folder, Hub id or Datasets object): its
            `validation_split` if it has one, else its only split.
        share, seed: the [`HoldOut`] of `split` when neither gives held-out images.
    """
    if validation_split is None and validation_data is None:
        return HeldOutPlan(None, None, None, None, "no held-out images (validation_split: null)")
    if validation_data is not None:
        names = split_names(validation_data, cache_dir) or [validation_split or DEFAULT_VALIDATION_SPLIT]
        chosen = validation_split if validation_split in names else names[0] if len(names) == 1 else None
        if chosen is None:
            raise ValueError(f"validation_data {describe_source(validation_data)} has splits {names}: name the held-out "
                             "one with validation_split")
        return HeldOutPlan(None, validation_data, chosen, None,
                           f"held-out images: {describe_source(validation_data)} split '{chosen}'")
    names = split_names(source, cache_dir)
    if names is None or validation_split in names:
        return HeldOutPlan(None, source, validation_split, None, f"held-out images: split '{validation_split}'")
    if validation_split != DEFAULT_VALIDATION_SPLIT:
        raise ValueError(f"{describe_source(source)} has splits {names}, got validation_split '{validation_split}': name one "
                         "of them, pass held-out files with validation_data, or set validation_split: null")
    hold_out = HoldOut(share, seed, "held_out")
    return HeldOutPlan(HoldOut(share, seed, "rest"), source, split, hold_out,
                       f"{describe_source(source)} has no '{validation_split}' split: holding out {share:.0%} of split "
                       f"'{split}' (seed {seed}) for validation and the report; training never sees them")
