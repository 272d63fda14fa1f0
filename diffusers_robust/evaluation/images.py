"""Images for people: sample grids (small images upscaled so a person can see them) and stacking batches."""

import math
from collections.abc import Iterable

import numpy as np
import PIL.Image
import torch

# Grids, TensorBoard images and model-card pictures are at least this many pixels wide: an 8x8 digit is enlarged
# with nearest-neighbour sampling, so every generated pixel stays a sharp square.
MIN_DISPLAY_SIZE = 256


def upscale_for_display(images: np.ndarray, min_size: int = MIN_DISPLAY_SIZE, columns: int = 1) -> np.ndarray:
    """Repeat each pixel of `images` `(B, H, W, C)` an integer number of times so that `columns` images side by side
    are at least `min_size` pixels wide (nearest neighbour; no new values). Large images are returned unchanged."""
    factor = max(1, math.ceil(min_size / (images.shape[2] * columns)))
    return images.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else images


def make_grid(images: np.ndarray, columns: int | None = None, min_size: int = MIN_DISPLAY_SIZE) -> PIL.Image.Image:
    """Tile images (numpy `(B, H, W, C)` in `[0, 1]`, as `output_type="np"` returns them) into one grid image at least
    `min_size` pixels wide (small images are enlarged by whole pixels, see [`upscale_for_display`])."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import make_image_grid

    columns = columns or math.ceil(math.sqrt(len(images)))
    pictures = DiffusionPipeline.numpy_to_pil(upscale_for_display(np.asarray(images), min_size, columns))
    rows = math.ceil(len(pictures) / columns)
    blank = PIL.Image.new(pictures[0].mode, pictures[0].size)
    return make_image_grid(pictures + [blank] * (rows * columns - len(pictures)), rows=rows, cols=columns)


def stack_images(batches: Iterable[torch.Tensor], limit: int) -> torch.Tensor:
    """Concatenate batches `(B, C, H, W)` until `limit` images."""
    collected, total = [], 0
    for batch in batches:
        collected.append(batch)
        total += batch.shape[0]
        if total >= limit:
            break
    return torch.cat(collected)[:limit]
