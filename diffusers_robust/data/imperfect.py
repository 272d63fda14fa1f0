"""Imperfect-data recipes for experiments: turn a clean dataset into a seeded mix of clean, noisy, blurred and
incomplete (missing-pixel) records with their annotations, saved as float arrays kept unclipped (the method's
assumption) and as 8-bit clipped PNG files (what real photos look like)."""

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import datasets
import numpy as np
import PIL.Image
import torch

from ..output_folders import staged_output_folder
from .annotations import write_sidecar
from .corruptions import apply_corruption
from .units import to_unit_range

RECIPE_CORRUPTIONS = ("clean", "gaussian_noise", "gaussian_blur", "jpeg_compression", "missing_pixels")


@dataclass(frozen=True)
class ImperfectionGroup:
    """A share of the records and what happens to them: `"clean"`, `"gaussian_noise"` (`level` = noise std in `[0, 1]`
    units, annotated as `noise_sigma`), `"gaussian_blur"` / `"jpeg_compression"` (`level` = table severity 1..5,
    annotated with the `sigma_min` that severity has on the images damaged: [`measure_sigma_min`]), or
    `"missing_pixels"` (`level` = share of pixels missing, in (0, 1), annotated with the record's `mask` of observed
    pixels)."""

    share: float
    corruption: str
    level: float = 0.0

    def __post_init__(self):
        if self.corruption not in RECIPE_CORRUPTIONS:
            raise ValueError(f"recipe corruption must be one of {RECIPE_CORRUPTIONS}, got {self.corruption!r}")
        if not 0 < self.share <= 1:
            raise ValueError(f"recipe share must be in (0, 1], got {self.share} for {self.corruption}")
        if self.corruption == "gaussian_noise" and not 0 < self.level < 10:
            raise ValueError(f"gaussian_noise needs a noise std in (0, 10) ([0, 1] units), got {self.level}")
        if self.corruption in ("gaussian_blur", "jpeg_compression") and self.level not in (1, 2, 3, 4, 5):
            raise ValueError(f"{self.corruption} needs a severity 1..5, got {self.level}")
        if self.corruption == "missing_pixels" and not 0 < self.level < 1:
            raise ValueError(f"missing_pixels needs the share of pixels missing in (0, 1), got {self.level}")


def parse_recipe(text: str) -> list[ImperfectionGroup]:
    """`"gaussian_noise:0.2=0.9,clean=0.1"` (corruption[:level]=share, comma separated; shares sum to 1)."""
    groups = []
    for part in text.split(","):
        what, _, share = part.strip().partition("=")
        name, _, level = what.partition(":")
        try:
            groups.append(ImperfectionGroup(float(share), name.strip(), float(level) if level else 0.0))
        except ValueError as error:
            raise ValueError(f"recipe {text!r}: {part.strip()!r}: {error}") from None
    if abs(sum(g.share for g in groups) - 1) > 1e-6:
        raise ValueError(f"recipe {text!r}: shares must sum to 1, got {sum(g.share for g in groups):.4g}")
    return groups


@dataclass
class ImperfectData:
    """What [`make_imperfect`] made: `images` `(N, H, W, C)` float32 in `[0, 1]` units (noise kept unclipped, missing
    pixels 0), per-record `annotations` (`noise_sigma`, `sigma_min`), `groups` (the recipe group index of each record)
    and, when a group has missing pixels, `masks` `(N, H, W)` uint8 (1 = observed; all ones for the other records)."""

    images: np.ndarray
    annotations: list[dict[str, float]]
    groups: np.ndarray
    masks: np.ndarray | None = None


# Images (a seeded sample) on which `make_imperfect` measures the sigma_min of its blurred and JPEG records.
SIGMA_MIN_IMAGES = 2048


def _sample(images: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    if images.shape[0] <= count:
        return images
    return images[torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:count].sort().values]


def make_imperfect(images: torch.Tensor, recipe: list[ImperfectionGroup], seed: int = 0) -> ImperfectData:
    """
    Damage `images` by `recipe`, seeded: a permutation drawn from `seed` gives each group its share of the records (the
    last group takes what rounding leaves); each noisy record's noise, and each incomplete record's mask (every pixel
    missing with the group's probability, all channels alike), is one draw seeded by `(seed, index)`.

    Args:
        images (`torch.Tensor` of shape `(N, C, H, W)`): clean images in `[-1, 1]`.
        recipe (list of [`ImperfectionGroup`]).
        seed (`int`): seeds which record goes where and the noise.

    Returns:
        [`ImperfectData`].
    """
    count = images.shape[0]
    order = np.random.default_rng(seed).permutation(count)
    groups = np.empty(count, dtype=np.int64)
    start = 0
    for index, group in enumerate(recipe):
        end = count if index == len(recipe) - 1 else start + round(group.share * count)
        groups[order[start:end]] = index
        start = end
    unit = to_unit_range(images.double()).cpu()
    out, annotations = unit.clone(), []
    # sigma_min of blurred / JPEG records, measured on these images (a table measured on other data is wrong for them:
    # blur severity 3 removes 0.17 of the 8x8 digits' detail, about 0.02 of smooth 32x32 photos).
    sigma_min = {index: measure_sigma_min(_sample(images, SIGMA_MIN_IMAGES, seed), g.corruption, int(g.level))
                 for index, g in enumerate(recipe) if g.corruption in ("gaussian_blur", "jpeg_compression")}
    masks = None
    if any(group.corruption == "missing_pixels" for group in recipe):
        masks = np.ones((count, *unit.shape[2:]), dtype=np.uint8)
    for record in range(count):
        group = recipe[groups[record]]
        annotation = {}
        if group.corruption == "gaussian_noise":
            noise = np.random.default_rng([seed, record]).standard_normal(unit.shape[1:])
            out[record] = unit[record] + group.level * torch.from_numpy(noise)
            annotation = {"noise_sigma": group.level}
        elif group.corruption == "missing_pixels":
            masks[record] = np.random.default_rng([seed, record]).random(unit.shape[2:]) >= group.level
            out[record] = unit[record] * torch.from_numpy(masks[record]).double()
        elif group.corruption != "clean":
            damaged = apply_corruption(images[record:record + 1].float(), group.corruption, int(group.level),
                                       generator=torch.Generator().manual_seed(seed * 1_000_003 + record))
            out[record] = to_unit_range(damaged[0].double()).cpu()
            annotation = {"sigma_min": sigma_min[int(groups[record])]}
        annotations.append(annotation)
    return ImperfectData(out.permute(0, 2, 3, 1).float().numpy(), annotations, groups, masks)


def save_imperfect(data: ImperfectData, folder: str, recipe: list[ImperfectionGroup], seed: int,
                   labels: list[int] | None = None, overwrite: bool = False, inputs: Sequence[str] = (),
                   names: list[str] | None = None) -> dict[str, str]:
    """
    Save `data` twice: `folder/float/train.parquet` (float `Array3D` column `image` in `[0, 1]` units, unclipped, with
    annotation columns, `mask` (`Array2D` uint8) when records miss pixels, and `label` if given) and `folder/png/`
    (8-bit PNG files, clipped, with `annotations.csv` next to them, keyed by file name, naming mask images in
    `masks/`, outside the image folder so a folder loader does not read them as images), plus `folder/recipe.json`.
    The PNG files are named `names` (relative paths ending `.png`, see [`png_names`]), else `000000.png` on.
    Written through `output_folders.staged_output_folder`: never half-written; a folder holding the user's files, or
    one of `inputs` (the source data), is refused, and an earlier result is replaced only with `overwrite`.

    Returns:
        `{"float": <parquet path>, "png": <image folder>}`.
    """
    with staged_output_folder(folder, "make-imperfect", overwrite, inputs) as temporary:
        _write_imperfect(data, temporary, recipe, seed, labels, names)
    return {"float": os.path.join(folder, "float", "train.parquet"), "png": os.path.join(folder, "png")}


def png_names(record_ids: list[str], root: str) -> list[str]:
    """The PNG names that keep the source files' names: each record's file (its record id) relative to the image folder
    `root`, with the suffix `.png`; `ValueError` naming the files when two would share a name (`a.jpg`, `a.png`)."""
    names = [os.path.splitext(os.path.relpath(record, root))[0].replace(os.sep, "/") + ".png" for record in record_ids]
    if len(set(names)) < len(names):
        clash = sorted(name for name in set(names) if names.count(name) > 1)[0]
        raise ValueError(f"{', '.join(r for r, n in zip(record_ids, names, strict=True) if n == clash)} would all be "
                         f"written as {clash}; rename one")
    return names


def _write_imperfect(data: ImperfectData, temporary: str, recipe: list[ImperfectionGroup], seed: int,
                     labels: list[int] | None, names: list[str] | None) -> None:
    os.makedirs(os.path.join(temporary, "float"))
    os.makedirs(os.path.join(temporary, "png"))
    count, height, width, channels = data.images.shape
    columns = {"image": list(data.images),
               "noise_sigma": [a.get("noise_sigma", 0.0) for a in data.annotations],
               "sigma_min": [a.get("sigma_min", 0.0) for a in data.annotations]}
    features = {"image": datasets.Array3D((height, width, channels), "float32"),
                "noise_sigma": datasets.Value("float64"), "sigma_min": datasets.Value("float64")}
    if data.masks is not None:
        columns["mask"], features["mask"] = list(data.masks), datasets.Array2D((height, width), "uint8")
        os.makedirs(os.path.join(temporary, "masks"))
    if labels is not None:
        columns["label"], features["label"] = list(labels), datasets.Value("int64")
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(
        os.path.join(temporary, "float", "train.parquet"))
    sidecar = {}
    for index in range(count):
        name = names[index] if names is not None else f"{index:06d}.png"
        pixels = np.clip(np.round(data.images[index] * 255.0), 0, 255).astype(np.uint8)
        os.makedirs(os.path.dirname(os.path.join(temporary, "png", name)), exist_ok=True)
        PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(os.path.join(temporary, "png", name))
        annotation = dict(data.annotations[index])
        if data.masks is not None and not data.masks[index].all():
            annotation["mask"] = f"../masks/{name}"
            os.makedirs(os.path.dirname(os.path.join(temporary, "masks", name)), exist_ok=True)
            PIL.Image.fromarray(data.masks[index] * np.uint8(255)).save(os.path.join(temporary, "masks", name))
        if annotation:
            sidecar[name] = annotation
    write_sidecar(os.path.join(temporary, "png", "annotations.csv"), sidecar)
    shares = {f"{g.corruption}:{g.level:g}": int((data.groups == i).sum()) for i, g in enumerate(recipe)}
    with open(os.path.join(temporary, "recipe.json"), "w", encoding="utf-8") as handle:
        measured = {f"{g.corruption}:{g.level:g}": data.annotations[int(np.argmax(data.groups == i))]["sigma_min"]
                    for i, g in enumerate(recipe) if g.corruption in ("gaussian_blur", "jpeg_compression")
                    and (data.groups == i).any()}
        json.dump({"seed": seed, "groups": [asdict(g) for g in recipe], "records": shares,
                   "sigma_min_measured": measured}, handle, indent=2)


def measure_sigma_min(images: torch.Tensor, corruption: str, severity: int) -> float:
    """Twice the median RMS (`[0, 1]` units) of what `corruption` at `severity` removes from `images` `(N, C, H, W)` in
    `[-1, 1]`, rounded to 0.01: how `BLUR_SIGMA_MIN` and `JPEG_SIGMA_MIN` were made."""
    damaged = apply_corruption(images, corruption, severity, generator=torch.Generator().manual_seed(0))
    removed = ((images - damaged) / 2).flatten(1).pow(2).mean(dim=1).sqrt().median()
    return round(2 * float(removed), 2)

