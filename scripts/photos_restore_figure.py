#!/usr/bin/env python
"""The README's picture of whole held-out photos restored by the 32x32 photo prior: clean, noisy, restored, one row each.

    python scripts/photos_restore_figure.py --pipeline outputs/photos --output docs/photos-restore.png

Held-out 64x64 tiles of the embedded photos (photographs the prior never saw; `--tiles` picks them by index) get
Gaussian noise of std `--noise_sigma`, are stored as 8-bit as a user's files are, and are restored as `diffusers-robust
restore` does with no option (`corruption="auto"`: each image's damage detected). Prints what was detected and the PSNR
of each tile before and after; writes the picture with each pixel drawn `--scale` screen pixels wide and gaps between
the images. One thread, fixed seeds.
"""

import argparse
import os
import sys

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers_robust import RobustDDPMPipeline  # noqa: E402
from diffusers_robust.data.photos import photo_tiles  # noqa: E402

GAP = 4  # screen pixels between images
HEADER = 18  # screen pixels of the column titles
BACKGROUND = (255, 255, 255)


def psnr(image: np.ndarray, clean: np.ndarray) -> float:
    """PSNR in dB of `(H, W, 3)` uint8 images (peak 255)."""
    error = np.mean((image.astype(np.float64) - clean.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / error))


def figure(rows: list[list[np.ndarray]], titles: list[str], scale: int) -> PIL.Image.Image:
    """The images `rows[r][c]` `(H, W, 3)` uint8 on a grid, each enlarged `scale` times (nearest), titles on top."""
    height, width = (side * scale for side in rows[0][0].shape[:2])
    columns = len(rows[0])
    canvas = PIL.Image.new("RGB", (columns * width + (columns - 1) * GAP, HEADER + len(rows) * (height + GAP)), BACKGROUND)
    draw = PIL.ImageDraw.Draw(canvas)
    for column, title in enumerate(titles):
        draw.text((column * (width + GAP) + 2, 3), title, fill=(0, 0, 0))
    for row, images in enumerate(rows):
        for column, image in enumerate(images):
            picture = PIL.Image.fromarray(image).resize((width, height), PIL.Image.NEAREST)
            canvas.paste(picture, (column * (width + GAP), HEADER + row * (height + GAP)))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="a trained photo pipeline folder")
    parser.add_argument("--output", default="docs/photos-restore.png")
    parser.add_argument("--tiles", type=int, nargs="+", default=[10, 21, 39], help="held-out 64x64 tile indices")
    parser.add_argument("--noise_sigma", type=float, default=0.1, help="Gaussian noise std, [0, 1] units")
    parser.add_argument("--scale", type=int, default=3, help="screen pixels per image pixel")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    tiles, _ = photo_tiles(64, "test")
    clean = tiles[args.tiles]
    rng = np.random.default_rng(args.seed)
    noisy = np.clip(np.round(np.clip(clean / 255 + args.noise_sigma * rng.standard_normal(clean.shape), 0, 1) * 255), 0, 255)
    noisy = noisy.astype(np.uint8)
    pipe = RobustDDPMPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    output = pipe(image=noisy.astype(np.float32) / 255, corruption="auto", output_type="np",
                  generator=torch.Generator().manual_seed(args.seed))
    restored = np.clip(np.round(output.images * 255), 0, 255).astype(np.uint8)
    for index, detection, before, after in zip(args.tiles, output.detections, noisy, restored, strict=True):
        print(f"tile {index}: detected {detection.corruption} (std {detection.noise_sigma}), "
              f"PSNR {psnr(before, clean[args.tiles.index(index)]):.2f} -> {psnr(after, clean[args.tiles.index(index)]):.2f} dB")
    titles = ["held-out photo", f"Gaussian noise, std {args.noise_sigma:g} (8-bit)", "restored (auto)"]
    rows = [[c, n, r] for c, n, r in zip(clean, noisy, restored, strict=True)]
    figure(rows, titles, args.scale).save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
