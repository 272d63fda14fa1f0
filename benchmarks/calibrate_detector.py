#!/usr/bin/env python
"""Re-measure the digits' detector constants (`NOISE_RATIO`, `BLUR_HIGH_FREQUENCY`, `SEVERITY_TEST_CUTOFF` in
`diffusers_robust/pipelines/detection.py`) on the train split of the digits, with a prior trained on clean digits.

    python benchmarks/calibrate_detector.py --pipeline runs/imperfect-ref/oracle-seed0 --images 300 \\
        --write benchmarks/detector_calibration.json

The first `--images` train digits, clean and damaged (seeded), stored as 8-bit images would be:
- `noise_ratio`: the median of the prior's change over the level (`noise_ratios`) at each level of `NOISE_LEVELS`, for
  clean digits (which must stay under `NOISE_RATIO` at every level) and for Gaussian noise of std 0.05, 0.1, 0.2, 0.3
  (which must reach it at their own level);
- `high_frequency`: per image, the Haar diagonal noise estimate over the level the prior finds, for noisy and blurred
  digits (noise keeps it above `BLUR_HIGH_FREQUENCY`, blur takes it below);
- `severity_right`: the share of blurred digits whose severity `blur_severity` picks right, at each tested cutoff.

With `--write`, the figures go to a JSON file beside the constants they were measured with;
`tests/test_detection.py` checks that the code's constants are those and that the figures support them. One thread.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers_robust import RobustDDPMPipeline  # noqa: E402
from diffusers_robust.data.corruptions import apply_corruption  # noqa: E402
from diffusers_robust.data.datasets import load_digits_dataset  # noqa: E402
from diffusers_robust.pipelines import detection  # noqa: E402
from diffusers_robust.pipelines.restoration import estimate_noise_sigma  # noqa: E402

NOISE_STDS = (0.05, 0.1, 0.2, 0.3)
CUTOFFS = (0.01, 0.02, 0.05, 0.1)


def as_8bit(images: torch.Tensor) -> torch.Tensor:
    """What a PNG holds: values clipped to `[0, 1]` and rounded to 1/255, back in `[-1, 1]`."""
    return ((images + 1) / 2).clamp(0, 1).mul(255).round().div(255).mul(2).sub(1)


def damaged_digits(clean: torch.Tensor) -> dict[str, torch.Tensor]:
    """The cases, each `(N, 1, 8, 8)` in `[-1, 1]`, 8-bit: clean, Gaussian noise of each std and at table severities 3
    and 5, blur at severities 1..5."""
    cases = {"clean": clean}
    for std in NOISE_STDS:
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(int(std * 1000)))
        cases[f"std {std:g}"] = clean + 2 * std * noise
    for name, severities in (("gaussian_noise", (3, 5)), ("gaussian_blur", (1, 2, 3, 4, 5))):
        for severity in severities:
            generator = torch.Generator().manual_seed(severity)
            cases[f"{name}/s{severity}"] = apply_corruption(clean, name, severity, generator=generator)
    return {name: as_8bit(images) for name, images in cases.items()}


def measure(pipe: RobustDDPMPipeline, clean: torch.Tensor) -> dict:
    """The figures of the module docstring, measured with `pipe`'s prior on `clean` `(N, 1, 8, 8)`."""
    denoiser, alphas = pipe._denoiser(), pipe.scheduler.alphas_cumprod
    figures = {"noise_ratio": {}, "high_frequency": {}, "severity_right": {}}
    for name, images in damaged_digits(clean).items():
        ratios = detection.noise_ratios(denoiser, alphas, images)
        figures["noise_ratio"][name] = [round(float(v), 4) for v in ratios.median(dim=0).values]
        if name != "clean":
            level = detection.level_from_ratios(ratios)
            readings = (estimate_noise_sigma(images).double() / level.clamp_min(1e-3))[level > 0]
            figures["high_frequency"][name] = sorted(round(float(v), 4) for v in readings)
        if name.startswith("gaussian_blur"):
            truth = int(name[-1])
            figures["severity_right"][name] = {
                f"{cutoff:g}": float((detection.blur_severity(denoiser, alphas, images, cutoff) == truth).double().mean())
                for cutoff in CUTOFFS}
    return figures


def severity_cutoff(figures: dict) -> float:
    """The rule behind `SEVERITY_TEST_CUTOFF`: the largest tested cutoff whose mean share of severities picked right is
    within 1 point of the best (a larger cutoff amplifies less of the image's own noise)."""
    rows = list(figures["severity_right"].values())
    shares = {float(cutoff): np.mean([row[cutoff] for row in rows]) for cutoff in rows[0]}
    return max(cutoff for cutoff, share in shares.items() if share >= max(shares.values()) - 0.01)


def worst_blur_error(figures: dict, threshold: float) -> float:
    """The rule behind `BLUR_HIGH_FREQUENCY`: the worst share of errors over the cases at `threshold`, noisy digits read
    as blurred (under it) or blur of severity 3-5 missed (at or above it), among the images the prior finds noisy (0
    where it finds none)."""
    errors = [np.mean(np.asarray(readings) < threshold if name.startswith(("std", "gaussian_noise"))
                      else np.asarray(readings) >= threshold)
              for name, readings in figures["high_frequency"].items()
              if readings and not name.startswith(("gaussian_blur/s1", "gaussian_blur/s2"))]
    return float(max(errors, default=0.0))


def noise_ratio_bounds(figures: dict) -> tuple[float, float, float]:
    """The figures behind `NOISE_RATIO`: the clean digits' peak median ratio over the levels, and the least and most
    median ratio of noisy digits at their own level."""
    ratios, levels = figures["noise_ratio"], list(detection.NOISE_LEVELS)
    own = [ratios[f"std {std:g}"][levels.index(std)] for std in NOISE_STDS]
    return max(ratios["clean"]), min(own), max(own)


def one_line_per_entry(record: dict) -> str:
    """JSON with each top-level entry, and each entry of a top-level object, on a line of its own (diffs stay readable)."""
    lines = []
    for key, value in record.items():
        if isinstance(value, dict):
            inner = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()]
            lines.append(f" {json.dumps(key)}: {{\n" + ",\n".join(inner) + "\n }")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="a RobustDDPMPipeline folder trained on clean digits")
    parser.add_argument("--images", type=int, default=300, help="train digits per case")
    parser.add_argument("--write", default=None, help="JSON file for the figures and the constants they were taken with")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = RobustDDPMPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    train = load_digits_dataset()["train"]
    clean = torch.tensor(np.stack([np.asarray(image, dtype=np.float32) for image in train["image"][: args.images]]))
    figures = measure(pipe, clean[:, None] / 127.5 - 1)
    clean_peak, own_least, own_most = noise_ratio_bounds(figures)
    print(f"NOISE_RATIO {detection.NOISE_RATIO}: clean digits' median change/level peaks at {clean_peak:.2f}; noisy "
          f"digits' at their own level {own_least:.2f}-{own_most:.2f} (std {', '.join(f'{s:g}' for s in NOISE_STDS)})")
    best = min(np.arange(0.2, 0.6, 0.01), key=lambda t: worst_blur_error(figures, t))
    worst = worst_blur_error(figures, detection.BLUR_HIGH_FREQUENCY)
    print(f"BLUR_HIGH_FREQUENCY {detection.BLUR_HIGH_FREQUENCY}: worst error {worst:.1%} "
          f"(fewest at {best:.2f}: {worst_blur_error(figures, best):.1%}); per case, 1% / 50% / 99% quantiles, share under it")
    for name, readings in figures["high_frequency"].items():
        if readings:
            q1, q50, q99 = np.quantile(readings, [0.01, 0.5, 0.99])
            under = np.mean(np.asarray(readings) < detection.BLUR_HIGH_FREQUENCY)
            print(f"  {name:<18} {q1:.2f} / {q50:.2f} / {q99:.2f}  under: {under:.0%} of {len(readings)}")
    print(f"SEVERITY_TEST_CUTOFF {detection.SEVERITY_TEST_CUTOFF} (the rule picks {severity_cutoff(figures):g}): severity "
          f"picked right at cutoffs {CUTOFFS}")
    for name, shares in figures["severity_right"].items():
        print(f"  {name:<18} " + " / ".join(f"{share:.1%}" for share in shares.values()))
    if args.write:
        constants = {name: getattr(detection, name) for name in ("NOISE_RATIO", "BLUR_HIGH_FREQUENCY", "SEVERITY_TEST_CUTOFF",
                                                                 "NOISE_LEVELS")}
        record = {"pipeline": os.path.basename(os.path.normpath(args.pipeline)), "images": len(clean), "split": "train",
                  "constants": constants, **figures}
        with open(args.write, "w") as handle:
            handle.write(one_line_per_entry(record))
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
