"""Evaluation: validation losses (clean, corrupted, restoration) at fixed evaluation seeds, restoration scored per
corruption case, sample grids, and the digits quality score. `report.py` assembles them into the held-out report."""

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .corruptions import apply_corruption
from .metrics import digits_classifier, digits_probabilities

# Evaluation draws (timesteps, noise, corruptions) come from this seed, never from the training seed, so two runs'
# figures differ only by what they trained.
EVALUATION_SEED = 1234

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
LabelsFor = Callable[[str, int, int], torch.Tensor | None]


@torch.no_grad()
def denoising_loss(
    model: Denoiser,
    scheduler,
    images: torch.Tensor,
    corruption: str | None = None,
    severity: int | None = None,
    restoration: bool = False,
    labels_for: LabelsFor | None = None,
    seed: int = EVALUATION_SEED,
    batch_size: int = 64,
) -> float:
    """
    Mean squared error of the model's prediction on held-out images, with timesteps and noise fixed by `seed`.

    Clean (`corruption=None`): `x0` is the held-out image. Under a corruption with `restoration=False`, `x0` is the
    corrupted image: how well the model knows the corrupted distribution. With `restoration=True`, `x_t` is built from the
    corrupted image and the target from the clean one (as `restoration_training` trains): how well it undoes the damage.
    The same timesteps and noise serve every case, so the figures are comparable.

    Args:
        model: `model(x_t, t, labels)` returning the prediction `(B, C, H, W)`; `labels` is None or `(B, L)`.
        scheduler: a robust scheduler (its `prediction_type` defines the target; no input perturbation is used).
        images (`torch.Tensor` of shape `(N, C, H, W)` in `[-1, 1]`), on the model's device.
        labels_for: `(corruption, severity, batch) -> labels` for a model conditioned on corruption labels.
    """
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, images.shape[0], batch_size):
        clean = images[start : start + batch_size]
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator)
        timesteps = timesteps.to(clean.device)
        noise = torch.randn(clean.shape, generator=generator).to(clean.device)
        corrupted = clean
        if corruption is not None:
            corrupted = apply_corruption(clean, corruption, severity, generator=torch.Generator().manual_seed(seed + start))
        target_images, target_noise = corrupted, noise
        if restoration:
            target_images, target_noise = clean, scheduler.restoration_noise(clean, corrupted, noise, timesteps)
        noisy = scheduler.add_noise(corrupted, noise, timesteps)
        target = scheduler.training_target(target_images, target_noise, timesteps)
        labels = labels_for(corruption, severity, clean.shape[0]) if labels_for and restoration and corruption else None
        prediction = model(noisy, timesteps, labels)
        total += F.mse_loss(prediction.float(), target.float(), reduction="sum").item()
        count += target.numel()
    return total / count


def validation_losses(
    model: Denoiser,
    scheduler,
    images: torch.Tensor,
    corruptions: Sequence[str],
    severities: Sequence[int] = (1, 3, 5),
    labels_for: LabelsFor | None = None,
    seed: int = EVALUATION_SEED,
) -> dict[str, float]:
    """`{"clean": loss, "<corruption>/s<severity>": loss, "restore/<corruption>/s<severity>": loss, ...}` from
    [`denoising_loss`]: clean, the corrupted distribution, and restoration (corrupted input, clean target)."""
    losses = {"clean": denoising_loss(model, scheduler, images, seed=seed)}
    for name in corruptions:
        for severity in severities:
            losses[f"{name}/s{severity}"] = denoising_loss(model, scheduler, images, name, severity, seed=seed)
            losses[f"restore/{name}/s{severity}"] = denoising_loss(model, scheduler, images, name, severity, True,
                                                                   labels_for, seed=seed)
    return losses


def make_grid(images: np.ndarray, columns: int | None = None) -> PIL.Image.Image:
    """Tile images (numpy `(B, H, W, C)` in `[0, 1]`, as `output_type="np"` returns them) into one grid image."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import make_image_grid

    pictures = DiffusionPipeline.numpy_to_pil(images)
    columns = columns or math.ceil(math.sqrt(len(pictures)))
    rows = math.ceil(len(pictures) / columns)
    blank = PIL.Image.new(pictures[0].mode, pictures[0].size)
    return make_image_grid(pictures + [blank] * (rows * columns - len(pictures)), rows=rows, cols=columns)


def digits_quality(images: np.ndarray, confidence: float = 0.8, classifier=None) -> dict[str, float | list[int]]:
    """
    Score generated digits with a classifier trained on the real digits.

    Args:
        images (`np.ndarray` of shape `(N, H, W, 1)` in `[0, 1]`): generated samples at any resolution;
            they are area-resized to 8x8 like the real digits.

    Returns:
        `confident_fraction` (share of samples whose top class probability is at least `confidence`),
        `class_counts` (predicted class histogram, 10 entries), `classes_present` and `class_entropy_bits` (of the
        predicted classes; log2(10) = 3.32 when every class is equally common).
    """
    classifier = classifier or digits_classifier()
    tensor = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1
    probabilities = digits_probabilities(tensor, classifier)
    predicted = probabilities.argmax(axis=1)
    counts = np.bincount(predicted, minlength=10)
    shares = counts[counts > 0] / counts.sum()
    return {
        "confident_fraction": float((probabilities.max(axis=1) >= confidence).mean()),
        "class_counts": counts.tolist(),
        "classes_present": int((counts > 0).sum()),
        "class_entropy_bits": float(-(shares * np.log2(shares)).sum()),
    }


def stack_images(batches: Iterable[torch.Tensor], limit: int) -> torch.Tensor:
    """Concatenate batches `(B, C, H, W)` until `limit` images."""
    collected, total = [], 0
    for batch in batches:
        collected.append(batch)
        total += batch.shape[0]
        if total >= limit:
            break
    return torch.cat(collected)[:limit]


# Restoration cases of the evaluation: (corruption, severity) from the table, or ("gaussian_noise", sigma) with a float
# sigma in [0, 1] units for noise beyond the table's (whose severities barely touch 8x8 digits).
DEFAULT_RESTORATION_CASES: tuple[tuple[str, int | float], ...] = (
    *(("gaussian_noise", s) for s in (1, 3, 5)), *(("gaussian_noise", sigma) for sigma in (0.2, 0.3, 0.5)),
    *(("impulse_noise", s) for s in (1, 3, 5)), *(("masking", s) for s in (1, 3, 5)),
    *(("gaussian_blur", s) for s in (1, 3, 5)),
    *((name, 3) for name in ("shot_noise", "speckle_noise", "jpeg_compression", "contrast", "brightness", "pixelate")),
)


def case_name(corruption: str, level: int | float) -> str:
    """`gaussian_noise/s3` for a table severity, `gaussian_noise/sigma0.3` for a float sigma."""
    return f"{corruption}/sigma{level:g}" if isinstance(level, float) else f"{corruption}/s{level}"


def corrupt_case(images: torch.Tensor, corruption: str, level: int | float, seed: int) -> torch.Tensor:
    """Corrupt `images` `(N, C, H, W)` for one case, with a generator seeded by `seed` and the case alone."""
    from .corruptions import gaussian_noise

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

    Returns:
        One row per case: `case`, `method`, `psnr_input` / `psnr` / `psnr_median_filter` (dB, of the set's mean squared
        error; the corrupted images are rounded to 8 bits first, as a saved image would be), mean `ssim_input` /
        `ssim` / `ssim_median_filter`, and with labels `accuracy_input` / `accuracy` / `accuracy_median_filter`.
    """
    from tqdm.auto import tqdm

    from .metrics import digits_probabilities, mean_psnr, median_filter, ssim
    from .restoration import plan_restoration

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
            key = f"_{suffix}" if suffix else ""
            row[f"psnr{key}"] = mean_psnr(output, images)
            row[f"ssim{key}"] = float(ssim(output, images).mean())
            if labels is not None and classifier is not None:
                row[f"accuracy{key}"] = float((digits_probabilities(output, classifier).argmax(1) == labels).mean())
        rows.append(row)
    return rows
