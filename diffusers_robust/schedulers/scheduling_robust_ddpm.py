"""`RobustDDPMScheduler`: Diffusers' DDPM scheduler with robust training noise and epsilon scaling."""

from typing import Literal

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin  # noqa: F401

from .robust_noise import RobustNoiseMixin, validate_robust_options

# `SchedulerMixin` must stay importable from this module: Diffusers' pipeline loader looks it up
# here when it reads `model_index.json`, which records this module path.


class RobustDDPMScheduler(RobustNoiseMixin, DDPMScheduler):
    r"""
    [`~diffusers.DDPMScheduler`] with robust options. Every option is configuration, saved by
    `save_pretrained` and restored by `from_pretrained` / `from_config`. With all robust options at their
    defaults, `step` and `add_training_noise` give the parent's results bit for bit.

    Args:
        input_perturbation (`float`, defaults to 0.0):
            DDPM-IP gamma: the model input is noised with `eps + gamma * xi`, the target stays `eps`.
            Ning et al. (ICML 2023) recommend 0.1.
        offset_noise (`float`, defaults to 0.0):
            Scale of per-channel constant noise `(B, C, 1, 1)` added to `eps`.
        pyramid_noise_discount (`float`, defaults to 0.0):
            Weight ratio between resolution levels of multi-resolution noise; 0 turns it off.
        epsilon_scale_base (`float`, defaults to 1.0):
            `b` in `lambda_t = k * t + b`; `step` divides the predicted noise by `lambda_t` (Ning et al. ICLR 2024).
        epsilon_scale_slope (`float`, defaults to 0.0):
            `k` in `lambda_t = k * t + b`, per training timestep.

    The remaining arguments are [`~diffusers.DDPMScheduler`]'s.

    Example:

    ```py
    >>> from diffusers_robust import RobustDDPMScheduler
    >>> scheduler = RobustDDPMScheduler(input_perturbation=0.1, epsilon_scale_base=1.001)
    >>> scheduler.config.input_perturbation
    0.1
    ```
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        input_perturbation: float = 0.0,
        offset_noise: float = 0.0,
        pyramid_noise_discount: float = 0.0,
        epsilon_scale_base: float = 1.0,
        epsilon_scale_slope: float = 0.0,
        sampling_stop_sigma: float = 0.0,
        sampling_observed_share: float = 1.0,
    ):
        validate_robust_options(
            input_perturbation, offset_noise, pyramid_noise_discount, epsilon_scale_base, epsilon_scale_slope,
            prediction_type, sampling_stop_sigma, sampling_observed_share, num_train_timesteps,
        )
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            variance_type=variance_type,
            clip_sample=clip_sample,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """[`~diffusers.DDPMScheduler.step`] after dividing the predicted noise by `lambda_t` when epsilon
        scaling is on. Shapes: `model_output` and `sample` are `(B, C, H, W)`."""
        model_output = self._scale_model_output(model_output, timestep)
        return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
