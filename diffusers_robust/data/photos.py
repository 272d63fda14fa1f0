"""Real photographs that ship inside scikit-image's and scikit-learn's wheels, cut into tiles: the embedded `photos`
dataset and the larger held-out tiles that restoration is measured on. No download: every source is a file of an
installed package.

Each photo is resized (Lanczos) so that its shorter side is `PHOTO_SHORT_SIDE` pixels, then cut into non-overlapping
`size x size` tiles in row-major order; tiles that are nearly flat (standard deviation under `FLAT_TILE_STD` of 255) are
dropped. The held-out split is made of other photographs than the train split, never of crops of a training photo.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image

# Shorter side (pixels) each photo is resized to before tiling.
PHOTO_SHORT_SIDE = 256
# Tiles whose pixel standard deviation (0..255, all channels) is below this are dropped (the black corners of `retina`).
FLAT_TILE_STD = 4.0


@dataclass(frozen=True)
class PhotoSource:
    """One photograph: its name, loader (`() -> (H, W, 3) uint8`), split, and licence as its package states it."""

    name: str
    load: Callable[[], np.ndarray]
    split: str
    licence: str


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            import skimage.data
        except ImportError as error:  # pragma: no cover - scikit-image is a dependency
            raise ImportError("the photos dataset needs scikit-image: pip install scikit-image") from error
        return getattr(skimage.data, name)()

    return load


def _sklearn(file_name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(file_name)

    return load


PHOTO_SOURCES: tuple[PhotoSource, ...] = (
    PhotoSource("astronaut", _skimage("astronaut"), "train", "public domain (NASA)"),
    PhotoSource("coffee", _skimage("coffee"), "train", "CC0 (Rachel Michetti)"),
    PhotoSource("rocket", _skimage("rocket"), "train", "public domain (SpaceX)"),
    PhotoSource("hubble_deep_field", _skimage("hubble_deep_field"), "train", "public domain (NASA)"),
    PhotoSource("immunohistochemistry", _skimage("immunohistochemistry"), "train", "no known copyright restrictions (CMMI)"),
    PhotoSource("retina", _skimage("retina"), "train", "CC0 (Mikael Häggström)"),
    PhotoSource("china", _sklearn("china.jpg"), "train", "CC BY 2.0 (scikit-learn sample image)"),
    PhotoSource("chelsea", _skimage("chelsea"), "test", "CC0 (Stefan van der Walt)"),
    PhotoSource("flower", _sklearn("flower.jpg"), "test", "CC BY 2.0 (scikit-learn sample image)"),
)


def resized_photo(source: PhotoSource) -> np.ndarray:
    """`source` as `(H, W, 3)` uint8 with its shorter side `PHOTO_SHORT_SIDE` pixels (Lanczos)."""
    image = np.asarray(source.load())
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"photo {source.name!r}: expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
    height, width = image.shape[:2]
    scale = PHOTO_SHORT_SIDE / min(height, width)
    size = (round(width * scale), round(height * scale))
    return np.asarray(PIL.Image.fromarray(image).resize(size, PIL.Image.Resampling.LANCZOS))


def photo_tiles(size: int = 32, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """
    The non-flat `size x size` tiles of the photos of `split`.

    Args:
        size (`int`, defaults to 32): tile side in pixels, 8..`PHOTO_SHORT_SIDE`.
        split (`str`, defaults to `"train"`): `"train"`, `"test"` or `"all"` (train photos first).

    Returns:
        `(tiles, source_index)`: `(N, size, size, 3)` uint8 and `(N,)` int64, the index in `PHOTO_SOURCES` of each
        tile's photo.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not 8 <= size <= PHOTO_SHORT_SIDE:
        raise ValueError(f"tile size must be in 8..{PHOTO_SHORT_SIDE} pixels, got {size}")
    tiles, sources = [], []
    for index, source in enumerate(PHOTO_SOURCES):
        if split != "all" and source.split != split:
            continue
        photo = resized_photo(source)
        for top in range(0, photo.shape[0] - size + 1, size):
            for left in range(0, photo.shape[1] - size + 1, size):
                tile = photo[top:top + size, left:left + size]
                if tile.std() >= FLAT_TILE_STD:
                    tiles.append(tile)
                    sources.append(index)
    return np.stack(tiles), np.array(sources, dtype=np.int64)
