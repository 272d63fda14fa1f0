"""Albumentations pipelines from recipe files, and the augment labels of what they applied.

A recipe is an Albumentations `Compose` in Albumentations' own serialisation (`A.save` / `A.load`,
YAML or JSON). [`AugmentPipeline`] runs it on one `(H, W, C)` uint8 image and returns, beside the
augmented image, a fixed-length float vector describing what was applied: all zeros when nothing was
applied. The UNet is conditioned on that vector while training and on zeros when sampling
(non-leaking augmentation, Karras et al. 2022).

Label layout: for each leaf transform of the recipe, in order, one slot `applied` (0 or 1), followed by
transform-specific features: for `Affine` the deviation of its normalised 2x3 matrix from the identity
(6 values: a11 - 1, a12, a21, a22 - 1, tx / W, ty / H); for noise transforms one magnitude.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

if TYPE_CHECKING:  # imported when a recipe is used: a run without augmentation never loads Albumentations/OpenCV
    import albumentations as A


def _affine_features(params: dict[str, Any], height: int, width: int) -> list[float]:
    matrix = np.asarray(params.get("matrix", np.eye(3)), dtype=np.float64)
    return [
        matrix[0, 0] - 1.0, matrix[0, 1], matrix[1, 0], matrix[1, 1] - 1.0,
        matrix[0, 2] / width, matrix[1, 2] / height,
    ]


def _scalar(key: str, transform: Callable[[float], float] = float) -> Callable[[dict, int, int], list[float]]:
    def features(params: dict[str, Any], height: int, width: int) -> list[float]:
        return [transform(float(params.get(key, 0.0)))]

    return features


def _salt_and_pepper_features(params: dict[str, Any], height: int, width: int) -> list[float]:
    hit = np.asarray(params.get("salt_mask", 0)).sum() + np.asarray(params.get("pepper_mask", 0)).sum()
    return [float(hit) / (height * width)]


def _gauss_features(params: dict[str, Any], height: int, width: int) -> list[float]:
    return [float(np.asarray(params.get("noise_map", 0.0)).std()) / 255.0]


# Transform class name -> (number of features after the `applied` slot, feature function).
LABEL_FEATURES: dict[str, tuple[int, Callable[[dict, int, int], list[float]]]] = {
    "Affine": (6, _affine_features),
    "GaussNoise": (1, _gauss_features),
    "SaltAndPepper": (1, _salt_and_pepper_features),
    "ShotNoise": (1, _scalar("scale")),
    "ISONoise": (1, _scalar("intensity")),
    "ImageCompression": (1, _scalar("quality", lambda q: (100.0 - q) / 100.0)),
}


# Transforms that only move pixels to other places (flips, quarter turns): an image's noise stays white with the same
# level, so they are safe on noisy training records.
PIXEL_PERMUTING_TRANSFORMS = frozenset({"HorizontalFlip", "VerticalFlip", "Transpose", "RandomRotate90", "D4",
                                        "SquareSymmetry"})


def _leaf_transforms(transform: A.BasicTransform) -> list[A.BasicTransform]:
    children = getattr(transform, "transforms", None)
    if children is None:
        return [transform]
    return [leaf for child in children for leaf in _leaf_transforms(child)]


def _check_recipe_dict(recipe: dict[str, Any], source: str) -> None:
    """Reject unknown keys with a message naming them; Albumentations' own errors are less direct."""
    import albumentations as A

    if "transform" not in recipe:
        raise ValueError(f"{source}: an augment recipe needs a top-level 'transform' key, got {sorted(recipe)}")
    unknown = set(recipe) - {"transform", "__version__"}
    if unknown:
        raise ValueError(f"{source}: unknown augment recipe key(s) {sorted(unknown)}")

    def visit(node: dict[str, Any]) -> None:
        name = node.get("__class_fullname__")
        if name is None:
            raise ValueError(f"{source}: every transform needs '__class_fullname__', got {sorted(node)}")
        cls = getattr(A, name.split(".")[-1], None)
        if cls is None:
            raise ValueError(f"{source}: unknown Albumentations transform '{name}'")
        if "transforms" in node:
            for child in node["transforms"]:
                visit(child)
            return
        accepted = set(inspect.signature(cls.__init__).parameters) | {"__class_fullname__", "p", "always_apply"}
        unknown_args = set(node) - accepted
        if unknown_args:
            raise ValueError(f"{source}: unknown key(s) {sorted(unknown_args)} for transform {name}")

    visit(recipe["transform"])


class AugmentPipeline:
    r"""
    An Albumentations `Compose` plus the augment labels of what it applied.

    Args:
        compose (`A.Compose`): the pipeline; it is rebuilt with `save_applied_params=True`.
        seed (`int`, *optional*): seeds Albumentations' random state (per process; reseed DataLoader workers).

    Example:

    ```py
    >>> import numpy as np
    >>> from diffusers_robust.data.augment import AugmentPipeline
    >>> pipe = AugmentPipeline.from_file("training/configs/augment/edm.yaml", seed=0)  # from the repository root
    >>> image, labels = pipe(np.zeros((32, 32, 3), np.uint8))
    >>> labels.shape == (pipe.label_dim,)
    True
    ```
    """

    def __init__(self, compose: A.Compose, seed: int | None = None):
        import albumentations as A

        self.compose = A.from_dict(A.to_dict(compose))  # a copy of its own, recording applied parameters
        self.compose.save_applied_params = True
        self._leaf_objects = _leaf_transforms(self.compose)
        self.leaves = [type(leaf).__name__ for leaf in self._leaf_objects]
        if seed is not None:
            self.set_random_seed(seed)
        self._offsets = []
        offset = 0
        for name in self.leaves:
            self._offsets.append(offset)
            offset += 1 + LABEL_FEATURES.get(name, (0, None))[0]
        self.label_dim = offset

    @property
    def permutes_pixels_only(self) -> bool:
        """True when every transform only moves pixels (`PIXEL_PERMUTING_TRANSFORMS`): values and noise are kept."""
        return all(name in PIXEL_PERMUTING_TRANSFORMS for name in self.leaves)

    @classmethod
    def from_dict(cls, recipe: dict[str, Any], seed: int | None = None, source: str = "recipe") -> AugmentPipeline:
        _check_recipe_dict(recipe, source)
        import albumentations as A
        return cls(A.from_dict(recipe), seed=seed)

    @classmethod
    def from_file(cls, path: str | os.PathLike, seed: int | None = None) -> AugmentPipeline:
        """Load a recipe saved by `A.save` (`.yaml`, `.yml` or `.json`)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"augment recipe {path} does not exist")
        with open(path, encoding="utf-8") as handle:
            recipe = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
        if not isinstance(recipe, dict):
            raise ValueError(f"{path}: an augment recipe must be a mapping, got {type(recipe).__name__}")
        return cls.from_dict(recipe, seed=seed, source=path)

    def to_dict(self) -> dict[str, Any]:
        import albumentations as A
        return A.to_dict(self.compose)

    def save(self, path: str | os.PathLike) -> None:
        """Write the recipe in Albumentations' serialisation (YAML unless `path` ends in `.json`)."""
        path = os.fspath(path)
        import albumentations as A
        A.save(self.compose, path, data_format="json" if path.endswith(".json") else "yaml")

    def set_random_seed(self, seed: int) -> None:
        """Seed the pipeline, each transform with its own stream.

        Albumentations' `Compose.set_random_seed` gives every child the same seed, so their draws (whether
        to apply, and the parameters) are identical and correlated: with four transforms at p = 0.12, 12% of
        images are touched instead of 1 - 0.88^4 = 40%. Independent child seeds avoid that."""
        self.compose.set_random_seed(seed)
        child_seeds = np.random.SeedSequence(seed).generate_state(len(self._leaf_objects))
        for leaf, child_seed in zip(self._leaf_objects, child_seeds, strict=True):
            leaf.set_random_seed(int(child_seed))

    def labels(self, applied: list[tuple[str, dict[str, Any]]], height: int, width: int) -> np.ndarray:
        """Turn Albumentations' `applied_transforms` into the label vector `(label_dim,)`, float32."""
        vector = np.zeros(self.label_dim, dtype=np.float32)
        used = set()
        for name, params in applied:
            slot = next(i for i, leaf in enumerate(self.leaves) if leaf == name and i not in used)
            used.add(slot)
            if name == "Affine" and np.allclose(params.get("matrix", np.eye(3)), np.eye(3)):
                continue  # Affine rounds translations to whole pixels; an identity matrix changed nothing
            offset = self._offsets[slot]
            vector[offset] = 1.0
            if name in LABEL_FEATURES:
                count, features = LABEL_FEATURES[name]
                vector[offset + 1 : offset + 1 + count] = features(params, height, width)
        return vector

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Augment one `(H, W, C)` uint8 image; return it and its label vector `(label_dim,)`."""
        result = self.compose(image=image)
        return result["image"], self.labels(result["applied_transforms"], image.shape[0], image.shape[1])

    def __repr__(self) -> str:
        return f"AugmentPipeline(leaves={self.leaves}, label_dim={self.label_dim})"
