"""Training-time noising and sampling-time epsilon scaling shared by the robust schedulers.

The mixin expects the host class to be a Diffusers scheduler with `alphas_cumprod`, `add_noise`,
`get_velocity` and a config holding the robust fields below.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class TrainingNoiseOutput(BaseOutput):
    """
    Output of [`RobustNoiseMixin.add_training_noise`].

    Args:
        noisy_images (`torch.Tensor` of shape `(B, C, H, W)`):
            The model input `x_t`.
        target (`torch.Tensor` of shape `(B, C, H, W)`):
            The regression target for the configured `prediction_type`.
        noise (`torch.Tensor` of shape `(B, C, H, W)`):
            The noise `eps` the target is built from (offset and pyramid noise included, input perturbation excluded; in
            restoration training, the noise that explains `x_t` from the clean image).
    """

    noisy_images: torch.Tensor
    target: torch.Tensor
    noise: torch.Tensor


def validate_robust_options(
    input_perturbation: float,
    offset_noise: float,
    pyramid_noise_discount: float,
    epsilon_scale_base: float,
    epsilon_scale_slope: float,
    prediction_type: str,
    sampling_stop_sigma: float = 0.0,
    sampling_observed_share: float = 1.0,
    num_train_timesteps: int = 1000,
) -> None:
    """Raise `ValueError` naming the first robust option that is out of range (`num_train_timesteps`: the schedule's
    length, over which epsilon scaling's `lambda_t` must stay positive)."""
    if input_perturbation < 0:
        raise ValueError(f"input_perturbation must be >= 0, got {input_perturbation}")
    if offset_noise < 0:
        raise ValueError(f"offset_noise must be >= 0, got {offset_noise}")
    if not 0 <= pyramid_noise_discount < 1:
        raise ValueError(f"pyramid_noise_discount must be in [0, 1), got {pyramid_noise_discount}")
    if not epsilon_scale_base > 0:  # also refuses NaN
        raise ValueError(f"epsilon_scale_base must be > 0, got {epsilon_scale_base}")
    last = epsilon_scale_base + epsilon_scale_slope * (num_train_timesteps - 1)
    if not last > 0:  # sampling divides the predicted noise by lambda_t = slope * t + base at every timestep t
        raise ValueError(f"epsilon scaling reaches lambda_t = {last:g} <= 0 at timestep {num_train_timesteps - 1}: "
                         "epsilon_scale_base + epsilon_scale_slope * t must stay > 0 for every training timestep t")
    if not 0 <= sampling_stop_sigma < 1e6:  # also refuses NaN
        raise ValueError(f"sampling_stop_sigma must be a finite std >= 0 ([0, 1] image units), got {sampling_stop_sigma}")
    if not 0 < sampling_observed_share <= 1:
        raise ValueError(f"sampling_observed_share must be in (0, 1], got {sampling_observed_share}")
    scaling_on = epsilon_scale_base != 1.0 or epsilon_scale_slope != 0.0
    if scaling_on and prediction_type != "epsilon":
        raise ValueError(
            f"epsilon scaling divides the predicted noise and needs prediction_type='epsilon', got '{prediction_type}'"
        )


def pyramid_noise(
    shape: tuple[int, ...], discount: float, generator=None, device=None, dtype=None
) -> torch.Tensor:
    """Multi-resolution noise: white noise at `(H, W)` plus upsampled noise at `(H / 2^i, W / 2^i)`
    weighted by `discount**i`, rescaled so each sample has unit standard deviation."""
    batch, channels, height, width = shape
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    level = 1
    while height >> level >= 1 and width >> level >= 1 and level <= 10:
        coarse = randn_tensor(
            (batch, channels, height >> level, width >> level), generator=generator, device=device, dtype=dtype
        )
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False) * discount**level
        level += 1
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


class RobustNoiseMixin:
    """Adds `add_training_noise` and epsilon scaling to a DDPM-family scheduler."""

    @classmethod
    def _get_compatibles(cls) -> list[type]:
        # Diffusers resolves `_compatibles` names inside the diffusers package only; add ours.
        from . import RobustDDIMScheduler, RobustDDPMScheduler

        compatibles = super()._get_compatibles()
        return compatibles + [c for c in (RobustDDPMScheduler, RobustDDIMScheduler) if c not in compatibles]

    def sample_training_noise(
        self, shape: tuple[int, ...], generator=None, device=None, dtype=None
    ) -> torch.Tensor:
        """The noise `eps` of the forward process: white, plus offset and pyramid noise when enabled.

        Random numbers are drawn in a fixed order (white noise, offset, pyramid levels) so a seeded
        generator gives the same `eps` as the parent scheduler's training recipe when both are off.
        """
        config = self.config
        if config.pyramid_noise_discount > 0:
            noise = pyramid_noise(shape, config.pyramid_noise_discount, generator, device, dtype)
        else:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if config.offset_noise > 0:
            offset = randn_tensor((shape[0], shape[1], 1, 1), generator=generator, device=device, dtype=dtype)
            noise = noise + config.offset_noise * offset
        return noise

    def add_training_noise(
        self,
        clean_images: torch.Tensor,
        timesteps: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        corrupted_images: torch.Tensor | None = None,
    ) -> TrainingNoiseOutput:
        r"""
        Noise clean images for one training step and return the regression target.

        With input perturbation (DDPM-IP, Ning et al. 2023) the model input is
        `x_t = sqrt(a_t) x0 + sqrt(1 - a_t) (eps + gamma * xi)` while the target is built from `eps` alone.

        Args:
            clean_images (`torch.Tensor` of shape `(B, C, H, W)`):
                Clean images in `[-1, 1]`.
            timesteps (`torch.LongTensor` of shape `(B,)`):
                Training timesteps in `[0, num_train_timesteps)`.
            generator (`torch.Generator` or list of them, *optional*):
                Source of randomness; a list gives one generator per sample.
            corrupted_images (`torch.Tensor` of shape `(B, C, H, W)`, *optional*):
                Restoration training: `x_t` is built from these, the target from `clean_images`, as if the noise had
                been `eps + sqrt(a_t / (1 - a_t)) (corrupted - clean)`, so the model learns `E[clean | x_t]`.
                The same random numbers are drawn as without them.

        Returns:
            [`TrainingNoiseOutput`]: `noisy_images`, `target` and `noise`, each `(B, C, H, W)`.

        Example:

        ```py
        >>> import torch
        >>> from diffusers_robust import RobustDDPMScheduler
        >>> scheduler = RobustDDPMScheduler(input_perturbation=0.1)
        >>> x0 = torch.zeros(4, 3, 8, 8)
        >>> out = scheduler.add_training_noise(x0, torch.tensor([0, 10, 500, 999]), torch.Generator().manual_seed(0))
        >>> out.noisy_images.shape
        torch.Size([4, 3, 8, 8])
        ```
        """
        if clean_images.ndim != 4:
            raise ValueError(f"clean_images must have shape (B, C, H, W), got {tuple(clean_images.shape)}")
        if timesteps.shape != (clean_images.shape[0],):
            raise ValueError(
                f"timesteps must have shape ({clean_images.shape[0]},) to match the batch, got {tuple(timesteps.shape)}"
            )
        noise = self.sample_training_noise(
            clean_images.shape, generator=generator, device=clean_images.device, dtype=clean_images.dtype
        )
        model_input_noise = noise
        if self.config.input_perturbation > 0:
            perturbation = randn_tensor(
                clean_images.shape, generator=generator, device=clean_images.device, dtype=clean_images.dtype
            )
            model_input_noise = noise + self.config.input_perturbation * perturbation
        if corrupted_images is None:
            noisy_images = self.add_noise(clean_images, model_input_noise, timesteps)
        else:
            if corrupted_images.shape != clean_images.shape:
                raise ValueError(f"corrupted_images {tuple(corrupted_images.shape)} must have the shape of clean_images "
                                 f"{tuple(clean_images.shape)}")
            noisy_images = self.add_noise(corrupted_images, model_input_noise, timesteps)
            noise = self.restoration_noise(clean_images, corrupted_images, noise, timesteps)
        target = self.training_target(clean_images, noise, timesteps)
        return TrainingNoiseOutput(noisy_images=noisy_images, target=target, noise=noise)

    def noise_levels(self) -> torch.Tensor:
        """`sigma_t = sqrt((1 - abar_t) / abar_t)` for every training timestep, `(T,)` float64: the noise std of
        `x_t / sqrt(abar_t)` in model units (`[-1, 1]` images; twice the std in `[0, 1]` units)."""
        alphas = self.alphas_cumprod.double()
        return ((1 - alphas) / alphas).sqrt()

    def add_noisy_data_noise(
        self,
        observations: torch.Tensor,
        noise_sigmas: torch.Tensor,
        timesteps: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> TrainingNoiseOutput:
        r"""
        Noise images that already carry Gaussian noise of a known std up to the level of `timesteps`, and return the
        target whose minimiser is the *clean*-data denoiser (Ambient Diffusion's "double Tweedie" target, Daras et al.).

        With `y = x0 + s_n z` and `sigma_t^2 = (1 - abar_t) / abar_t`: `x_t = sqrt(abar_t) y + sqrt(1 - abar_t (1 + s_n^2)) e`,
        so `x_t` has exactly the marginal of a clean image noised to `t` (`add_noise(y, e, t)` would add `abar_t s_n^2`
        of variance too much). With `k = sigma_t / sqrt(sigma_t^2 - s_n^2)`, `E[k e | x_t] = E[eps | x_t]`: the target is
        `k e` for `epsilon`, `y - s_n^2 / sqrt(sigma_t^2 - s_n^2) e` (that is `x_t / sqrt(abar_t) - sigma_t k e`) for
        `sample`, and the velocity of those two for `v_prediction`. A clean image (`s_n = 0`) gets `k = 1`: the plain
        DDPM noising and target, to the bit.

        Args:
            observations (`torch.Tensor` of shape `(B, C, H, W)`): the noisy images `y` in model units (`[-1, 1]` plus
                their noise, unclipped).
            noise_sigmas (`torch.Tensor` of shape `(B,)`): `s_n`, the std of the noise in `y`, in model units (twice
                the std in `[0, 1]` units); each must lie below its timestep's `sigma_t`.
            timesteps (`torch.LongTensor` of shape `(B,)`).
            generator: source of `e`, drawn as [`sample_training_noise`] draws (white noise only).

        Returns:
            [`TrainingNoiseOutput`]: `noisy_images` `x_t`, `target`, and `noise` (`k e`, the epsilon target).
        """
        if observations.ndim != 4 or noise_sigmas.shape != (observations.shape[0],) or timesteps.shape != noise_sigmas.shape:
            raise ValueError(f"observations (B, C, H, W), noise_sigmas (B,) and timesteps (B,) must match, got "
                             f"{tuple(observations.shape)}, {tuple(noise_sigmas.shape)}, {tuple(timesteps.shape)}")
        if self.config.input_perturbation > 0 or self.config.offset_noise > 0 or self.config.pyramid_noise_discount > 0:
            raise ValueError("noisy-data training assumes white Gaussian noise: turn input_perturbation, offset_noise and "
                             "pyramid_noise_discount off")
        device, dtype = observations.device, observations.dtype
        levels = self.noise_levels().to(device)[timesteps.to(device)]
        variance = noise_sigmas.to(device).double() ** 2
        if not bool((variance < levels**2).all()):
            bad = int(torch.nonzero(variance >= levels**2)[0])
            raise ValueError(f"noise_sigmas[{bad}] = {noise_sigmas[bad].item():.4g} is not below the noise level "
                             f"{levels[bad].item():.4g} of timestep {int(timesteps[bad])}: that record cannot serve that time")
        alphas = self.alphas_cumprod.to(device)[timesteps.to(device)].double()
        # The factor on `e` relative to `add_noise`'s sqrt(1 - abar_t), and the epsilon-target scale k; both exactly 1
        # for a clean image, so clean rows match the plain path bit for bit.
        noise_scale = ((1 - alphas * (1 + variance)) / (1 - alphas)).sqrt()
        target_scale = levels / (levels**2 - variance).sqrt()
        noise = self.sample_training_noise(observations.shape, generator=generator, device=device, dtype=dtype)
        noisy_images = self.add_noise(observations, noise * noise_scale.to(dtype).view(-1, 1, 1, 1), timesteps)
        epsilon_target = noise * target_scale.to(dtype).view(-1, 1, 1, 1)
        if self.config.prediction_type == "epsilon":
            target = epsilon_target
        else:
            shift = (variance / (levels**2 - variance).sqrt()).to(dtype).view(-1, 1, 1, 1)
            clean_target = observations - shift * noise
            target = self.training_target(clean_target, epsilon_target, timesteps)
        return TrainingNoiseOutput(noisy_images=noisy_images, target=target, noise=epsilon_target)

    def restoration_noise(
        self, clean_images: torch.Tensor, corrupted_images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The noise that explains `add_noise(corrupted_images, noise, t)` from the clean images:
        `noise + sqrt(a_t / (1 - a_t)) (corrupted - clean)`, all `(B, C, H, W)`; the target of restoration training."""
        alphas = self.alphas_cumprod.to(clean_images.device)[timesteps.to(clean_images.device)]
        alphas = alphas.view(-1, 1, 1, 1).to(clean_images.dtype)
        return noise + (alphas / (1 - alphas)).sqrt() * (corrupted_images - clean_images)

    def training_target(self, clean_images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model regresses for the configured `prediction_type`: `noise`, the velocity, or `clean_images`."""
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.get_velocity(clean_images, noise, timesteps)
        if prediction_type == "sample":
            return clean_images
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got '{prediction_type}'")

    def epsilon_scale(self, timestep: int | torch.Tensor) -> float | torch.Tensor:
        """`lambda_t = epsilon_scale_slope * t + epsilon_scale_base` for a training timestep `t`."""
        return self.config.epsilon_scale_slope * timestep + self.config.epsilon_scale_base

    def _scale_model_output(self, model_output: torch.Tensor, timestep: int | torch.Tensor) -> torch.Tensor:
        """Divide the predicted noise by `lambda_t` (Ning et al. 2024); identity when scaling is off."""
        if self.config.epsilon_scale_base == 1.0 and self.config.epsilon_scale_slope == 0.0:
            return model_output
        if self.config.prediction_type != "epsilon":
            raise ValueError("epsilon scaling needs prediction_type='epsilon'")
        scale = self.epsilon_scale(timestep)
        if torch.is_tensor(scale):
            scale = scale.to(model_output.device, model_output.dtype)
        return model_output / scale
