"""Quality annotations of training records: how far each image can be trusted (learning from imperfect data).

A record may carry `noise_sigma` (the std of Gaussian noise already in the image), `sigma_min` (usable only where the
diffusion noise level is above it: a blurred or JPEG-damaged image whose defects drown in enough noise) and `sigma_max`
(usable only below it). All three are stds in `[0, 1]` image units, like `noise_sigma` of the pipeline's restoration.
A record may also carry a `mask` of its observed pixels (`(H, W)`, nonzero or white = observed; the other pixels are
missing). A record without annotation is clean: `noise_sigma = sigma_min = 0`, `sigma_max = inf`, every pixel observed.

Sources, in order of precedence: one value for every record (`noise_sigma=` of the training config), a sidecar file
(CSV or JSON, keyed by the image's path relative to the folder, its file name where no other record's file has it, or
its record id; one sidecar per folder, each record named once), columns of the dataset, or `"auto"` (estimated per image by
[`estimate_noise_std`]). [`attach_annotations`] turns any of them into dataset columns, so they travel with map-style
and streamed datasets, are sharded with them and resume with the stream's position.
"""

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch

from .units import to_unit_range

ANNOTATION_COLUMNS = ("noise_sigma", "sigma_min", "sigma_max")
MASK_COLUMN = "mask"  # observed pixels: an array or image column, or in a sidecar the mask image's file name
DEFAULTS = {"noise_sigma": 0.0, "sigma_min": 0.0, "sigma_max": math.inf}
SIDECAR_NAMES = ("annotations.csv", "annotations.json")
SIDECAR_KEYS = ("file_name", "record_id")


def check_annotation(record: str, noise_sigma: float, sigma_min: float, sigma_max: float) -> None:
    """Raise `ValueError` naming `record` unless its levels are finite stds >= 0 (`sigma_max` may be inf) and
    `sigma_max > max(noise_sigma, sigma_min)` (else no noise level could use the record)."""
    for name, value in (("noise_sigma", noise_sigma), ("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if value is None or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
            raise ValueError(f"{record}: {name} must be a number >= 0 ([0, 1] image units), got {value!r}")
        if name != "sigma_max" and math.isinf(value):
            raise ValueError(f"{record}: {name} must be finite, got {value!r}")
    if sigma_max <= max(noise_sigma, sigma_min):
        raise ValueError(f"{record}: sigma_max {sigma_max} must exceed noise_sigma {noise_sigma} and sigma_min {sigma_min}, "
                         "else no noise level can use the record")


def lowest_usable_sigma(noise_sigma: float, sigma_min: float, max_weight: float) -> float:
    """The lowest diffusion noise level (`[0, 1]` units) at which a record can train: above `sigma_min`, and where the
    noisy-data target's scale `k^2 = sigma_t^2 / (sigma_t^2 - s^2)` stays <= `max_weight` for `s = max(noise_sigma,
    sigma_min)` (the std the record carries once its fixed noise is added)."""
    carried = max(noise_sigma, sigma_min)
    return carried * math.sqrt(max_weight / (max_weight - 1.0)) if carried > 0 else 0.0


def read_sidecar(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """`{key: {column: value}}` from a CSV (a `file_name` or `record_id` column, then any of `noise_sigma`,
    `sigma_min`, `sigma_max` and `mask`, the file name of a mask image relative to the sidecar) or a JSON object
    `{key: {column: value}}` (numbers, and a string for `mask`); `ValueError` naming the file and the row otherwise: an
    unknown column, a key given twice, a row with more fields than the header, a value that is not a number (JSON
    `true` is not 1.0)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path} does not exist")
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as handle:
            table = json.load(handle, object_pairs_hook=_refuse_duplicate_keys(path))
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise ValueError(f"{path}: expected a JSON object {{file name or record id: {{noise_sigma: ...}}}}")
        for key, values in table.items():
            wrong = {k: v for k, v in values.items() if not _json_value_ok(k, v)}
            if wrong:
                raise ValueError(f"{path}: {key}: annotations must be numbers (mask: a file name), got {wrong}")
        rows = {str(key): values for key, values in table.items()}
    elif path.endswith(".csv"):
        rows = _read_csv_sidecar(path)
    else:
        raise ValueError(f"annotation file {path} must be .csv or .json")
    for key, values in rows.items():
        unknown = sorted(set(values) - {*ANNOTATION_COLUMNS, MASK_COLUMN})
        if unknown:
            raise ValueError(f"{path}: {key}: unknown annotation(s) {unknown}; known: {[*ANNOTATION_COLUMNS, MASK_COLUMN]}")
        try:
            rows[key] = {k: (str(v) if k == MASK_COLUMN else float(v)) for k, v in values.items()}
        except (TypeError, ValueError):
            raise ValueError(f"{path}: {key}: annotations must be numbers, got {values}") from None
    return rows


def _json_value_ok(column: str, value: Any) -> bool:
    """A mask is a file name; every other annotation a number (not a bool: `true` is no noise level)."""
    if column == MASK_COLUMN:
        return isinstance(value, str)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_csv_sidecar(path: str) -> dict[str, dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        key = next((k for k in SIDECAR_KEYS if k in fields), None)
        if key is None:
            raise ValueError(f"{path}: the first row must name a key column ({' or '.join(SIDECAR_KEYS)}), got {fields}")
        rows: dict[str, dict[str, str]] = {}
        for row in reader:
            if None in row:
                raise ValueError(f"{path}: line {reader.line_num} has more fields than the header {fields}")
            if row[key] in rows:
                raise ValueError(f"{path}: {row[key]!r} is annotated twice (line {reader.line_num}); keep one row")
            rows[row[key]] = {k: v for k, v in row.items() if k != key and v not in ("", None)}
    return rows


def _refuse_duplicate_keys(path: str):
    def pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        twice = sorted({key for key in keys if keys.count(key) > 1})
        if twice:
            raise ValueError(f"{path}: {twice} annotated twice; keep one entry each")
        return dict(pairs)

    return pairs_to_dict


def write_sidecar(path: str | os.PathLike, rows: dict[str, dict[str, float]], key: str = "file_name") -> None:
    """Write `{key: {column: value}}` as a CSV sidecar (written to a temporary file, then renamed: never half-written)."""
    columns = [c for c in (*ANNOTATION_COLUMNS, MASK_COLUMN) if any(c in values for values in rows.values())]
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([key, *columns])
        for name, values in rows.items():
            writer.writerow([name, *(_cell(values[c]) if c in values else "" for c in columns)])
    os.replace(temporary, path)


def _cell(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.6g}"


# `estimate_noise_std` readings below this are texture and 8-bit rounding, not noise: `annotate` and `--annotations auto`
# call such an image clean. Measured on 8-bit images (tests/test_photos.py re-measures it): clean photos (train split
# of `photos`) read below it on 91% (held-out photos 98%); under Gaussian noise of std 0.05 / 0.1 on 3% / 0%; clean
# digits on 76% (their edges read high), digits under noise of std 0.1 on 7%; noise of std 0.02 mostly reads below.
CLEAN_READING = 0.027


def estimated_noise_levels(images: torch.Tensor) -> torch.Tensor:
    """The noise std `(B,)` (`[0, 1]` units) that `annotate` and `--annotations auto` record: the
    [`estimate_noise_std`] reading, or 0 (clean) where it is below `CLEAN_READING`."""
    reading = estimate_noise_std(images)
    return torch.where(reading < CLEAN_READING, torch.zeros_like(reading), reading)


def estimate_noise_std(images: torch.Tensor) -> torch.Tensor:
    """
    Per-image Gaussian noise std in `[0, 1]` units, read from where the image has no structure.

    The image is cut into 2x2 Haar blocks; in flat blocks all three details are noise. Blocks are ranked by their
    horizontal and vertical detail energy, and the noise std is the median absolute diagonal detail of the quieter
    half over 0.6745 (for Gaussian noise the three details are independent, so ranking by two does not bias the third),
    so a clean digit's edges do not read as noise as they do for the plain median over all blocks. Noise clipped to
    `[0, 1]` reads about half: clipping at a black background removes half of it. Its readings on the digits:
    `benchmarks/RESULTS.md`, "Figures behind the code".

    Args:
        images (`torch.Tensor` of shape `(B, C, H, W)`): values in `[-1, 1]` (noise may push them beyond); H, W >= 4.

    Returns:
        `torch.Tensor` of shape `(B,)`, float32.
    """
    unit = to_unit_range(images.float())
    height, width = unit.shape[-2] // 2 * 2, unit.shape[-1] // 2 * 2
    if height < 4 or width < 4:
        raise ValueError(f"noise estimation needs images of at least 4x4 pixels, got {tuple(images.shape[-2:])}")
    unit = unit[..., :height, :width]
    a, b, c, d = unit[..., 0::2, 0::2], unit[..., 0::2, 1::2], unit[..., 1::2, 0::2], unit[..., 1::2, 1::2]
    horizontal, vertical, diagonal = (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2
    energy = (horizontal**2 + vertical**2).flatten(1)
    diagonal = diagonal.abs().flatten(1)
    quiet = energy.argsort(dim=1)[:, : max(1, energy.shape[1] // 2)]
    return diagonal.gather(1, quiet).median(dim=1).values / 0.6745


@dataclass
class AnnotationSummary:
    """What the annotations of a training split say: `counts` of clean / noisy / restricted records, the lowest
    annotated noise level among non-clean records, and `lowest_trusted_sigma`: the lowest diffusion noise level
    (`[0, 1]` units) at which some record can train (0 when a clean record exists), which sampling stops at."""

    records: int
    clean: int
    noisy: int
    restricted: int
    lowest_trusted_sigma: float

    def to_dict(self) -> dict[str, float | int]:
        return {"records": self.records, "clean": self.clean, "noisy": self.noisy, "restricted": self.restricted,
                "lowest_trusted_sigma": self.lowest_trusted_sigma}


def summarise(columns: dict[str, Sequence[float]], max_weight: float) -> AnnotationSummary:
    """[`AnnotationSummary`] of annotation columns (each a sequence over the records)."""
    noise, low, high = (np.asarray(columns[c], dtype=np.float64) for c in ANNOTATION_COLUMNS)
    clean = (noise == 0) & (low == 0) & np.isinf(high)
    usable = [lowest_usable_sigma(n, m, max_weight) for n, m in zip(noise, low, strict=True)]
    return AnnotationSummary(records=len(noise), clean=int(clean.sum()), noisy=int(((noise > 0) & (low == 0)).sum()),
                             restricted=int(((low > 0) | ~np.isinf(high)).sum()),
                             lowest_trusted_sigma=float(min(usable)) if usable else 0.0)


def record_keys(dataset: datasets.Dataset, image_column: str, name: str, root: str | None = None) -> list[tuple[str, ...]]:
    """Per record, the keys a sidecar may name it by, the one `annotate` writes first: its image file's path relative to
    `root` (POSIX separators; the base name without a `root`), its base name when no other record's file has that name,
    and its record id `name[index]` (the only key of a record without a file)."""
    values = dataset.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))[image_column] \
        if isinstance(dataset.features[image_column], datasets.Image) else [None] * len(dataset)
    paths = [value.get("path") if isinstance(value, dict) else None for value in values]
    base_names = [os.path.basename(path) for path in paths if path]
    keys = []
    for index, path in enumerate(paths):
        record_id = f"{name}[{index}]"
        if not path:
            keys.append((record_id,))
            continue
        relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/") if root else None
        base = os.path.basename(path)
        unique_base = base if base_names.count(base) == 1 else None
        keys.append(tuple(dict.fromkeys(k for k in (relative or base, unique_base, record_id) if k)))
    return keys


def attach_annotations(
    dataset: datasets.Dataset,
    image_column: str,
    name: str,
    sidecar: str | os.PathLike | None = None,
    noise_sigma: float | None = None,
    estimate: Callable[[datasets.Dataset], list[float]] | None = None,
    required: bool = False,
    root: str | None = None,
) -> datasets.Dataset:
    r"""
    The map-style `dataset` with the three annotation columns, filled from (highest precedence first) one
    `noise_sigma` for every record, `estimate` (auto: a noise std per record), a `sidecar` file, or the dataset's own
    columns; unannotated records are clean. Every value is checked ([`check_annotation`]).

    Args:
        dataset (`datasets.Dataset`): records before decoding.
        image_column (`str`): the image column (its file names key the sidecar).
        name (`str`): the dataset's name in record ids (`name[index]`).
        sidecar (`str`, *optional*): CSV or JSON annotation file; keys that match no record are refused.
        noise_sigma (`float`, *optional*): one noise std for every record.
        estimate (*optional*): `dataset -> [noise std per record]`.
        required (`bool`): refuse records that no source annotates.
        root (`str`, *optional*): the image folder; sidecar keys are paths relative to it ([`record_keys`]).

    Returns:
        `datasets.Dataset` with float columns `noise_sigma`, `sigma_min`, `sigma_max` (and `mask`, the mask files' paths,
        when the sidecar names mask images).
    """
    count = len(dataset)
    columns = {c: list(dataset[c]) if c in dataset.column_names else [None] * count for c in ANNOTATION_COLUMNS}
    masks = None
    if sidecar is not None:
        masks = _apply_sidecar(dataset, image_column, name, sidecar, root, columns)
    if estimate is not None:
        columns["noise_sigma"] = [float(v) for v in estimate(dataset)]
    if noise_sigma is not None:
        columns["noise_sigma"] = [float(noise_sigma)] * count
    if required:
        missing = [i for i in range(count)
                   if all(columns[c][i] is None for c in ANNOTATION_COLUMNS) and not (masks and masks[i])]
        if missing:
            raise ValueError(f"annotations_required: {len(missing)} record(s) of {name} have no annotation, e.g. "
                             f"{[f'{name}[{i}]' for i in missing[:3]]}; annotate them or set annotations_required: false")
    for column in ANNOTATION_COLUMNS:
        columns[column] = [DEFAULTS[column] if v is None else float(v) for v in columns[column]]
    for index in range(count):
        check_annotation(f"{name}[{index}]", *(columns[c][index] for c in ANNOTATION_COLUMNS))
    dataset = dataset.remove_columns([c for c in ANNOTATION_COLUMNS if c in dataset.column_names])
    for column in ANNOTATION_COLUMNS:
        dataset = dataset.add_column(column, columns[column])
    if masks is not None:
        dataset = dataset.add_column(MASK_COLUMN, masks)
    return dataset


def _apply_sidecar(dataset: datasets.Dataset, image_column: str, name: str, sidecar: str, root: str | None,
                   columns: dict[str, list]) -> list | None:
    """Fill `columns` from the sidecar's rows; returns the mask file per record (None where there is none), or None
    when the sidecar names no mask. Refuses a key that matches no record, two keys naming one record, and a mask file
    that is itself one of the records (mask images must live outside the image folder)."""
    rows = read_sidecar(sidecar)
    keys = record_keys(dataset, image_column, name, root)
    by_key = {key: index for index, record in enumerate(keys) for key in record}
    unknown = [key for key in rows if key not in by_key]
    if unknown:
        raise ValueError(f"{sidecar}: {len(unknown)} annotated name(s) match no record of {name}, e.g. {unknown[:3]} "
                         f"(keys are paths relative to the folder such as {keys[0][0]!r}, unique file names, or record "
                         f"ids such as {keys[0][-1]!r})")
    named: dict[int, str] = {}
    for key in rows:
        if by_key[key] in named:
            raise ValueError(f"{sidecar}: {named[by_key[key]]!r} and {key!r} name the same record ({keys[by_key[key]][0]}); "
                             "keep one")
        named[by_key[key]] = key
    record_files = {os.path.realpath(key if os.path.isabs(key) else os.path.join(root, key))
                    for record in keys for key in record[:1] if root}
    masks = None
    for key, values in rows.items():
        for column, value in values.items():
            if column != MASK_COLUMN:
                columns[column][by_key[key]] = value
                continue
            if MASK_COLUMN in dataset.column_names:
                raise ValueError(f"{sidecar}: names masks, but {name} has its own '{MASK_COLUMN}' column")
            masks = masks or [None] * len(dataset)
            masks[by_key[key]] = os.path.join(os.path.dirname(os.path.abspath(sidecar)), value)
            if os.path.realpath(masks[by_key[key]]) in record_files:
                raise ValueError(f"{sidecar}: the mask {value} of {key} is itself an image of {name}: keep mask images "
                                 "outside the image folder (make-imperfect writes them to ../masks)")
    return masks


def decode_mask(value, record: str, shape: tuple[int, int]) -> np.ndarray:
    """A record's mask of observed pixels as `(H, W)` bool: an array (nonzero = observed), an image (value > 127 =
    observed) as a Datasets value `{"bytes", "path"}` or a path. `ValueError` naming `record` unless it has `shape`
    (masks are not resized) and at least one observed pixel."""
    if isinstance(value, (dict, str)):
        import io

        import PIL.Image

        source = value if isinstance(value, str) else (io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path"))
        if not source:
            raise ValueError(f"{record}: empty mask record")
        try:
            with PIL.Image.open(source) as image:
                if "A" in image.getbands() or "transparency" in image.info:
                    raise ValueError("it has an alpha channel, which would be ignored: save it as a grey image, white "
                                     "where a pixel is observed, black where it is missing")
                observed = np.asarray(image.convert("L")) > 127
        except (OSError, ValueError) as error:
            raise ValueError(f"{record}: mask does not decode ({error})") from None
    else:
        array = np.asarray(value, dtype=np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"{record}: mask holds NaN or infinite values")
        observed = (array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array) != 0
    if observed.shape != tuple(shape):
        raise ValueError(f"{record}: mask of shape {observed.shape}, expected the training resolution {tuple(shape)} "
                         "(masks are not resized)")
    if not observed.any():
        raise ValueError(f"{record}: its mask has no observed pixel; drop the record or fix its mask")
    return observed


def annotate_dataset(source: str, output: str, split: str = "train", image_column: str | None = None, channels: int = 3,
                     resolution: int | None = None) -> str:
    """Estimate every record's noise std ([`estimated_noise_levels`]: 0 for a reading that says clean), write them to
    the sidecar `output` (keyed by file name where records have files, else by record id) and return a text histogram
    of the levels."""
    from .datasets import _load_source, decode_image, detect_image_column, to_mode

    dataset = _load_source(source, split, False, None)
    column = detect_image_column(dataset.features, image_column)
    dataset = dataset.cast_column(column, datasets.Image(decode=False))
    name = os.path.basename(os.path.normpath(source)) + f"/{split}"
    keys = record_keys(dataset, column, name, source if os.path.isdir(source) else None)
    rows, failed = {}, []
    for index, value in enumerate(dataset[column]):
        key = keys[index][0]
        try:
            image = to_mode(decode_image(value), channels)
            if resolution is not None:
                image = image.resize((resolution, resolution), resample=3)
        except Exception as error:  # noqa: BLE001 - an undecodable record is reported, never annotated
            failed.append(f"{key} ({type(error).__name__})")
            continue
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        pixels = pixels[None, None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)[None]
        rows[key] = {"noise_sigma": round(float(estimated_noise_levels(pixels)[0]), 4)}
    if not rows:
        raise ValueError(f"{source} holds no decodable image to annotate")
    write_sidecar(output, rows, "record_id" if keys[0][0] == keys[0][-1] else "file_name")
    return level_histogram([v["noise_sigma"] for v in rows.values()], failed)


def level_histogram(levels: Sequence[float], failed: Sequence[str] = (), bins: int = 10) -> str:
    """A text histogram of noise levels (`[0, 1]` units), one line per bin, with the records that did not decode."""
    values = np.asarray(levels, dtype=np.float64)
    top = max(float(values.max()), 1e-3)
    counts, edges = np.histogram(values, bins=bins, range=(0.0, top))
    width = max(1, int(counts.max()))
    lines = [f"estimated noise std of {len(values)} images ([0, 1] units): median {np.median(values):.3f}, "
             f"min {values.min():.3f}, max {values.max():.3f}; {int((values == 0).sum())} read as clean (below "
             f"{CLEAN_READING})"]
    for count, low, high in zip(counts, edges[:-1], edges[1:], strict=True):
        lines.append(f"  {low:5.3f}-{high:5.3f} {'#' * round(40 * count / width):<40} {count}")
    if failed:
        lines.append(f"not annotated (undecodable): {len(failed)}, e.g. {list(failed)[:3]}")
    return "\n".join(lines)


def find_sidecar(source: str) -> str | None:
    """The sidecar next to an image folder (`annotations.csv` or `annotations.json`), if there is one; `ValueError`
    when both are there (which one is meant is not ours to guess)."""
    if not os.path.isdir(source):
        return None
    found = [os.path.join(source, name) for name in SIDECAR_NAMES if os.path.isfile(os.path.join(source, name))]
    if len(found) > 1:
        raise ValueError(f"{source} holds both {' and '.join(SIDECAR_NAMES)}: keep one, or pass --annotations FILE")
    return found[0] if found else None


def severity_sigma_min(corruption: str, severity: int) -> float:
    """`sigma_min` (`[0, 1]` units) for images damaged by a known corruption at a table severity: the noise std at which
    Gaussian noise outweighs what the damage removed, `BLUR_SIGMA_MIN` / `JPEG_SIGMA_MIN` below; `ValueError` for
    corruptions without an entry."""
    table = {"gaussian_blur": BLUR_SIGMA_MIN, "jpeg_compression": JPEG_SIGMA_MIN}.get(corruption)
    if table is None or severity not in table:
        raise ValueError(f"no sigma_min table for {corruption} severity {severity}; known: gaussian_blur and "
                         "jpeg_compression, severities 1..5 (or annotate sigma_min yourself)")
    return table[severity]


# Per severity: twice the RMS ([0, 1] units) of what the corruption removes from the clean digits' train split (median
# over images of ||x - corrupt(x)|| / sqrt(pixels)), so that the noise power is 4x the power of the lost detail.
# `diffusers_robust.data.imperfect.measure_sigma_min` recomputes it (a test checks the table against it).
BLUR_SIGMA_MIN = {1: 0.07, 2: 0.27, 3: 0.34, 4: 0.39, 5: 0.46}
JPEG_SIGMA_MIN = {1: 0.05, 2: 0.09, 3: 0.10, 4: 0.12, 5: 0.14}
