"""Restoration scored on held-out images: each corruption case restored by the pipeline and compared with the clean
images, beside the corrupted input and a median filter."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data.corruptions import apply_corruption, gaussian_noise
from .defaults import DEFAULT_RESTORATION_CASES
from .metrics import Metric, Reference, median_filter, restoration_metrics


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

    Returns:
        One row per case: `case`, `method`, `psnr_input` / `psnr` / `psnr_median_filter` (dB, of the set's mean squared
        error; the corrupted images are rounded to 8 bits first, as a saved image would be), mean `ssim_input` /
        `ssim` / `ssim_median_filter`, and with labels `accuracy_input` / `accuracy` / `accuracy_median_filter`.
    """
    from tqdm.auto import tqdm

    from ..pipelines.restoration import plan_restoration

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
            chunk = (corrupted[start:start + batch_size] + 1) / 2
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(chunk.shape[0])]
            out = pipeline(image=chunk.to(pipeline.device), generator=generators, output_type="pt", **kwargs).images
            restored.append(out.cpu() * 2 - 1)
        outputs = {"input": corrupted, "": torch.cat(restored), "median_filter": median_filter(corrupted)}
        row: dict[str, Any] = {"case": case_name(corruption, level), "method": "learned" if learned else plan.method}
        for suffix, output in outputs.items():
            for metric in metrics:
                row.update({f"{name}_{suffix}" if suffix else name: value
                            for name, value in metric.compute(output, reference).items()})
        rows.append(row)
    return rows
