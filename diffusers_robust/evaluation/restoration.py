"""Restoration scored on held-out images: each corruption case restored by the pipeline and compared with the clean
images, beside the corrupted input and a median filter."""

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..data.corruptions import apply_corruption, gaussian_blur, gaussian_noise
from ..data.units import to_model_range, to_unit_range
from ..pipelines.restoration import PHOTO_METHODS_PIXELS, plan_restoration, restoration_method, uses_separable_blur
from .defaults import DEFAULT_RESTORATION_CASES
from .metrics import Metric, Reference, mean_psnr, median_filter, restoration_metrics


def case_name(corruption: str, level: int | float) -> str:
    """`gaussian_noise/s3` for a table severity, `gaussian_noise/sigma0.3` for a float sigma."""
    return f"{corruption}/sigma{level:g}" if isinstance(level, float) else f"{corruption}/s{level}"


def corrupt_case(images: torch.Tensor, corruption: str, level: int | float, seed: int) -> torch.Tensor:
    """Corrupt `images` `(N, C, H, W)` for one case, with a generator seeded by `seed` and the case alone."""

    case_seed = int(np.random.SeedSequence([seed, *case_name(corruption, level).encode()]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(case_seed)
    if isinstance(level, float):
        corrupted = gaussian_noise(images, level, generator=generator)
    else:
        corrupted = apply_corruption(images, corruption, level, generator=generator)
    return ((corrupted + 1) * 127.5).round() / 127.5 - 1  # stored as 8-bit images are: restoration sees the rounding


# Corruptions whose classical baseline is a 3x3 median filter (isolated wrong pixels); noise-like ones get a Gaussian
# filter tuned on training images; linear operators get none (the pipeline inverts the exact operator, see `CAVEATS`).
MEDIAN_BASELINE = ("impulse_noise", "masking")
EXAMPLES = 4  # images per case kept for the before/after picture
LINEAR_OPERATOR_CASES = ("gaussian_blur", "pixelate", "contrast")
GAUSSIAN_FILTER_STDS = (0.5, 0.7, 0.9, 1.2, 1.6)  # pixels; the best on the training images is the baseline
CAVEATS = {name: "the restoration inverts the exact operator that made the damage (known kernel); a real blur or "
                 "resampling of unknown kernel gains less" for name in LINEAR_OPERATOR_CASES}


def classical_baseline(corruption: str, level: int | float, fit_images: torch.Tensor | None, seed: int):
    """The classical restorer a case is compared with: `(name, images -> images)`, or None (linear operators).

    Impulse noise and holes: a 3x3 median filter. Noise-like damage: a Gaussian filter whose std (from
    `GAUSSIAN_FILTER_STDS`, or none) gives the best PSNR on `fit_images` (training images, never the scored ones)
    corrupted the same way; without them, a 0.7 px filter."""
    if corruption in LINEAR_OPERATOR_CASES:
        return None
    if corruption in MEDIAN_BASELINE:
        return "median 3x3", median_filter
    best, best_psnr = 0.7, -math.inf
    if fit_images is not None:
        fit = fit_images[:200]
        corrupted = corrupt_case(fit, corruption, level, seed + 1)
        for std in (0.0, *GAUSSIAN_FILTER_STDS):
            value = mean_psnr(gaussian_blur(corrupted, std) if std else corrupted, fit)
            if value > best_psnr:
                best, best_psnr = std, value
    if best == 0:
        return "none (no Gaussian filter helps)", lambda images: images
    return f"Gaussian filter {best:g} px", lambda images: gaussian_blur(images, best)


@torch.no_grad()
def evaluate_restoration(
    pipeline,
    images: torch.Tensor,
    labels: np.ndarray | None = None,
    cases: Sequence[tuple[str, int | float]] = DEFAULT_RESTORATION_CASES,
    seed: int = 0,
    classifier=None,
    batch_size: int = 100,
    progress: bool = True,
    learned_restoration: bool = False,
    metrics: Sequence[Metric] | None = None,
    fit_images: torch.Tensor | None = None,
    on_case_done: Callable[[tuple[str, int | float]], None] | None = None,
) -> list[dict[str, Any]]:
    """
    Restore held-out images under each corruption case and score them against the clean images.

    Args:
        pipeline ([`RobustDDPMPipeline`]): restores with what each case tells it (the corruption and severity, or sigma).
        images (`torch.Tensor` of shape `(N, C, H, W)` in `[-1, 1]`): held-out clean images.
        labels (`np.ndarray` of shape `(N,)`, *optional*): their classes, for `classifier` accuracy (digits).
        seed (`int`): evaluation seed (corruption draws and the pipeline's generators), independent of training.
        learned_restoration (`bool`): use a restoration-trained pipeline's conditioned denoiser for the corruptions it
            was trained on (the pipeline's `learned_restoration`).
        metrics (list of [`Metric`], *optional*): the figures of each output; default [`restoration_metrics`] (PSNR,
            SSIM, and with `labels` and `classifier` the classifier's accuracy).
        fit_images (`torch.Tensor`, *optional*): training images `(M, C, H, W)` that tune the classical baseline
            ([`classical_baseline`]); never the scored ones.
        on_case_done (*optional*): called with each case when it is scored (the report's cost-weighted progress).

    Returns:
        One row per case: `case`, `method`, `baseline` (the classical restorer, or None for a linear operator),
        `caveat` (or None), `psnr_input` / `psnr` / `psnr_baseline` (dB, of the set's mean squared error; the corrupted
        images are rounded to 8 bits first, as a saved image would be), mean `ssim_input` / `ssim` / `ssim_baseline`,
        and with labels `accuracy_input` / `accuracy` / `accuracy_baseline` (baseline figures None without a baseline);
        `_examples` `(3, k, C, H, W)`: the first `EXAMPLES` clean, corrupted and restored images (for pictures).
    """
    from tqdm.auto import tqdm

    reference = Reference(images, labels)
    if metrics is None:
        metrics = restoration_metrics(classifier if labels is not None else None)
    rows = []
    for corruption, level in tqdm(cases, desc="restoration", disable=not progress):
        corrupted = corrupt_case(images, corruption, level, seed)
        kwargs = {"noise_sigma": level} if isinstance(level, float) else {"corruption": corruption, "severity": level}
        plan = plan_restoration(**kwargs)
        embedding = getattr(pipeline, "condition_embedding", None)
        learned = learned_restoration and embedding is not None and corruption in embedding.corruptions
        if learned:
            kwargs["learned_restoration"] = True
        restored = []
        for start in range(0, images.shape[0], batch_size):
            chunk = to_unit_range(corrupted[start:start + batch_size])
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(chunk.shape[0])]
            out = pipeline(image=chunk.to(pipeline.device), generator=generators, output_type="pt", **kwargs).images
            restored.append(to_model_range(out.cpu()))
        baseline = classical_baseline(corruption, level, fit_images, seed)
        outputs = {"input": corrupted, "": torch.cat(restored), "baseline": baseline[1](corrupted) if baseline else None}
        method = "learned" if learned else restoration_method(plan, *images.shape[-2:])
        row: dict[str, Any] = {"case": case_name(corruption, level), "method": method,
                               "baseline": baseline[0] if baseline else None,
                               "caveat": CAVEATS.get(corruption) if method == "linear" else None,
                               # the first images, for the report's before/after picture (not written to JSON)
                               "_examples": torch.stack([images[:EXAMPLES], corrupted[:EXAMPLES],
                                                         outputs[""][:EXAMPLES]])}
        for suffix, output in outputs.items():
            for metric in metrics:
                figures = metric.compute(output if output is not None else corrupted, reference)
                row.update({f"{name}_{suffix}" if suffix else name: value if output is not None else None
                            for name, value in figures.items()})
        rows.append(row)
        if on_case_done is not None:
            on_case_done((corruption, level))
    return rows


def case_cost(corruption: str, level: int | float, images: int, steps: int | None = None, size: tuple[int, int] = (8, 8)
              ) -> int:
    """Denoiser calls (times images) that restoring one case costs on images of `size` pixels, for a progress bar whose
    ETA holds: the noise method takes `steps or 1` calls, data consistency 50, RePaint inpainting about 100 (50 steps
    and their resampling jumps); from `PHOTO_METHODS_PIXELS` up inpainting and a Gaussian blur take 5, and all but data
    consistency average 8 views of the image per call (`dihedral_average`)."""
    plan = plan_restoration(**({"noise_sigma": level} if isinstance(level, float) else
                               {"corruption": corruption, "severity": level}))
    calls = {"inpaint": 100, "linear": 50}.get(restoration_method(plan, *size), steps or 1)
    photo = size[0] * size[1] >= PHOTO_METHODS_PIXELS
    if photo and (plan.method == "inpaint" or uses_separable_blur(plan, *size)):
        calls = 5
    if photo and calls != 50:
        calls *= 8
    return images * (calls + 1)  # + 1: the smoothed reference or the baseline's share of the work
