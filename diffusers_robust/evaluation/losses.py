"""Validation losses: the denoising loss on held-out images (clean, corrupted, restoration) at a fixed evaluation seed."""

from collections.abc import Callable, Sequence

import torch

from ..data.corruptions import apply_corruption
from ..models import prediction_error
from .defaults import EVALUATION_SEED

# Evaluation draws (timesteps, noise, corruptions) come from EVALUATION_SEED, never from the training seed, so two runs'
# figures differ only by what they trained.

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
        per_sample = prediction_error(model, noisy, target, timesteps, labels)  # as in training
        total += per_sample.sum().item() * target[0].numel()
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
