#!/usr/bin/env python
"""The README's picture of whole held-out photos restored by the 32x32 photo prior: clean, noisy, restored, one row each.

    python scripts/photos_restore_figure.py --pipeline outputs/photos --output docs/photos-restore.png --overwrite

Held-out 64x64 tiles of the embedded photos (photographs the prior never saw; `--tiles` picks them by index) get
Gaussian noise of std `--noise_sigma`, are stored as 8-bit as a user's files are, and are restored as `diffusers-robust
restore` does with no option (`corruption="auto"`: each image's damage detected). Prints what was detected and the PSNR
of each tile before and after (scikit-image's metric); writes the picture with each pixel drawn `--scale` screen pixels
wide, grey gaps between the images and a caption naming the columns. An existing `--output` is replaced only with
`--overwrite`. One thread, fixed seeds.
"""

import argparse
import os
import sys

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers_robust import RobustDDPMPipeline  # noqa: E402
from diffusers_robust.data.photos import photo_tiles  # noqa: E402
from diffusers_robust.evaluation.images import add_caption, make_grid  # noqa: E402

GAP = 4  # screen pixels between images


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="a trained photo pipeline folder")
    parser.add_argument("--output", default="docs/photos-restore.png", help="the PNG to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--tiles", type=int, nargs="+", default=[10, 21, 39], help="held-out 64x64 tile indices")
    parser.add_argument("--noise_sigma", type=float, default=0.1, help="Gaussian noise std, [0, 1] units")
    parser.add_argument("--scale", type=int, default=3, help="screen pixels per image pixel")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if os.path.exists(args.output) and not args.overwrite:
        parser.error(f"--output {args.output} exists; pass --overwrite to replace it")
    if not 0 < args.noise_sigma <= 1 or args.scale < 1:
        parser.error(f"--noise_sigma must be in (0, 1] and --scale at least 1, got {args.noise_sigma} and {args.scale}")
    return args


def main() -> None:
    args = parse_arguments()
    torch.set_num_threads(1)
    tiles, _ = photo_tiles(64, "test")
    if not all(0 <= index < len(tiles) for index in args.tiles):
        sys.exit(f"--tiles: there are {len(tiles)} held-out 64x64 tiles (0..{len(tiles) - 1}), got {args.tiles}")
    clean = tiles[args.tiles] / 255
    rng = np.random.default_rng(args.seed)
    noisy = np.round(np.clip(clean + args.noise_sigma * rng.standard_normal(clean.shape), 0, 1) * 255) / 255
    pipe = RobustDDPMPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    output = pipe(image=noisy.astype(np.float32), corruption="auto", output_type="np",
                  generator=torch.Generator().manual_seed(args.seed))
    restored = np.round(output.images.astype(np.float64) * 255) / 255
    for index, detection, reference, before, after in zip(args.tiles, output.detections, clean, noisy, restored,
                                                          strict=True):
        print(f"tile {index}: detected {detection.corruption} (std {detection.noise_sigma:.3f}), PSNR "
              f"{peak_signal_noise_ratio(reference, before, data_range=1):.2f} -> "
              f"{peak_signal_noise_ratio(reference, after, data_range=1):.2f} dB")
    rows = np.stack([clean, noisy, restored], axis=1).reshape(-1, *clean.shape[1:])
    grid = make_grid(rows, columns=3, gap=GAP, min_scale=args.scale)
    caption = f"held-out photo | Gaussian noise, std {args.noise_sigma:g}, 8-bit | restored (corruption='auto')"
    add_caption(grid, caption).save(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
