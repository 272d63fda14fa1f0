#!/usr/bin/env python
"""How well `corruption="auto"` (and `diffusers-robust restore` with no option) detects the damage, on held-out digits.

    python benchmarks/restore_detector.py --pipeline runs/imperfect/oracle-seed0 --images 300 --psnr_images 100

Every corruption of the table at every severity (and clean images) is applied to the first `--images` held-out digits
(the test split; the detector's thresholds were set on the train split), saved as 8-bit images would be, and detected.
Prints the confusion table (rows: true damage; columns: what the detector said, in % of the images) and, for Gaussian
noise s3, impulse noise s3 and blur s3, the PSNR (of the set's mean squared error, as the evaluation reports it) of
`auto` beside the named option on `--psnr_images` images. The
pipeline should be a model trained on clean digits. One thread, fixed seeds.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers_robust import RobustDDPMPipeline  # noqa: E402
from diffusers_robust.data.corruptions import CORRUPTIONS, apply_corruption  # noqa: E402
from diffusers_robust.data.datasets import load_digits_dataset  # noqa: E402
from diffusers_robust.evaluation.metrics import mean_psnr  # noqa: E402

DETECTED = ("clean", "gaussian_noise", "impulse_noise", "masking", "gaussian_blur")
NAMED = {"gaussian_noise": {"corruption": "gaussian_noise", "severity": 3},
         "impulse_noise": {"corruption": "impulse_noise", "severity": 3},
         "gaussian_blur": {"corruption": "gaussian_blur", "severity": 3}}


def as_8bit(images: torch.Tensor) -> torch.Tensor:
    """What a PNG holds: values clipped to `[0, 1]` and rounded to 1/255, back in `[-1, 1]`."""
    return ((images + 1) / 2).clamp(0, 1).mul(255).round().div(255).mul(2).sub(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="a RobustDDPMPipeline folder trained on clean digits")
    parser.add_argument("--images", type=int, default=300, help="held-out images per case for the confusion table")
    parser.add_argument("--psnr_images", type=int, default=100, help="held-out images per case for the PSNR rows")
    parser.add_argument("--psnr_only", action="store_true", help="only the PSNR table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = RobustDDPMPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    test = load_digits_dataset()["test"]
    clean = torch.tensor(np.stack([np.asarray(image, dtype=np.float32) for image in test["image"]]))[:, None] / 127.5 - 1
    clean = clean[: args.images]
    cases = [("clean", 0)] + [(name, severity) for name in CORRUPTIONS for severity in range(1, 6)]
    print(f"| true damage | {' | '.join(DETECTED)} |\n|---|{'---|' * len(DETECTED)}")
    for name, severity in cases if not args.psnr_only else []:
        generator = torch.Generator().manual_seed(severity)
        damaged = as_8bit(clean if name == "clean" else apply_corruption(clean, name, severity, generator=generator))
        found = [d.corruption or "clean" for d in pipe.detect_corruption(damaged.numpy().transpose(0, 2, 3, 1) / 2 + 0.5)]
        shares = [100 * found.count(kind) / len(found) for kind in DETECTED]
        label = name if name == "clean" else f"{name}/s{severity}"
        print(f"| {label} | " + " | ".join(f"{share:.0f}" for share in shares) + " |")
    print("\n| case | PSNR input | PSNR named option | PSNR auto | auto - named (dB) |\n|---|---|---|---|---|")
    subset = clean[: args.psnr_images]
    for name, named in NAMED.items():
        damaged = as_8bit(apply_corruption(subset, name, 3, generator=torch.Generator().manual_seed(3)))
        pixels = damaged.numpy().transpose(0, 2, 3, 1) / 2 + 0.5
        figures = [mean_psnr(damaged, subset)]
        for options in (named, {"corruption": "auto"}):
            generators = [torch.Generator().manual_seed(i) for i in range(len(subset))]
            restored = pipe(image=pixels, generator=generators, output_type="pt", **options).images * 2 - 1
            figures.append(mean_psnr(restored, subset))
        print(f"| {name}/s3 | {figures[0]:.2f} | {figures[1]:.2f} | {figures[2]:.2f} | {figures[2] - figures[1]:+.2f} |")


if __name__ == "__main__":
    main()
