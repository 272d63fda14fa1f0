"""Evaluation: denoising loss clean and under corruption, sample grids, and the digits quality score."""

import math
from collections.abc import Iterable, Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .corruptions import apply_corruption


@torch.no_grad()
def denoising_loss(
    model: torch.nn.Module,
    scheduler,
    images: torch.Tensor,
    generator_seed: int = 0,
    corruption: str | None = None,
    severity: int | None = None,
    batch_size: int = 64,
) -> float:
    """
    Mean squared error of the model's prediction on held-out images, with fixed timesteps and noise.

    Clean: `x0` is the held-out image. Under a corruption, `x0` is the corrupted image, so the figure says how
    well the model denoises inputs from that corrupted distribution. Same seed, same timesteps and noise for
    every corruption, so the numbers are comparable.

    Args:
        model: called as `model(x_t, t)` and returning the prediction `(B, C, H, W)`.
        scheduler: a robust scheduler (its `prediction_type` defines the target; no input perturbation is used).
        images (`torch.Tensor` of shape `(N, C, H, W)` in `[-1, 1]`).
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(generator_seed)
    total, count = 0.0, 0
    for start in range(0, images.shape[0], batch_size):
        x0 = images[start : start + batch_size].to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        if corruption is not None:
            x0 = apply_corruption(x0, corruption, severity, generator=torch.Generator().manual_seed(generator_seed + start))
        timesteps = timesteps.to(device)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        target = scheduler.training_target(x0, noise, timesteps)
        prediction = model(noisy, timesteps)
        total += F.mse_loss(prediction.float(), target.float(), reduction="sum").item()
        count += target.numel()
    return total / count


def validation_losses(
    model: torch.nn.Module,
    scheduler,
    images: torch.Tensor,
    corruptions: Sequence[str],
    severities: Sequence[int] = (1, 3, 5),
    seed: int = 0,
) -> dict[str, float]:
    """`{"clean": loss, "<corruption>/s<severity>": loss, ...}` from [`denoising_loss`]."""
    losses = {"clean": denoising_loss(model, scheduler, images, seed)}
    for name in corruptions:
        for severity in severities:
            losses[f"{name}/s{severity}"] = denoising_loss(model, scheduler, images, seed, name, severity)
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


def digits_classifier(seed: int = 0):
    """A calibrated RBF-SVM on scikit-learn's 8x8 digits (all 1797), inputs `(N, 64)` with values 0..16.

    Chosen because it is not confident on garbage: trained on 1400 digits it gives 97% accuracy on the other
    397, top probability >= 0.8 for 86% of them, for 0% of uniform or Gaussian noise images and 28% of
    50/50 blends of two digits. (Logistic regression is confident on 85% of uniform noise.)
    """
    import warnings

    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    with warnings.catch_warnings():
        # SVC's built-in Platt scaling is deprecated in favour of CalibratedClassifierCV, but the latter is
        # confident on 96% of uniform-noise images here; Platt scaling is the calibration we want.
        warnings.simplefilter("ignore", FutureWarning)
        classifier = SVC(gamma=0.001, C=10.0, probability=True, random_state=seed)
        return classifier.fit(digits.data, digits.target)


def digits_quality(images: np.ndarray, confidence: float = 0.8, classifier=None) -> dict[str, float | list[int]]:
    """
    Score generated digits with a classifier trained on the real digits.

    Args:
        images (`np.ndarray` of shape `(N, H, W, 1)` in `[0, 1]`): generated samples at any resolution;
            they are area-resized to 8x8 like the real digits.

    Returns:
        `confident_fraction` (share of samples whose top class probability is at least `confidence`),
        `class_counts` (predicted class histogram, 10 entries) and `classes_present`.
    """
    classifier = classifier or digits_classifier()
    tensor = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    small = F.interpolate(tensor, size=(8, 8), mode="area")[:, 0].reshape(len(images), 64).numpy() * 16.0
    probabilities = classifier.predict_proba(small)
    predicted = probabilities.argmax(axis=1)
    counts = np.bincount(predicted, minlength=10)
    return {
        "confident_fraction": float((probabilities.max(axis=1) >= confidence).mean()),
        "class_counts": counts.tolist(),
        "classes_present": int((counts > 0).sum()),
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
