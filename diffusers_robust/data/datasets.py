"""Image datasets for training: HF Datasets loading and streaming, decoding, augmentation, bad records.

[`load_image_dataset`] turns a dataset name, a local image folder, or parquet/arrow files into a Datasets
object whose records are `{"pixel_values": (C, H, W) float32 in [-1, 1], "augment_labels": (L,) float32,
"record_id": str, "valid": bool}`. Records that cannot be decoded come out with `valid=False` and are
dropped and reported by [`collate_image_batch`], so a bad file never stops a run.
"""

import io
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch
from datasets.distributed import split_dataset_by_node

from .annotations import (
    ANNOTATION_COLUMNS,
    MASK_COLUMN,
    AnnotationSummary,
    attach_annotations,
    check_annotation,
    decode_mask,
    estimated_noise_levels,
    find_sidecar,
    summarise,
)
from .augment import AugmentPipeline
from .embedded import DIGITS, embedded_dataset
from .embedded import SPLITS as EMBEDDED_SPLITS
from .splits import DatasetLike, HoldOut, describe_source, load_local, looks_like_path, select_split
from .units import to_model_range

logger = logging.getLogger(__name__)

_INDEX_COLUMN = "__record_index__"
# What a decoded record holds (see `load_image_dataset`).
RECORD_KEYS = ("pixel_values", "augment_labels", "record_id", "valid", "noise_sigma", "sigma_max", "observed")
# Records per `.map` call on a stream. A stream resumed from `state_dict()` re-runs the map batch it stopped
# in, so this bounds the records decoded twice after a resume.
STREAM_MAP_BATCH_SIZE = 16


def load_digits_dataset() -> datasets.DatasetDict:
    """scikit-learn's `load_digits` (1797 grey 8x8 images of digits 0..9) as a `DatasetDict`: the embedded `digits`
    entry ([`~data.embedded.DIGITS`]). Splits: `test` holds every sixth image (300), `train` the rest (1497). Columns:
    `image` (PIL "L", values 0..255) and `label` (`ClassLabel` 0..9).
    """
    return DIGITS.load()


def _load_source(
    source: Any, split: str, streaming_from_hub: bool, cache_dir: str | None
) -> datasets.Dataset | datasets.IterableDataset:
    """Load `source` as a map-style dataset (local sources, Datasets objects as given) or a stream (Hub with
    `streaming=True`)."""
    if not isinstance(source, str):
        return select_split(source, split, describe_source(source))
    entry = embedded_dataset(source)
    if entry is not None:
        if split not in EMBEDDED_SPLITS:
            raise ValueError(f"dataset {entry.name!r} has splits {list(EMBEDDED_SPLITS)}, got '{split}'")
        splits = entry.load()
        return datasets.concatenate_datasets([splits["train"], splits["test"]]) if split == "all" else splits[split]
    if looks_like_path(source):
        return select_split(load_local(source, cache_dir), split, source)
    try:
        return datasets.load_dataset(source, split=split, streaming=streaming_from_hub, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise FileNotFoundError(f"dataset {source!r} is no local folder or file here, and the Hub could not give it "
                                f"({str(error).splitlines()[0]})") from error


def detect_image_column(features: datasets.Features | None, image_column: str | None = None) -> str:
    """Return `image_column` if it exists, else the first `datasets.Image` feature; raise naming the columns."""
    if features is None:
        raise ValueError("the dataset does not declare its features; pass image_column")
    if image_column is not None:
        if image_column not in features:
            raise ValueError(f"image_column '{image_column}' is not a column; columns: {list(features)}")
        return image_column
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name, feature in features.items():
        if isinstance(feature, (datasets.Array2D, datasets.Array3D)):
            return name
    raise ValueError(f"no image column found (no datasets.Image, Array2D or Array3D feature); columns: {list(features)}")


def is_array_column(features: datasets.Features, column: str) -> bool:
    """Whether `column` holds float arrays (`Array2D` `(H, W)` / `Array3D` `(H, W, C)`, `[0, 1]` units, unclipped)
    rather than encoded images."""
    return isinstance(features[column], (datasets.Array2D, datasets.Array3D))


def to_mode(image: PIL.Image.Image, channels: int) -> PIL.Image.Image:
    """Convert any Pillow image to "L" (channels=1) or "RGB" (channels=3).

    16- and 32-bit grey images are rescaled to 8 bits by their dtype range; images with transparency are
    composited onto white.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image).astype(np.float64)
        if not np.isfinite(array).all():  # NaN would become 0 (black) below, silently
            raise ValueError(f"{image.mode} image holds NaN or infinite values")
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F":
            top = max(1.0, float(array.max()))
        image = PIL.Image.fromarray(np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def resize_and_crop(
    image: PIL.Image.Image, resolution: int, center_crop: bool = True, rng: np.random.Generator | None = None
) -> PIL.Image.Image:
    """Resize the shorter side to `resolution` (bicubic; box filter when shrinking) and crop a square."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        resample = PIL.Image.BOX if scale < 1 else PIL.Image.BICUBIC
        image = image.resize(size, resample=resample)
    left_max, top_max = size[0] - resolution, size[1] - resolution
    if center_crop or rng is None:
        left, top = left_max // 2, top_max // 2
    else:
        left, top = int(rng.integers(0, left_max + 1)), int(rng.integers(0, top_max + 1))
    return image.crop((left, top, left + resolution, top + resolution))


class AugmentRecipeError(ValueError):
    """The augment recipe failed on a decoded image: a bug of the recipe (say an RGB-only transform on grey images),
    which would fail on every record, so it stops the run instead of counting each record as bad."""


def _stable_message(error: Exception) -> str:
    """The error text without object addresses (Pillow names in-memory files `<_io.BytesIO object at 0x...>`), so a bad
    record has the same id every epoch and is counted once."""
    return re.sub(r"<[\w.]+ object at 0x[0-9a-fA-F]+>", "in-memory bytes", str(error))


def decode_image(value: Any) -> PIL.Image.Image:
    """Decode a Datasets image value (`{"bytes", "path"}`, a PIL image, or a path) and fail loudly if broken."""
    if isinstance(value, PIL.Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes"):
        image = PIL.Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = PIL.Image.open(value["path"])
    elif isinstance(value, str):
        image = PIL.Image.open(value)
    else:
        raise ValueError("empty image record")
    image.load()
    if image.width == 0 or image.height == 0:
        raise ValueError(f"zero-size image {image.size}")
    return image


@dataclass
class ImageRecordTransform:
    r"""
    Decode, convert, resize/crop and augment a batch of records. Deterministic: the randomness of each
    record depends only on `(seed, epoch, record index)`, so results do not depend on DataLoader workers,
    and a resumed run sees the same augmentations as an uninterrupted one.

    Args:
        image_column (`str`): column holding the image.
        channels (`int`): 1 or 3.
        resolution (`int`): output side in pixels.
        center_crop (`bool`): center crop if True, else a random crop.
        augment ([`AugmentPipeline`], *optional*): Albumentations recipe and its labels.
        seed (`int`): base seed.
        name (`str`): dataset name used in record ids when a record has no file path.
    """

    image_column: str
    channels: int = 3
    resolution: int = 32
    center_crop: bool = True
    augment: AugmentPipeline | None = None
    seed: int = 0
    name: str = "dataset"
    epoch: int = 0
    array_images: bool = False  # float arrays in [0, 1] units (kept unclipped) instead of encoded images
    label_dim: int = field(init=False)
    records_decoded: int = field(init=False, default=0)  # counted in this process (not in DataLoader workers)

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        self.label_dim = self.augment.label_dim if self.augment is not None else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def record(self, value: Any, index: int, annotation: dict[str, float] | None = None) -> dict[str, Any]:
        path = value.get("path") if isinstance(value, dict) else None
        record_id = path or f"{self.name}[{index}]"
        rng = np.random.default_rng([self.seed, self.epoch, index])
        annotation = {key: value for key, value in (annotation or {}).items() if value is not None}
        mask = annotation.pop(MASK_COLUMN, None)
        noise_sigma, sigma_min = annotation.get("noise_sigma", 0.0), annotation.get("sigma_min", 0.0)
        self.records_decoded += 1
        try:  # the record's own content: anything wrong with it makes a bad record, skipped and counted
            check_annotation(record_id, noise_sigma, sigma_min, annotation.get("sigma_max", math.inf))  # Hub streams
            if self.array_images:
                pixels, array = self.float_pixels(value), None
            else:
                image = resize_and_crop(to_mode(decode_image(value), self.channels), self.resolution, self.center_crop, rng)
                array = np.asarray(image, dtype=np.uint8)
                array = array[..., None] if array.ndim == 2 else array
        except Exception as error:  # noqa: BLE001 - any decoding failure makes a bad record, reported by id
            return self._bad_record(record_id, error)
        labels = np.zeros(self.label_dim, dtype=np.float32)
        if array is not None:
            if self.augment is not None:  # a failure here is the recipe's, not the record's: it stops the run
                self.augment.set_random_seed(int(rng.integers(2**31)))
                try:
                    array, labels = self.augment(array)
                except Exception as error:  # noqa: BLE001 - named and re-raised
                    raise AugmentRecipeError(f"the augment recipe fails on {record_id} ({self.channels}-channel "
                                             f"images): {type(error).__name__}: {_stable_message(error)}") from error
                array = array[..., None] if array.ndim == 2 else array
            pixels = (array.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)
        try:
            if sigma_min > noise_sigma:  # one fixed draw per record (never per epoch), so its noise is not averaged away
                fixed = np.random.default_rng([self.seed, index, 0x5EED]).standard_normal(pixels.shape, dtype=np.float32)
                pixels = pixels + np.float32(2 * (sigma_min**2 - noise_sigma**2) ** 0.5) * fixed
            observed = np.ones((1, *pixels.shape[1:]), dtype=np.float32)
            if mask is not None:
                observed[0] = decode_mask(mask, record_id, pixels.shape[1:])
                pixels = pixels * observed  # a missing pixel holds no value (0, mid-grey)
        except Exception as error:  # noqa: BLE001 - a bad mask makes a bad record
            return self._bad_record(record_id, error)
        return {"pixel_values": pixels, "augment_labels": labels, "record_id": record_id, "valid": True,
                "noise_sigma": max(noise_sigma, sigma_min), "sigma_max": annotation.get("sigma_max", math.inf),
                "observed": observed}

    def _bad_record(self, record_id: str, error: Exception) -> dict[str, Any]:
        """The placeholder of a record that could not be used: invalid, its id naming the error."""
        return {
            "pixel_values": np.zeros((self.channels, self.resolution, self.resolution), dtype=np.float32),
            "augment_labels": np.zeros(self.label_dim, dtype=np.float32),
            "record_id": f"{record_id} ({type(error).__name__}: {_stable_message(error)})", "valid": False,
            "noise_sigma": 0.0, "sigma_max": math.inf,
            "observed": np.ones((1, self.resolution, self.resolution), dtype=np.float32),
        }

    def float_pixels(self, value: Any) -> np.ndarray:
        """A float array record (`(H, W)` or `(H, W, C)`, `[0, 1]` units) as `(C, H, W)` in model units, unclipped."""
        array = np.asarray(value, dtype=np.float32)
        array = array[..., None] if array.ndim == 2 else array
        expected = (self.resolution, self.resolution, self.channels)
        if array.shape != expected:
            raise ValueError(f"float image of shape {array.shape}, expected (H, W, C) = {expected} (arrays are not resized)")
        if not np.isfinite(array).all():
            raise ValueError("float image holds NaN or infinite values")
        return to_model_range(array).transpose(2, 0, 1)

    def __call__(self, batch: dict[str, list], indices: Sequence[int] | None = None) -> dict[str, list]:
        indices = batch[_INDEX_COLUMN] if indices is None else indices
        present = [c for c in (*ANNOTATION_COLUMNS, MASK_COLUMN) if c in batch]
        annotations = [{c: batch[c][row] for c in present} for row in range(len(indices))]
        records = [self.record(value, int(i), annotation)
                   for value, i, annotation in zip(batch[self.image_column], indices, annotations, strict=True)]
        return {key: [r[key] for r in records] for key in RECORD_KEYS}


@dataclass
class ImageDataset:
    """What [`load_image_dataset`] returns: the Datasets object and the transform that feeds it."""

    dataset: datasets.Dataset | datasets.IterableDataset
    transform: ImageRecordTransform
    image_column: str
    streaming: bool
    annotations: dict[str, list[float]] | None = None  # annotation columns over all records (before sharding)
    observed_shares: list[float] | None = None  # records with a mask column: the share of observed pixels of each
    source_shape: tuple[int, int, int] | None = None  # (channels, height, width) most images are stored at
    stored_shapes: dict | None = None  # every stored shape -> (records, first record's name); see `stored_shapes`

    def annotation_summary(self, max_weight: float) -> AnnotationSummary | None:
        """What the records' annotations say ([`~data.annotations.summarise`]); None when no record is annotated."""
        return summarise(self.annotations, max_weight) if self.annotations is not None else None

    @property
    def masked(self) -> bool:
        """Whether records carry masks of observed pixels (missing-pixel training)."""
        return self.observed_shares is not None

    @property
    def label_dim(self) -> int:
        return self.transform.label_dim

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream (and the shuffle order of a stream) for a new epoch."""
        self.transform.set_epoch(epoch)
        if self.streaming:
            self.dataset.set_epoch(epoch)


def load_image_dataset(
    source: "str | DatasetLike" = "digits",
    split: str = "train",
    *,
    hold_out: HoldOut | None = None,
    streaming: bool = False,
    image_column: str | None = None,
    channels: int = 3,
    resolution: int = 32,
    center_crop: bool = True,
    augment: AugmentPipeline | str | os.PathLike | None = None,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    num_shards: int = 8,
    rank: int = 0,
    world_size: int = 1,
    cache_dir: str | None = None,
    annotations: str | None = None,
    noise_sigma: float | None = None,
    annotations_required: bool = False,
) -> ImageDataset:
    r"""
    Load images for training or evaluation.

    Args:
        source (`str` or a Datasets object, defaults to `"digits"`):
            `"digits"` (embedded, scikit-learn), a local image folder (with `train/` and `test/` subfolders as splits),
            parquet/arrow file(s), a folder of them or a glob (`test.parquet` is split "test", never merged into
            "train"), a `save_to_disk` folder, a Hub dataset name, or a `datasets.Dataset` / `DatasetDict` /
            `IterableDataset` object (a single dataset is split "train").
        split (`str`): split to load (`"train"`, `"test"`, ...; `"all"` for digits).
        hold_out ([`~data.splits.HoldOut`], *optional*): keep only this part of the split (the rest of a seeded
            hold-out, or the held-out share).
        streaming (`bool`):
            Return a `datasets.IterableDataset`. Local sources are resharded into `num_shards` shards so
            DataLoader workers can share them; Hub datasets are streamed with `load_dataset(streaming=True)`.
            Streams are shuffled with a buffer of `shuffle_buffer` records and split by rank.
        image_column (`str`, *optional*): image column; detected (first `datasets.Image` feature) if omitted.
        channels (`int`): 1 (grey) or 3 (RGB); RGBA, palette, 16-bit and grey inputs are converted.
        resolution (`int`): output side; the shorter side is resized to it, then center or random crop.
        augment ([`AugmentPipeline`] or recipe path, *optional*): Albumentations recipe.
        seed (`int`): seeds the shuffle, random crops and augmentation.
        rank, world_size (`int`): this process's rank and the number of processes; a stream is split with
            `datasets.distributed.split_dataset_by_node`. Map-style datasets are sharded by the DataLoader.
        annotations (`str`, *optional*): quality annotations ([`~data.annotations`]): `None` reads the dataset's
            `noise_sigma` / `sigma_min` / `sigma_max` / `mask` columns or a sidecar `annotations.csv` / `.json` in the
            image folder, if any; a path names a sidecar; `"auto"` estimates a noise std per image; `"ignore"` ignores
            them (masked records are then trained as they are, missing pixels as mid-grey).
        noise_sigma (`float`, *optional*): one noise std (`[0, 1]` units) for every record.
        annotations_required (`bool`): refuse records that no source annotates.

    An image column may also hold float arrays (`datasets.Array2D` `(H, W)` or `Array3D` `(H, W, C)` in `[0, 1]`
    units, at the training resolution): they are kept unclipped, as scientific data and simulated noise need.

    Returns:
        [`ImageDataset`]: `.dataset` yields records `{"pixel_values": (C, H, W) float32 in [-1, 1],
        "augment_labels": (L,), "record_id": str, "valid": bool, "noise_sigma": float, "sigma_max": float, "observed":
        (1, H, W) float32}` (the noise std the record carries, its fixed `sigma_min` noise included, its upper usable
        level, `[0, 1]` units, and its observed pixels: 1 = observed; missing pixels are 0 in `pixel_values`); batch
        them with [`collate_image_batch`]. Masks are checked (shape, at least one observed pixel) before this returns,
        except on a streamed Hub dataset, which cannot carry them.

    Example:

    ```py
    >>> from torch.utils.data import DataLoader
    >>> from diffusers_robust.data.datasets import collate_image_batch, load_image_dataset
    >>> loaded = load_image_dataset("digits", channels=1, resolution=16)
    >>> batch = next(iter(DataLoader(loaded.dataset, batch_size=8, collate_fn=collate_image_batch)))
    >>> batch["pixel_values"].shape
    torch.Size([8, 1, 16, 16])
    ```
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if isinstance(augment, (str, os.PathLike)):
        augment = AugmentPipeline.from_file(augment, seed=seed)
    local = not isinstance(source, str) or embedded_dataset(source) is not None or looks_like_path(source)
    dataset = _load_source(source, split, streaming and not local, cache_dir)
    from_hub_stream = isinstance(dataset, datasets.IterableDataset)  # a Hub stream, or a stream passed from Python
    column = detect_image_column(dataset.features, image_column)
    arrays = is_array_column(dataset.features, column)
    if arrays and augment is not None:
        raise ValueError(f"column '{column}' holds float arrays, which augmentation recipes do not take; set augment: null")
    if not arrays:
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    split_name = (os.path.basename(os.path.normpath(source)) if isinstance(source, str) else type(source).__name__) \
        + f"/{split}"
    name = split_name + (f" ({hold_out.part.replace('_', '-')})" if hold_out is not None else "")
    transform = ImageRecordTransform(column, channels, resolution, center_crop, augment, seed, name, array_images=arrays)
    # Annotated as a whole split, then held out: a folder's sidecar (`annotate`'s) names the records of both parts.
    dataset, keep, annotation_columns = _with_annotations(dataset, source, column, split_name, transform,
                                                          from_hub_stream, annotations, noise_sigma, annotations_required)
    dataset, annotation_columns = _held_out_part(dataset, hold_out, annotation_columns)
    shapes = None if from_hub_stream else stored_shapes(dataset, column, arrays, name)
    source_shape = most_common_shape(shapes) if shapes is not None else None
    observed_shares = None
    if MASK_COLUMN in keep and not from_hub_stream:
        observed_shares = check_masks(dataset[MASK_COLUMN], name, resolution)
    if from_hub_stream:
        dataset = dataset.select_columns(keep)
    else:
        dataset = dataset.select_columns(keep).add_column(_INDEX_COLUMN, list(range(len(dataset))))
        if not streaming:
            dataset.set_transform(transform)
            return ImageDataset(dataset, transform, column, streaming=False, annotations=annotation_columns,
                                observed_shares=observed_shares, source_shape=source_shape, stored_shapes=shapes)
        dataset = dataset.to_iterable_dataset(num_shards=min(num_shards, len(dataset)))
    dataset = _decoded_stream(dataset, transform, keep, from_hub_stream, seed, shuffle_buffer, rank, world_size)
    return ImageDataset(dataset, transform, column, streaming=True, annotations=annotation_columns,
                        observed_shares=observed_shares, source_shape=source_shape, stored_shapes=shapes)


def _held_out_part(dataset, hold_out: HoldOut | None, annotation_columns: dict | None) -> tuple[Any, dict | None]:
    """`hold_out`'s part of the (annotated) split, with its annotation columns; everything when there is no hold-out."""
    if hold_out is None:
        return dataset, annotation_columns
    dataset = hold_out.apply(dataset)
    return dataset, None if annotation_columns is None else {c: dataset[c] for c in annotation_columns}


def _with_annotations(dataset, source: Any, column: str, name: str, transform: "ImageRecordTransform",
                      from_hub_stream: bool, annotations: str | None, noise_sigma: float | None,
                      annotations_required: bool) -> tuple[Any, list[str], dict | None]:
    """`(dataset, columns to keep, annotation columns or None)`: the records with their quality annotations attached
    when any are wanted (the dataset's columns, a sidecar, `auto` estimates, one `noise_sigma`); see
    [`load_image_dataset`]. A Hub stream keeps its own columns and refuses sidecars, estimates and masks."""
    present = [c for c in (*ANNOTATION_COLUMNS, MASK_COLUMN) if c in (dataset.features or {})]
    keep = [column, *present]
    sidecar = (find_sidecar(os.path.expanduser(source)) if isinstance(source, str) else None) if annotations is None \
        else annotations
    sidecar = None if sidecar in ("ignore", "auto") else sidecar
    wanted = annotations != "ignore" and (present or sidecar or annotations == "auto" or noise_sigma is not None
                                        or annotations_required)
    if wanted and from_hub_stream:
        if MASK_COLUMN in present:
            raise ValueError(f"a streamed Hub dataset cannot carry '{MASK_COLUMN}' columns (each mask must be checked "
                             "before training): load it without streaming")
        if sidecar or annotations == "auto":
            raise ValueError("a streamed Hub dataset carries annotations only as its own columns (noise_sigma, sigma_min, "
                             "sigma_max): write them into the dataset, or load it without streaming")
        return dataset, keep, None  # its columns go through the transform as they are
    if not wanted:
        return dataset, [column] if annotations == "ignore" else keep, None
    if sidecar is not None:
        logger.info(f"annotations of {name} from {sidecar}")
    estimate = _noise_estimator(transform) if annotations == "auto" else None
    root = os.path.expanduser(source) if isinstance(source, str) and os.path.isdir(os.path.expanduser(source)) else None
    dataset = attach_annotations(dataset.select_columns(keep), column, name, sidecar, noise_sigma, estimate,
                                 annotations_required, root)
    keep = [column, *ANNOTATION_COLUMNS, *([MASK_COLUMN] if MASK_COLUMN in dataset.column_names else [])]
    return dataset, keep, {c: dataset[c] for c in ANNOTATION_COLUMNS}


def _decoded_stream(dataset, transform: "ImageRecordTransform", keep: list[str], from_hub_stream: bool, seed: int,
                    shuffle_buffer: int, rank: int, world_size: int):
    """A stream's records shuffled (`shuffle_buffer`), split by rank, and decoded by `transform` in map batches."""
    dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
    if world_size > 1:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    if from_hub_stream:
        return dataset.map(lambda batch, idx: transform(batch, idx), with_indices=True, batched=True,
                           batch_size=STREAM_MAP_BATCH_SIZE, remove_columns=keep)
    return dataset.map(transform, batched=True, batch_size=STREAM_MAP_BATCH_SIZE, remove_columns=[*keep, _INDEX_COLUMN])


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


# Records whose stored shape `load_image_dataset` reads (image headers only, no pixels) to judge a dataset's channels
# and size: every record up to this many.
SHAPE_SURVEY_RECORDS = 20_000


def stored_shapes(dataset: datasets.Dataset, column: str, arrays: bool, name: str,
                  limit: int = SHAPE_SURVEY_RECORDS) -> dict[tuple[int, int, int], tuple[int, str]]:
    """`(channels, height, width)` as stored (1 channel for grey modes, 3 for colour ones; a float array's own shape) ->
    `(how many records, the first one's name)`, over the first `limit` records, from image headers (no pixels are
    decoded); records that do not open are left out (the transform counts them later)."""
    shapes: dict[tuple[int, int, int], tuple[int, str]] = {}
    for index in range(min(limit, len(dataset))):
        value = dataset[index][column]
        try:
            shape = _stored_shape(value, arrays)
        except Exception:  # noqa: BLE001 - a bad record is counted later, by the transform
            continue
        count, first = shapes.get(shape, (0, None))
        path = value.get("path") if isinstance(value, dict) else None
        shapes[shape] = (count + 1, first or (os.path.basename(path) if path else f"{name}[{index}]"))
    return shapes


def _stored_shape(value: Any, arrays: bool) -> tuple[int, int, int]:
    if arrays:
        array = np.asarray(value)
        return (1 if array.ndim == 2 else array.shape[2], array.shape[0], array.shape[1])
    source = io.BytesIO(value["bytes"]) if isinstance(value, dict) and value.get("bytes") else \
        value.get("path") if isinstance(value, dict) else value
    with PIL.Image.open(source) as image:  # reads the header only
        return (1 if image.mode in GREY_MODES else 3, image.height, image.width)


def most_common_shape(shapes: dict[tuple[int, int, int], tuple[int, str]]) -> tuple[int, int, int] | None:
    return max(shapes, key=lambda shape: shapes[shape][0]) if shapes else None


def check_masks(masks: Sequence[Any], name: str, resolution: int) -> list[float]:
    """Decode every record's mask ([`~data.annotations.decode_mask`]: `ValueError` naming the first bad one) and return
    the share of observed pixels of each (1.0 for a record without a mask)."""
    shares = []
    for index, value in enumerate(masks):
        observed = None if value is None else decode_mask(value, f"{name}[{index}]", (resolution, resolution))
        shares.append(1.0 if observed is None else float(observed.mean()))
    return shares


def _noise_estimator(transform: ImageRecordTransform):
    """`dataset -> [noise std per record]` ([`~data.annotations.estimated_noise_levels`] of each decoded image: 0 when
    it reads clean or does not decode)."""

    def estimate(dataset: datasets.Dataset) -> list[float]:
        values = []
        for start in range(0, len(dataset), 256):
            rows = dataset[start:start + 256][transform.image_column]
            records = [transform.record(value, start + i) for i, value in enumerate(rows)]
            pixels = torch.from_numpy(np.stack([r["pixel_values"] for r in records]))
            sigmas = estimated_noise_levels(pixels).tolist()
            values += [s if r["valid"] else 0.0 for s, r in zip(sigmas, records, strict=True)]
        return values

    return estimate


def require_decodable(loaded: "ImageDataset", source: str) -> None:
    """Raise `ValueError` naming `source` unless at least one record of `loaded` decodes (checked before training, so a
    folder of broken files fails at once instead of training on nothing). Stops at the first good record."""
    for record in loaded.dataset:
        if record["valid"]:
            return
    raise ValueError(f"{source} holds no decodable image")


def collate_image_batch(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack valid records into `pixel_values` `(B, C, H, W)`, `augment_labels` `(B, L)`, and their annotations
    `noise_sigmas` and `sigma_max` `(B,)` (float64, `[0, 1]` units) and `observed` `(B, 1, H, W)` (1 = observed); list
    the ids of the invalid ones under `skipped` (reported by [`SkippedRecords`])."""
    valid = [r for r in records if r["valid"]]
    channels_shape = np.shape(records[0]["pixel_values"]) if records else (0, 0, 0)
    if valid:
        pixels = torch.from_numpy(np.stack([np.asarray(r["pixel_values"], dtype=np.float32) for r in valid]))
        labels = torch.from_numpy(np.stack([np.asarray(r["augment_labels"], dtype=np.float32) for r in valid]))
    else:
        pixels = torch.zeros((0, *channels_shape))
        labels = torch.zeros((0, len(records[0]["augment_labels"]) if records else 0))
    return {
        "pixel_values": pixels,
        "augment_labels": labels,
        "noise_sigmas": torch.tensor([float(r.get("noise_sigma", 0.0)) for r in valid], dtype=torch.float64),
        "sigma_max": torch.tensor([float(r.get("sigma_max", math.inf)) for r in valid], dtype=torch.float64),
        "observed": (torch.from_numpy(np.stack([np.asarray(r["observed"], dtype=np.float32) for r in valid])) if valid
                     else torch.zeros((0, 1, *channels_shape[1:]))),
        "record_ids": [r["record_id"] for r in valid],
        "skipped": [r["record_id"] for r in records if not r["valid"]],
    }


class SkippedRecords:
    """Counts bad records seen in batches and warns once per record id."""

    def __init__(self):
        self.ids: list[str] = []

    def update(self, batch: dict[str, Any]) -> int:
        for record_id in batch.get("skipped", []):
            if record_id not in self.ids:
                logger.warning("skipped a bad record: %s", record_id)
                self.ids.append(record_id)
        return len(batch.get("skipped", []))

    @property
    def count(self) -> int:
        return len(self.ids)
