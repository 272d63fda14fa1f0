"""Per-sample loss weights for diffusion training."""

import torch

from .schedulers.robust_noise import PREDICTION_TYPES


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio `a_t / (1 - a_t)` at `timesteps` (shape `(B,)`); 0 where `a_t = 0`."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].double()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, snr_gamma: float, prediction_type: str = "epsilon"
) -> torch.Tensor:
    r"""
    Min-SNR-gamma loss weights (Hang et al., ICCV 2023), finite for every timestep.

    The weight on the mean squared error of each sample is `min(SNR, g) / SNR` for `epsilon`,
    `min(SNR, g) / (SNR + 1)` for `v_prediction` and `min(SNR, g)` for `sample`. The epsilon weight is
    computed as `min(1, g / SNR)`, which is 1 (not NaN) where SNR is 0, as at the last timestep of a
    zero-terminal-SNR schedule (`rescale_betas_zero_snr=True`).

    Args:
        alphas_cumprod (`torch.Tensor` of shape `(T,)`): the scheduler's cumulative alphas.
        timesteps (`torch.LongTensor` of shape `(B,)`): training timesteps.
        snr_gamma (`float`): the clamp `g`, > 0 (5.0 in the paper).
        prediction_type (`str`): `"epsilon"`, `"v_prediction"` or `"sample"`.

    Returns:
        `torch.Tensor` of shape `(B,)`, float32.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import DDPMScheduler
    >>> from diffusers_robust.losses import min_snr_weights
    >>> s = DDPMScheduler(rescale_betas_zero_snr=True)
    >>> min_snr_weights(s.alphas_cumprod, torch.tensor([0, 999]), 5.0)
    tensor([5.0010e-04, 1.0000e+00])
    ```
    """
    if snr_gamma <= 0:
        raise ValueError(f"snr_gamma must be > 0, got {snr_gamma}")
    ratio = snr(alphas_cumprod, timesteps)
    clamped = torch.clamp(ratio, max=snr_gamma)
    if prediction_type == "epsilon":
        weights = torch.clamp(snr_gamma / ratio, max=1.0)
    elif prediction_type == "v_prediction":
        weights = clamped / (ratio + 1.0)
    elif prediction_type == "sample":
        weights = clamped
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got '{prediction_type}'")
    return weights.float()


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample `(B,)` (mean over C, H, W), times `weights` `(B,)` when given, then averaged."""
    per_sample = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()
