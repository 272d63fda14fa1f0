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


def make_grid(images: np.ndarray, columns: int | None = None, min_size: int = MIN_DISPLAY_SIZE, gap: int = 0,
              min_scale: int = 1) -> PIL.Image.Image:
    """Tile images (numpy `(B, H, W, C)` in `[0, 1]`, as `output_type="np"` returns them) into one grid image at least
    `min_size` pixels wide (small images are enlarged by whole pixels, at least `min_scale` screen pixels per image
    pixel, see [`upscale_for_display`]), with `gap` pixels of mid-grey between the images."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    images = np.asarray(images)
    scale = max(min_scale, math.ceil(min_size / (images.shape[2] * columns)))
    tiles = (images.repeat(scale, axis=1).repeat(scale, axis=2) * 255).round().clip(0, 255).astype(np.uint8)
    rows, (height, width, channels) = math.ceil(len(tiles) / columns), tiles.shape[1:]
    fill = 128 if gap else 0
    canvas = np.full((rows * height + (rows - 1) * gap, columns * width + (columns - 1) * gap, channels), fill, np.uint8)
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        canvas[top:top + height, left:left + width] = tile
    if gap:  # cells past the last image stay black, not grey
        for index in range(len(tiles), rows * columns):
            top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
            canvas[top:top + height, left:left + width] = 0
    return PIL.Image.fromarray(canvas[..., 0] if channels == 1 else canvas)


def stack_images(batches: Iterable[torch.Tensor], limit: int) -> torch.Tensor:
    """Concatenate batches `(B, C, H, W)` until `limit` images."""
    collected, total = [], 0
    for batch in batches:
        collected.append(batch)
        total += batch.shape[0]
        if total >= limit:
            break
    return torch.cat(collected)[:limit]


def add_caption(picture: PIL.Image.Image, caption: str, height: int = 18) -> PIL.Image.Image:
    """`picture` under a white band holding `caption` in black (Pillow's default font), so a grid says what it shows."""
    from PIL import ImageDraw

    band = PIL.Image.new(picture.mode, (picture.width, picture.height + height), "white")
    band.paste(picture, (0, height))
    ImageDraw.Draw(band).text((4, 3), caption, fill="black")
    return band
