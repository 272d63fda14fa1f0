"""The training objective: min-SNR loss weights, the weighted MSE, and [`RobustDiffusionObjective`], the one callable
that turns clean images into the training loss."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models import prediction_error
from ..schedulers.robust_noise import PREDICTION_TYPES

# Missing-pixel training weights its x0 error by min-SNR with this gamma when `snr_gamma` is not set: unweighted, the
# high-noise times dominate (README, "Missing pixels"; benchmarks/RESULTS.md, "Figures behind the code").
MASKED_SNR_GAMMA = 5.0


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
    >>> from diffusers_robust.training.objective import min_snr_weights
    >>> s = DDPMScheduler(rescale_betas_zero_snr=True)
    >>> min_snr_weights(s.alphas_cumprod, torch.tensor([0, 999]), 5.0)
    tensor([5.0013e-04, 1.0000e+00])
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


@dataclass
class ObjectiveOutput:
    """What one call of [`RobustDiffusionObjective`] computed.

    Args:
        loss (`torch.Tensor` of shape `(B,)`): per-sample loss, min-SNR weighted when `snr_gamma` is set; the caller
            reduces it (mean over the batch).
        timesteps (`torch.LongTensor` of shape `(B,)`): the training timesteps drawn.
        applied (`list`): per sample, the `(corruption, severity)` applied to the input, or `None`.
        records (`torch.LongTensor` of shape `(B,)`, *optional*): noisy-data training: which image of the batch each
            slot trained on (an admissible one for its time); `None` when every slot used its own image.
    """

    loss: torch.Tensor
    timesteps: torch.Tensor
    applied: list[tuple[str, int] | None]
    records: torch.Tensor | None = None


class RobustDiffusionObjective:
    r"""
    The training loss of a robust DDPM, in one place: corrupt the images (optional), draw timesteps, noise them with the
    scheduler's `add_training_noise` (input perturbation, offset and pyramid noise, restoration targets), run the
    label-conditioned model, and weight the squared error per sample (min-SNR-gamma).

    The training script, the training-step benchmark and the validation loss all call it, so they measure one thing.
    Random numbers come from `generator` in a fixed order (corruption, timesteps, noise): a seeded generator per
    micro-batch makes a step reproducible and a resumed run bit-exact.

    Args:
        scheduler ([`RobustDDPMScheduler`]): the noise schedule, `prediction_type` and robust training options.
        snr_gamma (`float`, *optional*): min-SNR-gamma weighting; `None` gives plain MSE.
        corruption ([`~data.corruptions.RandomCorruption`], *optional*): corrupts training images before noising.
        augment_dim (`int`, defaults to 0): augment labels the model is conditioned on (the first `augment_dim` columns
            of `augment_labels`); corruption labels, when `condition_on_corruption`, follow them.
        condition_on_corruption (`bool`, defaults to `True`): tell the model which corruption each image got.
        restoration_training (`bool`): corrupted images keep their clean image as the target (`x_t` from the corrupted
            image), so the model learns to undo them.
        restoration_max_timestep (`int`, *optional*): restoration training draws the corrupted images' timesteps from
            `[0, restoration_max_timestep)` (rescaled, so the draw is the same).
        max_weight (`float`, defaults to 4.0): noisy-data training: `s_max`, the cap on `k^2 = sigma_t^2 / (sigma_t^2 -
            s_n^2)`; a record with noise std `s_n` trains only where `sigma_t >= s_n sqrt(s_max / (s_max - 1))`.
        further_mask_p (`float`, *optional*): missing-pixel training (see below) with this share `delta` of the observed
            pixels hidden further at each step; `None` (default): the model takes plain images.

    Noisy data (Ambient Diffusion): given per-image `noise_sigmas` (and `sigma_max`), the time is drawn first, then an
    image of the batch that may serve it (uniformly among the admissible ones, so each time keeps its share and a
    restricted image never meets a time it cannot serve); that image is noised on from its own noise level and regressed
    onto the double-Tweedie target ([`RobustNoiseMixin.add_noisy_data_noise`]), whose minimiser is the clean-data
    denoiser. A batch of clean images takes the plain path: the same random numbers and the same loss, bit for bit.

    Missing pixels (Ambient Diffusion, Daras et al. 2023), with `further_mask_p` set and per-image `observed` masks A:
    `x_t` is made from the observed image, a further share `delta` of its observed pixels is hidden (A' = A * B), the
    model sees `(A' * x_t, A')` (`2C` channels) and predicts the clean image (`prediction_type="sample"`), and the
    squared error counts only the pixels in A, weighted by min-SNR (`snr_gamma`, else `MASKED_SNR_GAMMA`). Its minimiser
    is `E[x0 | A' * x_t, A']`: the model learns to fill in pixels it is never shown, and at sampling sees a random
    `(1 - p)(1 - delta)` share of each image.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import UNet2DModel
    >>> from diffusers_robust import RobustDDPMScheduler, RobustDiffusionObjective
    >>> from diffusers_robust.models import LabelConditionedUNet
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32),
    ...                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    >>> objective = RobustDiffusionObjective(RobustDDPMScheduler(input_perturbation=0.1), snr_gamma=5.0)
    >>> out = objective(LabelConditionedUNet(unet), torch.zeros(4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    >>> out.loss.shape
    torch.Size([4])
    ```
    """

    def __init__(
        self,
        scheduler,
        snr_gamma: float | None = None,
        corruption=None,
        augment_dim: int = 0,
        condition_on_corruption: bool = True,
        restoration_training: bool = False,
        restoration_max_timestep: int | None = None,
        max_weight: float = 4.0,
        further_mask_p: float | None = None,
    ):
        if restoration_training and corruption is None:
            raise ValueError("restoration_training needs a corruption to undo")
        if further_mask_p is not None:
            if not 0 <= further_mask_p < 1:
                raise ValueError(f"further_mask_p must be in [0, 1), got {further_mask_p}")
            if scheduler.config.prediction_type != "sample":
                raise ValueError("missing-pixel training predicts the clean image: it needs prediction_type 'sample', "
                                 f"got '{scheduler.config.prediction_type}'")
            if corruption is not None:
                raise ValueError("missing-pixel training does not corrupt its images further: set corruptions: []")
        self.further_mask_p = further_mask_p
        if not max_weight > 1:
            raise ValueError(f"max_weight (s_max) must be > 1, got {max_weight}")
        self.max_weight = max_weight
        self.scheduler = scheduler
        self.snr_gamma = snr_gamma
        self.corruption = corruption
        self.augment_dim = augment_dim
        self.corruption_dim = corruption.label_dim if corruption is not None and condition_on_corruption else 0
        self.restoration_training = restoration_training
        self.restoration_max_timestep = restoration_max_timestep

    @property
    def label_dim(self) -> int:
        """Length of the model's label vector: augment labels, then corruption labels."""
        return self.augment_dim + self.corruption_dim

    @property
    def label_names(self) -> list[str]:
        """One name per label slot (`augment/<i>`, `corruption/<name>`), as a [`ConditionEmbedding`] stores them."""
        names = [f"augment/{i}" for i in range(self.augment_dim)]
        return names + ([f"corruption/{name}" for name in self.corruption.corruptions] if self.corruption_dim else [])

    def __call__(
        self,
        model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
        images: torch.Tensor,
        augment_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise_sigmas: torch.Tensor | None = None,
        sigma_max: torch.Tensor | None = None,
        observed: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """Loss of `model(x_t, t, labels)` on `images` `(B, C, H, W)` in `[-1, 1]` with their `augment_labels`
        `(B, >= augment_dim)`; every random number is drawn from `generator` (CPU). `noise_sigmas` and `sigma_max`
        `(B,)` (`[0, 1]` units) annotate noisy or restricted images; without them, or with every image clean, the
        images are clean. `observed` `(B, 1, H, W)` (1 = observed; default: all) serves missing-pixel training."""
        if self.further_mask_p is not None:
            return self.masked_data_loss(model, images, augment_labels, generator, observed)
        if noise_sigmas is not None and not _all_clean(noise_sigmas, sigma_max):
            return self.noisy_data_loss(model, images, augment_labels, generator, noise_sigmas, sigma_max)
        batch, device = images.shape[0], images.device
        corrupted, applied = images, [None] * batch
        if self.corruption is not None:
            corrupted, applied = self.corruption(images, generator=generator)
        num_timesteps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_timesteps, (batch,), generator=generator).to(device)
        if self.restoration_training and self.restoration_max_timestep:
            # corrupted images train where restoration runs: t rescaled into [0, restoration_max_timestep)
            hit = torch.tensor([a is not None for a in applied], device=device)
            timesteps = torch.where(hit, timesteps * self.restoration_max_timestep // num_timesteps, timesteps)
        if self.restoration_training:  # x_t from the corrupted image, the target from the clean one
            noised = self.scheduler.add_training_noise(images, timesteps, generator=generator, corrupted_images=corrupted)
        else:
            noised = self.scheduler.add_training_noise(corrupted, timesteps, generator=generator)
        labels = self.labels(augment_labels, applied, batch, device)
        loss = prediction_error(model, noised.noisy_images, noised.target, timesteps, labels)
        if self.snr_gamma is not None:
            loss = loss * min_snr_weights(self.scheduler.alphas_cumprod, timesteps, self.snr_gamma,
                                          self.scheduler.config.prediction_type).to(loss.device)
        return ObjectiveOutput(loss=loss, timesteps=timesteps, applied=applied)

    def noisy_data_loss(self, model, images: torch.Tensor, augment_labels: torch.Tensor | None, generator,
                        noise_sigmas: torch.Tensor, sigma_max: torch.Tensor | None) -> ObjectiveOutput:
        """The loss on a batch with noisy or restricted images (see the class docstring): time first, then an admissible
        image, then [`add_noisy_data_noise`]. Slots for which no image of the batch is admissible weigh 0."""
        if self.corruption is not None:
            raise ValueError("noisy-data training does not corrupt its images further: set corruptions: [] "
                             "(or corruption_p: 0)")
        batch, device = images.shape[0], images.device
        levels = self.scheduler.noise_levels()  # (T,) model units
        sigmas = 2 * noise_sigmas.double().cpu()
        upper = 2 * (sigma_max.double().cpu() if sigma_max is not None else torch.full((batch,), math.inf))
        lowest = sigmas * math.sqrt(self.max_weight / (self.max_weight - 1))
        first = torch.searchsorted(levels, lowest)  # first timestep each image can serve
        last = torch.searchsorted(levels, upper)  # one past its last
        low, high = int(first.min()), int(last.max())
        num_timesteps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_timesteps, (batch,), generator=generator)
        timesteps = low + timesteps * max(high - low, 1) // num_timesteps  # into the times some image can serve
        admissible = (first.unsqueeze(0) <= timesteps.unsqueeze(1)) & (timesteps.unsqueeze(1) < last.unsqueeze(0))
        count = admissible.sum(dim=1)
        pick = (torch.rand(batch, generator=generator, dtype=torch.float64) * count).floor().long()
        records = (admissible.cumsum(dim=1) > pick.unsqueeze(1)).long().argmax(dim=1)
        served = count > 0
        observed = images[records.to(device)]
        slot_sigmas = torch.where(served, sigmas[records], torch.zeros(()))
        timesteps = timesteps.to(device)
        noised = self.scheduler.add_noisy_data_noise(observed, slot_sigmas.to(device), timesteps, generator=generator)
        labels = None
        if self.label_dim:
            chosen = augment_labels[records.to(augment_labels.device)] if augment_labels is not None else None
            labels = self.labels(chosen, [None] * batch, batch, device)
        loss = prediction_error(model, noised.noisy_images, noised.target, timesteps, labels)
        if self.snr_gamma is not None:
            loss = loss * min_snr_weights(self.scheduler.alphas_cumprod, timesteps, self.snr_gamma,
                                          self.scheduler.config.prediction_type).to(loss.device)
        loss = loss * served.to(loss.device, loss.dtype)
        return ObjectiveOutput(loss=loss, timesteps=timesteps, applied=[None] * batch, records=records)

    def masked_data_loss(self, model, images: torch.Tensor, augment_labels: torch.Tensor | None, generator,
                         observed: torch.Tensor | None) -> ObjectiveOutput:
        """The missing-pixel loss (see the class docstring): mean squared error of the predicted clean image over each
        image's observed pixels, the model seeing `x_t` only through a further-reduced mask."""
        batch, device = images.shape[0], images.device
        if observed is None:
            observed = torch.ones((batch, 1, *images.shape[2:]), device=device, dtype=images.dtype)
        observed = observed.to(device=device, dtype=images.dtype)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), generator=generator).to(device)
        noise = torch.randn(images.shape, generator=generator).to(device=device, dtype=images.dtype)
        kept = (torch.rand(observed.shape, generator=generator) >= self.further_mask_p).to(device=device, dtype=images.dtype)
        seen = observed * kept
        noisy = self.scheduler.add_noise(images * observed, noise, timesteps)
        inputs = torch.cat([noisy * seen, seen.expand_as(noisy)], dim=1)
        labels = self.labels(augment_labels, [None] * batch, batch, device) if self.label_dim else None
        prediction = model(inputs, timesteps, labels).float()
        squared = observed * (prediction - images.float()) ** 2
        loss = squared.sum(dim=(1, 2, 3)) / (observed.sum(dim=(1, 2, 3)) * images.shape[1]).clamp(min=1)
        gamma = self.snr_gamma if self.snr_gamma is not None else MASKED_SNR_GAMMA
        loss = loss * min_snr_weights(self.scheduler.alphas_cumprod, timesteps, gamma, "sample").to(loss.device)
        return ObjectiveOutput(loss=loss, timesteps=timesteps, applied=[None] * batch)

    def full_view(self, model):
        """`model` as a denoiser of plain `x_t` `(B, C, H, W)`: a missing-pixel model is shown every pixel (for the
        validation losses); any other model is returned as it is."""
        if self.further_mask_p is None:
            return model

        def denoise(noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            return model(torch.cat([noisy, torch.ones_like(noisy)], dim=1), timesteps, labels)

        return denoise

    def labels(self, augment_labels: torch.Tensor | None, applied: list[tuple[str, int] | None], batch: int,
               device: torch.device) -> torch.Tensor | None:
        """The model's label vector `(B, label_dim)`: augment labels, then corruption labels; `None` without labels."""
        if self.label_dim == 0:
            return None
        parts = []
        if self.augment_dim:
            parts.append(augment_labels[:, : self.augment_dim] if augment_labels is not None
                         else torch.zeros(batch, self.augment_dim, device=device))
        if self.corruption_dim:
            parts.append(self.corruption.labels(applied, device))
        return torch.cat(parts, dim=1)

    def restoration_labels(self, corruption: str, severity: int, batch: int, device: torch.device) -> torch.Tensor | None:
        """Labels that ask a restoration-trained model to undo `corruption` at `severity`; `None` for a corruption it
        was not trained on (or a model that was not restoration-trained)."""
        from ..data.corruptions import canonical_name

        name = canonical_name(corruption)
        if not self.restoration_training or name not in self.corruption.corruptions:
            return None
        return self.labels(None, [(name, severity)] * batch, batch, device)


def _all_clean(noise_sigmas: torch.Tensor, sigma_max: torch.Tensor | None) -> bool:
    """Whether every image of a batch is clean (no noise, no upper level): then the plain objective applies."""
    return bool((noise_sigmas == 0).all()) and (sigma_max is None or bool(torch.isinf(sigma_max).all()))
