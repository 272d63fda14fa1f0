#!/usr/bin/env python
"""Restoration of held-out photos against scikit-image's restorers, every damaged image stored as 8-bit as a user's
files are.

    python benchmarks/restore_photos.py --pipeline outputs/photos --images 96 --output benchmarks/restore_photos.json

The held-out tiles of the embedded photos (`--size` 32, 64 or 128 pixels; photographs the pipeline never saw) are
damaged, rounded to 8 bits, and restored by this package (the named option, and `auto` where it applies) and by the
classical method a user would otherwise pick, each tuned on `--tune_images` tiles of the *training* photos (a grid over
its one parameter, best PSNR). Scores: PSNR of the set's mean squared error and mean SSIM (scikit-image's metrics,
data range 1).
Prints a Markdown table, then what `auto` detected on the clean tiles and on each case it scores (a confusion table);
`--output` also writes the figures as JSON. One thread, fixed seeds.
"""

import argparse
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import PIL.Image
import PIL.ImageFilter
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers_robust import RobustDDPMPipeline  # noqa: E402
from diffusers_robust.data.photos import photo_tiles  # noqa: E402

# Case name -> (damage, keyword arguments of this package's named option). Damage works on (N, H, W, 3) uint8.
SALT_AND_PEPPER = 0.05  # share of pixels set to black or white (all channels)
MISSING = 0.5  # share of pixels lost (black), with the mask known


def _gaussian(std: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    return lambda images, rng: images / 255 + std * rng.standard_normal(images.shape)


def _salt_and_pepper(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hit = rng.random(images.shape[:3]) < SALT_AND_PEPPER
    value = (rng.random(images.shape[:3]) < 0.5).astype(np.float64)
    return np.where(hit[..., None], value[..., None], images / 255)


def _missing(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.where((rng.random(images.shape[:3]) < MISSING)[..., None], 0.0, images / 255)


def _pil(make_filter=None, quality: int | None = None):
    def damage(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = []
        for image in images:
            picture = PIL.Image.fromarray(image)
            if quality is not None:
                buffer = io.BytesIO()
                picture.save(buffer, format="JPEG", quality=quality)
                picture = PIL.Image.open(buffer).convert("RGB")
            else:
                picture = picture.filter(make_filter())
            out.append(np.asarray(picture) / 255)
        return np.stack(out)

    return damage


CASES = {
    "gaussian std 0.05": (_gaussian(0.05), {"noise_sigma": 0.05}),
    "gaussian std 0.1": (_gaussian(0.1), {"noise_sigma": 0.1}),
    "gaussian std 0.2": (_gaussian(0.2), {"noise_sigma": 0.2}),
    f"salt-and-pepper {SALT_AND_PEPPER:.0%}": (_salt_and_pepper, {"corruption": "salt_and_pepper"}),
    f"{MISSING:.0%} missing pixels (mask known)": (_missing, {"mask": True}),
    "blur 1 px (known)": (_pil(lambda: PIL.ImageFilter.GaussianBlur(1)), {"blur_sigma": 1.0}),
    "blur 2 px (known)": (_pil(lambda: PIL.ImageFilter.GaussianBlur(2)), {"blur_sigma": 2.0}),
    "blur 1 px (estimated)": (_pil(lambda: PIL.ImageFilter.GaussianBlur(1)), {"corruption": "gaussian_blur"}),
    "blur 2 px (estimated)": (_pil(lambda: PIL.ImageFilter.GaussianBlur(2)), {"corruption": "gaussian_blur"}),
    "JPEG quality 10": (_pil(quality=10), {"corruption": "jpeg_compression"}),
    "JPEG quality 30": (_pil(quality=30), {"corruption": "jpeg_compression"}),
}
# Cases where `auto` (detection, with no mask) is scored beside the named option; their detections make the table.
AUTO_CASES = ("gaussian std 0.05", "gaussian std 0.1", "gaussian std 0.2", f"salt-and-pepper {SALT_AND_PEPPER:.0%}",
              f"{MISSING:.0%} missing pixels (mask known)", "blur 1 px (known)", "blur 2 px (known)", "JPEG quality 10",
              "JPEG quality 30")
DETECTED = ("clean", "gaussian_noise", "impulse_noise", "masking", "gaussian_blur")


def as_8bit(images: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.clip(images, 0, 1) * 255), 0, 255).astype(np.uint8)


def scores(restored: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) of the set's mean squared error, as `diffusers-robust evaluate` reports it (a mean of per-image PSNRs
    would be led by the flat tiles, where any error is tiny), and mean SSIM; scikit-image's metrics, data range 1.
    Both inputs `(N, H, W, 3)` in `[0, 1]`."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr = peak_signal_noise_ratio(clean.reshape(-1), restored.reshape(-1), data_range=1.0)
    ssims = [structural_similarity(c, r, data_range=1.0, channel_axis=2, win_size=7)
             for r, c in zip(restored, clean, strict=True)]
    return float(psnr), float(np.mean(ssims))


def _blur_psf(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _per_channel(function, image: np.ndarray) -> np.ndarray:
    return np.stack([function(image[..., c]) for c in range(image.shape[-1])], axis=-1)


def baselines(case: str) -> dict[str, tuple[Callable, list]]:
    """The classical methods for `case`: name -> (restore(image, parameter, context) -> image, parameter grid)."""
    from skimage import filters, morphology, restoration

    def level(image):
        # A channel without one nonzero diagonal wavelet detail (a flat, near-white JPEG tile) has no noise to read:
        # scikit-image returns NaN for it with a "Mean of empty slice" warning; it reads 0 here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
            warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
            return float(np.mean(np.nan_to_num(restoration.estimate_sigma(image, channel_axis=-1), nan=0.0)))

    denoisers = {
        "non-local means": (lambda y, k, _: restoration.denoise_nl_means(
            y, h=k * max(level(y), 1e-3), sigma=level(y), patch_size=5, patch_distance=6, fast_mode=True,
            channel_axis=-1), [0.4, 0.6, 0.8, 1.0, 1.2]),
        "wavelet (BayesShrink)": (lambda y, k, _: restoration.denoise_wavelet(
            y, sigma=k * max(level(y), 1e-3), method="BayesShrink", mode="soft", channel_axis=-1, rescale_sigma=True),
            [0.5, 0.75, 1.0, 1.5]),
        "total variation": (lambda y, w, _: restoration.denoise_tv_chambolle(y, weight=w, channel_axis=-1),
                            [0.02, 0.05, 0.1, 0.15, 0.2]),
    }
    if case.startswith(("gaussian", "JPEG")):
        return denoisers
    if case.startswith("salt"):
        return {"median": (lambda y, r, _: _per_channel(lambda c: filters.median(c, morphology.disk(r)), y), [1, 2]),
                **{name: denoisers[name] for name in ("non-local means",)}}
    if "missing" in case:
        return {"biharmonic inpainting": (lambda y, _, mask: restoration.inpaint_biharmonic(y, mask, channel_axis=-1),
                                          [None])}
    if case.startswith("blur"):
        return {
            "Richardson-Lucy": (lambda y, n, sigma: _per_channel(lambda c: restoration.richardson_lucy(
                c, _blur_psf(sigma), num_iter=n, clip=True), y), [5, 10, 20, 40]),
            "Wiener": (lambda y, b, sigma: _per_channel(lambda c: np.clip(restoration.wiener(
                c, _blur_psf(sigma), balance=b, clip=False), 0, 1), y), [0.003, 0.01, 0.03, 0.1]),
        }
    raise ValueError(case)


def _contexts(case: str, damaged: np.ndarray, masks: np.ndarray) -> list:
    """What a classical method is given beside the image: the mask (missing pixels) or the blur std (known or estimated
    the way this package estimates it)."""
    if "missing" in case:
        return list(masks)
    if case.startswith("blur"):
        if "known" in case:
            return [float(case.split()[1])] * len(damaged)
        from diffusers_robust.pipelines.restoration import ESTIMATED_BLUR_SHARE, added_blur_sigma

        images = torch.tensor(damaged, dtype=torch.float32).permute(0, 3, 1, 2) * 2 - 1
        return [max(ESTIMATED_BLUR_SHARE * float(s), 0.3) for s in added_blur_sigma(images)]
    return [None] * len(damaged)


def damage(case: str, clean: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The 8-bit damaged images `(N, H, W, 3)` in `[0, 1]` and the missing-pixel masks `(N, H, W)` (bool)."""
    rng = np.random.default_rng(seed)
    damaged = as_8bit(CASES[case][0](clean, rng)) / 255
    # `_missing` drew its mask first from the same seed.
    masks = (np.random.default_rng(seed).random(clean.shape[:3]) < MISSING if "missing" in case
             else np.zeros(clean.shape[:3], dtype=bool))
    return damaged, masks


def best_baseline(case: str, name: str, train: np.ndarray) -> object:
    """The grid value of baseline `name` with the best mean PSNR on the damaged training tiles."""
    method, grid = baselines(case)[name]
    if len(grid) == 1:
        return grid[0]
    damaged, masks = damage(case, train, seed=1)
    contexts = _contexts(case, damaged, masks)
    clean = train / 255
    results = {value: scores(np.stack([np.clip(method(y, value, c), 0, 1) for y, c in zip(damaged, contexts, strict=True)]),
                             clean)[0] for value in grid}
    return max(results, key=results.get)


def ours(pipe: RobustDDPMPipeline, case: str, damaged: np.ndarray, masks: np.ndarray, auto: bool
         ) -> tuple[np.ndarray, list[str]]:
    """This package's restoration of `damaged` `(N, H, W, 3)`, named or `auto`, and what `auto` detected per image."""
    options = {"corruption": "auto"} if auto else dict(CASES[case][1])
    if options.get("mask"):
        options["mask"] = masks[..., None].astype(np.float32)
    out, detected = [], []
    for start in range(0, len(damaged), 32):
        batch = {key: value[start:start + 32] if isinstance(value, np.ndarray) else value for key, value in options.items()}
        generator = [torch.Generator().manual_seed(start + i) for i in range(min(32, len(damaged) - start))]
        output = pipe(image=damaged[start:start + 32].astype(np.float32), generator=generator, output_type="np", **batch)
        out.append(output.images)
        detected += [found.corruption or "clean" for found in (output.detections or [])]
    return np.concatenate(out), detected


def detection_table(detections: dict[str, list[str]]) -> str:
    """Markdown: rows the true damage, columns what `auto` found, in % of the images."""
    lines = [f"| true damage | {' | '.join(DETECTED)} |", "|---|" + "---|" * len(DETECTED)]
    for case, found in detections.items():
        shares = [f"{100 * found.count(kind) / len(found):.0f}" for kind in DETECTED]
        lines.append(f"| {case} | {' | '.join(shares)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="a RobustDDPMPipeline folder trained on photos")
    parser.add_argument("--size", type=int, default=32, help="held-out tile side in pixels (32, 64 or 128)")
    parser.add_argument("--images", type=int, default=96, help="held-out tiles per case (spread over both photos)")
    parser.add_argument("--tune_images", type=int, default=32, help="training tiles the baselines are tuned on")
    parser.add_argument("--cases", nargs="*", default=None, help=f"a subset of: {list(CASES)}")
    parser.add_argument("--output", default=None, help="JSON file for the figures (a new file: an existing one is refused)")
    args = parser.parse_args()
    if args.output and os.path.exists(args.output):
        parser.error(f"--output {args.output} exists: this benchmark never replaces a file; name a new one")
    if args.cases and set(args.cases) - set(CASES):
        parser.error(f"unknown --cases {sorted(set(args.cases) - set(CASES))}; known: {list(CASES)}")
    torch.set_num_threads(1)
    pipe = RobustDDPMPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    test, _ = photo_tiles(args.size, "test")
    train, _ = photo_tiles(args.size, "train")
    rng = np.random.default_rng(0)
    test = test[np.sort(rng.permutation(len(test))[: args.images])]
    train = train[np.sort(rng.permutation(len(train))[: args.tune_images])]
    clean = test / 255
    rows = []
    print(f"| damage ({len(test)} held-out {args.size}x{args.size} photos, 8-bit) | input | ours (named) | ours (auto) | "
          "best classical | each classical |\n|---|---|---|---|---|---|")
    detections = {"clean": [found.corruption or "clean" for start in range(0, len(clean), 32)
                            for found in pipe.detect_corruption(clean[start:start + 32].astype(np.float32))]}
    for case in args.cases or CASES:
        started = time.perf_counter()
        damaged, masks = damage(case, test, seed=0)
        row = {"case": case, "input": scores(damaged, clean), "ours": scores(ours(pipe, case, damaged, masks, False)[0], clean)}
        row["auto"] = None
        if case in AUTO_CASES:
            restored, detections[case] = ours(pipe, case, damaged, masks, auto=True)
            row["auto"] = scores(restored, clean)
        contexts = _contexts(case, damaged, masks)
        row["classical"] = {}
        for name, (method, _) in baselines(case).items():
            value = best_baseline(case, name, train)
            restored = np.stack([np.clip(method(y, value, c), 0, 1) for y, c in zip(damaged, contexts, strict=True)])
            row["classical"][name] = {"parameter": value, "scores": scores(restored, clean)}
        best = max(row["classical"], key=lambda name: row["classical"][name]["scores"][0])
        row["best_classical"] = best
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)

        def cell(figures):
            return "-" if figures is None else f"{figures[0]:.2f} / {figures[1]:.3f}"

        each = "; ".join(f"{name} {cell(entry['scores'])}" for name, entry in row["classical"].items())
        print(f"| {case} | {cell(row['input'])} | {cell(row['ours'])} | {cell(row['auto'])} | "
              f"{best} {cell(row['classical'][best]['scores'])} | {each} |", flush=True)
    print(f"\nWhat `auto` detected (% of the {len(test)} images):\n\n{detection_table(detections)}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"pipeline": args.pipeline, "size": args.size, "images": len(test), "rows": rows,
                       "detections": detections}, handle, indent=2)


if __name__ == "__main__":
    main()
