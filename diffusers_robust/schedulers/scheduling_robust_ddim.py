"""`RobustDDIMScheduler`: Diffusers' DDIM scheduler with robust training noise and epsilon scaling."""

from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin  # noqa: F401

from .robust_noise import RobustNoiseMixin, validate_robust_options

# `SchedulerMixin` must stay importable from this module (see scheduling_robust_ddpm.py).


class RobustDDIMScheduler(RobustNoiseMixin, DDIMScheduler):
    r"""
    [`~diffusers.DDIMScheduler`] with the robust options of [`RobustDDPMScheduler`] (`input_perturbation`,
    `offset_noise`, `pyramid_noise_discount`, `epsilon_scale_base`, `epsilon_scale_slope`), all saved as
    configuration. With every robust option at its default it matches its parent bit for bit.

    Example:

    ```py
    >>> from diffusers_robust import RobustDDIMScheduler, RobustDDPMScheduler
    >>> ddim = RobustDDIMScheduler.from_config(RobustDDPMScheduler(epsilon_scale_base=1.005).config)
    >>> ddim.config.epsilon_scale_base
    1.005
    ```
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading",
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
            clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one,
            steps_offset=steps_offset,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """[`~diffusers.DDIMScheduler.step`] after dividing the predicted noise by `lambda_t` when epsilon
        scaling is on. Shapes: `model_output` and `sample` are `(B, C, H, W)`."""
        model_output = self._scale_model_output(model_output, timestep)
        return super().step(
            model_output, timestep, sample, eta=eta, use_clipped_model_output=use_clipped_model_output,
            generator=generator, variance_noise=variance_noise, return_dict=return_dict,
        )
