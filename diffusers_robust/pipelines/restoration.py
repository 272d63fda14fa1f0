"""Restoration of corrupted images with a diffusion prior: the pieces `RobustDDPMPipeline` composes.

Conventions: images are `(B, C, H, W)` tensors in `[-1, 1]` ("model units"); a Gaussian noise level `sigma` given by a
user is a standard deviation in `[0, 1]` image units (the unit of the corruption table), so it is `2 * sigma` in model
units. `denoiser(x_t, t)` returns the model's noise prediction `eps` for a batch `x_t` at per-sample timesteps `t` `(B,)`.

- Gaussian noise: the noise-matched start. A noisy image `y = x0 + n`, `n ~ N(0, s^2)` is, scaled by `sqrt(abar_t)`,
  exactly a forward-process sample `x_t` at the timestep where `sqrt((1 - abar_t) / abar_t) = s`, so the denoiser's
  estimate from there (no fresh noise) is the posterior mean `E[x0 | y]`; deterministic DDIM steps from there trade a
  little PSNR for sharper images. A UNet that predicts the clean image is not exact at low noise, so its estimate is
  moved back toward the input as far as Stein's unbiased risk estimate says (`sure_shrinkage`).
- Missing pixels (impulse noise, masking, or a caller's mask): RePaint (Lugmayr et al. 2022) through Diffusers'
  `RePaintScheduler`: sample from the prior with the known pixels imposed at every step, then keep them exactly.
- Known linear operators (blur, pixelate, contrast): DDNM-style data consistency (Wang et al. 2023): at every DDIM step
  the predicted clean image is projected onto `{x : A x = y}` with a truncated pseudo-inverse of `A`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..data.corruptions import CORRUPTION_OPS, canonical_name, corruption_parameter, gaussian_blur
from ..data.units import to_model_range, to_unit_range

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Relative singular-value cutoff of the separable deblurring projection (`separable_consistency`).
BLUR_CUTOFF = 0.1
# Noise std ([0, 1] units) from which the prior refines a deconvolved (`blur_sigma`) or filled (`biharmonic_fill`) image:
# low, so the prior only polishes (held-out photos, blur of 1 px: 34.6 dB deconvolved, 34.7 refined, input 31.6).
REFINE_SIGMA = 0.05
# From this many pixels (16x16) up, the photo methods: missing pixels are filled by biharmonic inpainting
# (`biharmonic_fill`) and the prior refines from noise `REFINE_SIGMA` (held-out photos, salt-and-pepper 5%: 39.7 dB
# against RePaint's 37.4), and a named `gaussian_blur` severity is undone as `blur_sigma` with the table's std
# (`uses_separable_blur`; 48 held-out 32x32 photos, severity 3 / 5: 44.2 / 36.4 dB against DDNM's 41.3 / 31.7, inputs
# 35.1 / 32.2). Below, on the 8x8 digits, RePaint and DDNM are kept as measured.
PHOTO_METHODS_PIXELS = 16 * 16
# From PHOTO_METHODS_PIXELS up, restoration averages the denoiser over the 8 flips and quarter turns of its input
# (`dihedral_average`; "self-ensemble", as in EDSR): 96 held-out 32x32 photos, one-step denoising of Gaussian noise of std
# 0.05 / 0.1 / 0.2: 32.89 / 29.09 / 24.90 dB against 32.65 / 28.88 / 24.74 with one pass (the horizontal flip alone gave
# +0.10 at 0.1, flip and half turn +0.17); 50% missing pixels 33.83 against 33.75. Eight UNet calls instead of one.
# Detection keeps the single pass its thresholds were measured with.
# From PHOTO_METHODS_PIXELS up, the denoiser also sees the image mirrored outward by this many pixels (`reflect_padded`):
# 96 held-out 32x32 photos, Gaussian noise of std 0.1 / 0.2 (with the 8 views): 29.26 / 25.02 dB against 29.09 / 24.90
# unpadded. 16 pixels gave 29.30 / 25.06 at 64x64 inputs, 4x the pixels of the photo where 8 pixels take 2.25x: the
# photo journey's end-of-training report on 64 tiles showed an ETA of 27 minutes with 16.
PADDING_MARGIN = 8
# Blocks per denoiser call when a large photo is restored block by block (`tiled`): bounds the memory, not the result.
TILE_BATCH = 64
# From PHOTO_METHODS_PIXELS up, Gaussian noise of a given std is removed at the std it keeps once clipped to [0, 1]
# (`clipped_noise_std`, each clean value estimated by the mean of this many pixels a side): 64 training photos at 32x32,
# std 0.05 / 0.1 / 0.2: 33.45 / 29.48 / 25.08 dB against 33.43 / 29.37 / 24.60 at the std given (the true clean values
# would give 33.45 / 29.50 / 25.13). On the 8x8 digits it moved PSNR by -0.16 to +0.08 dB and is not used there.
CLIPPED_NOISE_WINDOW = 5
# Largest Gaussian blur std (pixels) that `blur_sigma` takes, and the estimate's clip.
MAX_BLUR_SIGMA = 3.0
# The blur a sharp photo already holds as `estimate_blur_sigma` reads it (pixels): the median over the train split of
# the embedded photos at 32x32 (0.57; 0.62 at 64x64, 0.64 at 128x128). An estimate is the blur added on top of it.
SHARP_PHOTO_BLUR = 0.6
# An estimated blur is undone at this share of its estimate: deblurring by too much costs more than by too little. On 64
# training tiles (photo prior, 8-bit PIL blurs) 0.8 gave 29.86 / 25.45 dB at 1 / 2 px where the whole estimate gave
# 30.04 / 25.37; on held-out tiles, softer than the training ones, the whole estimate lost to the input at 1 px (README).
ESTIMATED_BLUR_SHARE = 0.8
# Corruptions that are linear maps of the image (in [0, 1] units, A @ 0 = 0, A @ 1 = 1): restored by data consistency.
LINEAR_CORRUPTIONS = ("gaussian_blur", "pixelate", "contrast")
# Corruptions that replace some pixels by an extreme value: restored by inpainting what was hit.
# Value: the values a hit pixel takes, in [0, 1] units.
MISSING_PIXEL_CORRUPTIONS = {"impulse_noise": (0.0, 1.0), "masking": (0.0,)}
# Largest H * W for which an operator matrix (H*W x H*W) is built; above it, linear corruptions get the noise-matched start.
MAX_OPERATOR_PIXELS = 64 * 64


def noise_to_signal(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """`sqrt((1 - abar_t) / abar_t)` for every training timestep: the noise std of `x_t / sqrt(abar_t)`, model units."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def noise_matched_timestep(alphas_cumprod: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    r"""
    The training timestep whose noise level matches a Gaussian noise std `sigma` in `[0, 1]` image units.

    Args:
        alphas_cumprod (`torch.Tensor` of shape `(T,)`): the scheduler's `abar_t`.
        sigma (`float` or `torch.Tensor` of shape `(B,)`): noise std in `[0, 1]` units (`2 * sigma` in model units).

    Returns:
        `torch.LongTensor` of the shape of `sigma`: `argmin_t |sqrt((1 - abar_t) / abar_t) - 2 sigma|`.
    """
    levels = noise_to_signal(alphas_cumprod.double().cpu())
    sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
    return (levels.view(*([1] * sigma.ndim), -1) - 2 * sigma.unsqueeze(-1)).abs().argmin(dim=-1)


def estimate_noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """
    Per-image Gaussian noise std in `[0, 1]` units, from the median absolute Haar diagonal detail (Donoho 1995).

    Args:
        images (`torch.Tensor` of shape `(B, C, H, W)`): values in `[-1, 1]`; H and W of at least 2.

    Returns:
        `torch.Tensor` of shape `(B,)`: `median(|HH|) / 0.6745`. Image edges bias it upwards a little; noise clipped at
        black or white biases it downwards, as it also lowers the noise actually left in the image.
    """
    unit = to_unit_range(images.float())
    height, width = unit.shape[-2] // 2 * 2, unit.shape[-1] // 2 * 2
    if height == 0 or width == 0:
        raise ValueError(f"noise estimation needs images of at least 2x2 pixels, got {tuple(images.shape[-2:])}")
    unit = unit[..., :height, :width]
    diagonal = (unit[..., 0::2, 0::2] - unit[..., 0::2, 1::2] - unit[..., 1::2, 0::2] + unit[..., 1::2, 1::2]) / 2
    return diagonal.abs().flatten(1).median(dim=1).values / 0.6745


def clipped_noise_std(images: torch.Tensor, sigma: torch.Tensor, window: int = CLIPPED_NOISE_WINDOW) -> torch.Tensor:
    """
    The std `(B,)` (`[0, 1]` units) of Gaussian noise of std `sigma` once clipped to `[0, 1]`, as an image file stores
    it: `sqrt(mean E[(clip(x + n, 0, 1) - x)^2])` over the pixels, each clean value `x` estimated by the mean of the
    noisy image's `window x window` neighbourhood. Near black or white the clipped error is smaller than `sigma`, so a
    dark or bright photo holds less noise than it was given.

    Args:
        images (`torch.Tensor` of shape `(B, C, H, W)`): the noisy images, values in `[-1, 1]`.
        sigma (`torch.Tensor` of shape `(B,)`): the noise std before clipping, `[0, 1]` units (positive).
        window (`int`): side of the neighbourhood that estimates each clean value, pixels (odd).
    """
    unit = to_unit_range(images.double())
    padded = torch.nn.functional.pad(unit, (window // 2,) * 4, mode="replicate")
    clean = torch.nn.functional.avg_pool2d(padded, window, stride=1).clamp(0, 1)
    std = sigma.to(images.device).double().clamp_min(1e-6).view(-1, 1, 1, 1)
    low, high = -clean / std, (1 - clean) / std  # the clipping points in units of the noise std
    cdf_low, cdf_high = torch.special.ndtr(low), torch.special.ndtr(high)  # the standard normal's CDF and density
    pdf_low, pdf_high = (torch.exp(-0.5 * low**2) / math.sqrt(2 * math.pi), torch.exp(-0.5 * high**2) / math.sqrt(2 * math.pi))
    inside = std**2 * ((cdf_high - cdf_low) - (high * pdf_high - low * pdf_low))  # E[n^2] over the unclipped part
    squared = inside + clean**2 * cdf_low + (1 - clean) ** 2 * (1 - cdf_high)
    return squared.flatten(1).mean(1).sqrt().to(sigma.dtype).cpu()


def predicted_clean(sample: torch.Tensor, eps: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """`x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`, with `alpha_cumprod` `(B,)` broadcast over the image."""
    alpha = alpha_cumprod.view(-1, 1, 1, 1).to(sample.dtype)
    return (sample - (1 - alpha).sqrt() * eps) / alpha.sqrt()


@torch.no_grad()
def denoise_from_timestep(
    denoiser: Denoiser,
    alphas_cumprod: torch.Tensor,
    sample: torch.Tensor,
    start: torch.Tensor,
    steps: int = 1,
    projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""
    Deterministic DDIM (eta = 0) from per-sample timesteps `start` down to a clean estimate.

    Args:
        denoiser: `(x_t, t) -> eps`.
        alphas_cumprod (`torch.Tensor` of shape `(T,)`).
        sample (`torch.Tensor` of shape `(B, C, H, W)`): `x_t` at `start`.
        start (`torch.LongTensor` of shape `(B,)`): timesteps in `[0, T)`.
        steps (`int`, defaults to 1): denoiser calls; 1 returns the one-step posterior mean.
        projection (*optional*): applied to every predicted clean image (data consistency); then clipped to `[-1, 1]`.

    Returns:
        `torch.Tensor` of shape `(B, C, H, W)`: the clean estimate in `[-1, 1]`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    alphas = alphas_cumprod.to(sample.device)
    start = start.to(sample.device)
    # Per sample, `steps` timesteps evenly spaced from its start down to 0 (repeats are harmless), then "t = -1".
    fractions = torch.linspace(1, 0, steps + 1, device=sample.device)[:-1]
    schedule = (start.unsqueeze(0).double() * fractions.unsqueeze(1).double()).round().long()  # (steps, B)
    clean = sample
    for index in range(steps):
        t = schedule[index]
        alpha = alphas[t]
        clean = predicted_clean(sample, denoiser(sample, t), alpha)
        if projection is not None:
            clean = projection(clean)
        clean = clean.clamp(-1, 1)
        if index + 1 < steps:
            alpha_next = alphas[schedule[index + 1]].view(-1, 1, 1, 1)
            eps = (sample - alpha.view(-1, 1, 1, 1).sqrt() * clean) / (1 - alpha.view(-1, 1, 1, 1)).sqrt()
            sample = alpha_next.sqrt() * clean + (1 - alpha_next).sqrt() * eps
    return clean


# Monte-Carlo probes of `sure_shrinkage`'s divergence: enough that they total `SURE_PROBE_VALUES` values per image, at
# most `MAX_SURE_PROBES` (an 8x8 digit gets 8: on 200 held-out digits, 2 probes lost 0.04 dB more than 8 at s1).
SURE_PROBE_VALUES = 512
MAX_SURE_PROBES = 8


@torch.no_grad()
def sure_shrinkage(denoise: Callable[[torch.Tensor], torch.Tensor], noisy: torch.Tensor, sigma: torch.Tensor,
                   seed: int = 0) -> torch.Tensor:
    r"""
    A denoised estimate moved back toward the noisy input by the share Stein's unbiased risk estimate (SURE) finds best
    for each image: `y + lam * (f(y) - y)`, where `lam` in `[0, 1]` minimises the estimated squared error
    `lam^2 |f - y|^2 - n s^2 + 2 s^2 (lam div f + (1 - lam) n)`, i.e. `lam = s^2 (n - div f) / |f - y|^2`. The
    divergence `div f` comes from Monte-Carlo probes (Ramani, Blu and Unser 2008). A denoiser whose error exceeds the
    noise (a UNet that predicts the clean image reproduces its input only to about 31 dB on digits) is then trusted
    only as far as it helps. Only values strictly inside `(-1, 1)` count: where storage clipped the noise at black or
    white it is not Gaussian.

    Args:
        denoise: `(B, C, H, W) -> (B, C, H, W)`, deterministic; the estimate `f` of the clean images.
        noisy (`torch.Tensor` of shape `(B, C, H, W)`): `y`, values in `[-1, 1]`.
        sigma (`torch.Tensor` of shape `(B,)`): the noise std `s`, `[0, 1]` units.
        seed (`int`, defaults to 0): seeds the probes, so that the result does not depend on the caller's generator.

    Returns:
        `torch.Tensor` of shape `(B, C, H, W)`: the shrunk estimate in `[-1, 1]`.
    """
    estimate = denoise(noisy)
    batch = noisy.shape[0]
    inside = (noisy.abs() < 1 - 1e-4).to(noisy.dtype)
    counted = inside.flatten(1).sum(1).double()
    variance = (2 * sigma.to(noisy.device).double()) ** 2  # model units
    probes = min(MAX_SURE_PROBES, max(1, math.ceil(SURE_PROBE_VALUES / noisy[0].numel())))
    generator = torch.Generator(device=noisy.device).manual_seed(seed)
    divergence = torch.zeros(batch, dtype=torch.float64, device=noisy.device)
    for _ in range(probes):
        probe = torch.randn(noisy.shape, generator=generator, device=noisy.device, dtype=noisy.dtype) * inside
        step = (0.01 * variance.sqrt()).clamp_min(1e-4).view(-1, 1, 1, 1).to(noisy.dtype)  # noise std 0: share 0
        change = (denoise(noisy + step * probe) - estimate) / step
        divergence += (change * probe).flatten(1).sum(1).double() / probes
    residual = ((estimate - noisy) * inside).flatten(1).double().pow(2).sum(1)
    share = (variance * (counted - divergence) / residual.clamp_min(1e-12)).clamp(0, 1)
    share = torch.where(counted > 0, share, torch.ones_like(share))
    return noisy + share.view(-1, 1, 1, 1).to(noisy.dtype) * (estimate - noisy)


def dihedral_average(denoiser: Denoiser) -> Denoiser:
    """`denoiser` averaged over the 8 symmetries of the square (4 quarter turns, each with and without a horizontal
    flip): each transformed input `(B, C, H, W)` is denoised and its noise prediction transformed back. A convolutional
    prior trained on photos is nearly equivariant to them, so the average keeps what the views agree on and averages
    out the errors they do not share. Images need not be square (a quarter turn of an `H x W` image is `W x H`)."""

    def averaged(sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(sample)
        for turns in range(4):
            for flip in (False, True):
                view = torch.rot90(sample, turns, dims=(2, 3))
                eps = denoiser(view.flip(3) if flip else view, timesteps)
                total += torch.rot90(eps.flip(3) if flip else eps, -turns, dims=(2, 3))
        return total / 8

    return averaged


def reflect_padded(denoiser: Denoiser, margin: int = PADDING_MARGIN, multiple: int = 1) -> Denoiser:
    """`denoiser` applied to its input `(B, C, H, W)` mirrored outward by `margin` pixels on every side, at most half its
    shorter side (plus up to `multiple - 1` more at the bottom and right, so each padded side is a multiple of
    `multiple`: the UNet's total downsampling), its noise prediction cropped back. A convolutional prior then sees the
    image's border as it saw the inside of its training tiles instead of against zero padding; and an image of any size
    fits a UNet that needs sides divisible by `multiple`. A side too short to mirror that far is extended by repeating
    its edge pixels. (Half the side: a tiny image is not made mostly of its mirror images.)"""

    def padded(sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        height, width = sample.shape[-2:]
        pad = min(margin, min(height, width) // 2)
        bottom = pad + (-(height + 2 * pad)) % multiple
        right = pad + (-(width + 2 * pad)) % multiple
        if pad == bottom == right == 0:
            return denoiser(sample, timesteps)
        mode = "reflect" if max(bottom, pad) < height and max(right, pad) < width else "replicate"
        extended = torch.nn.functional.pad(sample, (pad, right, pad, bottom), mode=mode)
        return denoiser(extended, timesteps)[..., pad:pad + height, pad:pad + width]

    return padded


def tiled(denoiser: Denoiser, core: int, margin: int = PADDING_MARGIN, multiple: int = 1) -> Denoiser:
    """`denoiser` applied to an image `(B, C, H, W)` larger than `core` pixels a side one `core x core` block at a time,
    each block seen with `margin` pixels of the image around it (mirrored outward at the image's border), only the
    block's own prediction kept. A prior trained on `core x core` tiles then always sees inputs of the size it was
    trained near: on whole photos its group norms and attention, which span the image, read other statistics (12
    held-out 128x128 photos, Gaussian noise of std 0.1 / 0.2, with the 8 views: 29.46 / 25.32 dB block by block with
    32x32 blocks, 28.69 / 24.83 in one pass). The last block of a side the core does not divide overlaps the one before
    it. Blocks go through `denoiser` `TILE_BATCH` at a time."""
    padded = reflect_padded(denoiser, margin, multiple)

    def starts(side: int) -> list[int]:
        return sorted(set(range(0, side - core + 1, core)) | {side - core})

    def blockwise(sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        height, width = sample.shape[-2:]
        if height <= core and width <= core:
            return padded(sample, timesteps)
        batch = sample.shape[0]
        rows, columns = starts(height) if height > core else [0], starts(width) if width > core else [0]
        block_h, block_w = min(core, height), min(core, width)
        mode = "reflect" if margin < min(height, width) else "replicate"
        extended = torch.nn.functional.pad(sample, (margin,) * 4, mode=mode)
        span_h, span_w = block_h + 2 * margin, block_w + 2 * margin
        crops = torch.cat([extended[..., top:top + span_h, left:left + span_w] for top in rows for left in columns])
        times = timesteps.repeat(len(rows) * len(columns))
        fitted = reflect_padded(denoiser, 0, multiple)
        eps = torch.cat([fitted(crops[i:i + TILE_BATCH], times[i:i + TILE_BATCH]) for i in range(0, len(crops), TILE_BATCH)])
        eps = eps[..., margin:margin + block_h, margin:margin + block_w]
        out = torch.empty_like(sample)
        for index, (top, left) in enumerate((top, left) for top in rows for left in columns):
            out[..., top:top + block_h, left:left + block_w] = eps[index * batch:(index + 1) * batch]
        return out

    return blockwise


def candidate_missing_values(images: torch.Tensor, corruption: str) -> torch.Tensor:
    """Values a `corruption` writes (black, or black and white), per channel: `(B, C, H, W)` bool."""
    unit = to_unit_range(images)
    hit = torch.zeros_like(unit, dtype=torch.bool)
    for value in MISSING_PIXEL_CORRUPTIONS[corruption]:
        hit |= (unit - value).abs() < 0.5 / 255
    return hit


def detect_missing_pixels(
    images: torch.Tensor, reference: torch.Tensor, corruption: str, threshold: float = 0.3
) -> torch.Tensor:
    """
    Pixels that `corruption` most likely overwrote: a channel holds a value the corruption writes (see
    `candidate_missing_values`) and differs in that same channel from a reference estimate of the clean image (e.g.
    the prior's posterior mean) by more than `threshold` in `[0, 1]` units. A black background pixel under pepper noise
    is not flagged, and need not be; nor is a colour pixel whose dark channel is right where another channel is
    textured (Gaussian noise clipped at black in a dark photo region).

    Returns:
        `torch.Tensor` `(B, 1, H, W)` bool: True where a pixel is treated as missing.
    """
    far = (images - reference).abs() / 2 > threshold
    return (candidate_missing_values(images, corruption) & far).any(dim=1, keepdim=True)


def missing_pixel_mask(images: torch.Tensor, reference: torch.Tensor, corruption: str) -> torch.Tensor:
    """
    The pixels a named missing-pixel `corruption` lost, `(B, 1, H, W)` bool: `detect_missing_pixels`, and for
    `masking` on colour images every pixel black in all channels too. A large hole darkens the smoothed reference over
    it, which then vouches for the hole; a truly black pixel inpainted from dark surroundings stays dark.
    """
    missing = detect_missing_pixels(images, reference, corruption)
    if corruption == "masking" and images.shape[1] > 1:
        missing |= (to_unit_range(images) < 0.5 / 255).all(dim=1, keepdim=True)
    return missing


def fill_missing(images: torch.Tensor, missing: torch.Tensor, scales: tuple[float, ...] = (0.7, 1.5, 3.0, 6.0, 12.0)
                 ) -> torch.Tensor:
    """
    Missing pixels filled from their known neighbours by normalised convolution: each is the Gaussian-weighted mean of
    the known pixels around it, at the smallest scale (std in pixels, from `scales`) that reaches one. Fast and
    local: the detector's test for holes (`detection.hole_evidence`).

    Args:
        images (`torch.Tensor` of shape `(B, C, H, W)`): values in `[-1, 1]`.
        missing (`torch.Tensor` of shape `(B, 1, H, W)`): True where a pixel is missing.

    Returns:
        `torch.Tensor` of shape `(B, C, H, W)`: known pixels as they were, missing ones filled.
    """
    def blurred(unit: torch.Tensor, scale: float) -> torch.Tensor:  # `gaussian_blur` works on [-1, 1] images
        return to_unit_range(gaussian_blur(to_model_range(unit), scale))

    known = (~missing).to(images.dtype).expand_as(images)
    known_values = to_unit_range(images) * known
    filled = images.clone()
    pending = missing.expand_as(images).clone()
    for scale in scales:
        weight = blurred(known, scale)
        reached = pending & (weight > 1e-3)
        mean = to_model_range(blurred(known_values, scale) / weight.clamp_min(1e-3)).clamp(-1, 1)
        filled = torch.where(reached, mean, filled)
        pending &= ~reached
    return filled


def biharmonic_fill(images: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """
    Missing pixels filled by biharmonic inpainting (scikit-image's `inpaint_biharmonic`, per image, all channels): the
    smoothest surface through the known pixels. On held-out photos it beat `fill_missing` as the start of the prior's
    refinement (50% missing pixels: 33.5 against 32.6 dB; README, "Photos").

    Args:
        images (`torch.Tensor` of shape `(B, C, H, W)`): values in `[-1, 1]`.
        missing (`torch.Tensor` of shape `(B, 1, H, W)`): True where a pixel is missing.

    Returns:
        `torch.Tensor` of shape `(B, C, H, W)`: known pixels as they were, missing ones filled.
    """
    from skimage.restoration import inpaint_biharmonic

    filled = images.clone()
    for index in range(images.shape[0]):
        holes = missing[index, 0].cpu().numpy()
        if not holes.any() or holes.all():
            continue
        unit = to_unit_range(images[index]).permute(1, 2, 0).double().cpu().numpy()
        painted = torch.from_numpy(inpaint_biharmonic(unit, holes, channel_axis=-1)).permute(2, 0, 1)
        filled[index] = to_model_range(painted.to(images)).clamp(-1, 1)
    return torch.where(missing.expand_as(images), filled, images)


def operator_matrix(corruption: str, severity: int, height: int, width: int) -> torch.Tensor:
    """
    The matrix `A` `(H*W, H*W)` of a linear corruption on one channel in `[0, 1]` units, built by corrupting each basis
    image (the ops are linear there: blur, pixelate, contrast).
    """
    if corruption not in LINEAR_CORRUPTIONS:
        raise ValueError(f"{corruption} is not a linear corruption; linear ones: {LINEAR_CORRUPTIONS}")
    pixels = height * width
    basis = to_model_range(torch.eye(pixels, dtype=torch.float32).view(pixels, 1, height, width))  # e_i in model units
    columns = to_unit_range(CORRUPTION_OPS[corruption](basis, corruption_parameter(corruption, severity)))
    return columns.view(pixels, pixels).T.contiguous()


def pseudo_inverse(matrix: torch.Tensor, relative_cutoff: float = 0.1) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse that treats singular values below `relative_cutoff * s_max` as zero, so frequencies
    the operator nearly erases are left to the prior instead of being amplified."""
    return torch.linalg.pinv(matrix.double(), rtol=relative_cutoff).float()


def data_consistency(corrupted: torch.Tensor, matrix: torch.Tensor, inverse: torch.Tensor) -> Callable:
    """A projection `x -> x + A^+ (y - A x)` for `denoise_from_timestep`, with `A` acting per channel in `[0, 1]` units."""
    batch, channels, height, width = corrupted.shape
    matrix, inverse = matrix.to(corrupted.device), inverse.to(corrupted.device)
    observed = to_unit_range(corrupted).reshape(batch * channels, height * width)

    def project(clean: torch.Tensor) -> torch.Tensor:
        flat = to_unit_range(clean).reshape(batch * channels, height * width)
        flat = flat + (observed - flat @ matrix.T) @ inverse.T
        return to_model_range(flat.reshape(batch, channels, height, width))

    return project


def gaussian_blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """The `(size, size)` matrix of a 1-D Gaussian blur of std `sigma` pixels (kernel radius `ceil(3 sigma)`, edges
    mirrored without repeating the edge pixel, as OpenCV's default and this package's `gaussian_blur` do). A 2-D
    Gaussian blur of an `(H, W)` image is `rows @ X @ columns.T` with the matrices of sizes H and W."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for row in range(size):
        for offset, weight in zip(offsets.long().tolist(), kernel.tolist(), strict=True):
            column = row + offset
            while not 0 <= column < size:  # reflect-101: -1 -> 1, size -> size - 2
                column = -column if column < 0 else 2 * (size - 1) - column
            matrix[row, column] += weight
    return matrix


def separable_consistency(corrupted: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
                          relative_cutoff: float = BLUR_CUTOFF) -> Callable:
    """
    A data-consistency projection `x -> x + A^+ (y - A x)` for a separable operator `A X = rows @ X @ columns.T`
    (per channel, `[0, 1]` units), at any image size: `A^+` is computed in the joint singular basis of the two factors,
    dropping the components whose singular value `s_i * s_j` is below `relative_cutoff` of the largest, so a frequency
    the blur nearly erased (and the 8-bit rounding in it) is left to the prior instead of being amplified.
    """
    u_rows, s_rows, v_rows = torch.linalg.svd(rows.double())
    u_cols, s_cols, v_cols = torch.linalg.svd(columns.double())
    joint = s_rows[:, None] * s_cols[None, :]
    gain = torch.where(joint >= relative_cutoff * joint.max(), 1 / joint, torch.zeros_like(joint))
    device = corrupted.device
    rows, columns = rows.float().to(device), columns.float().to(device)
    u_rows, u_cols, gain = u_rows.float().to(device), u_cols.float().to(device), gain.float().to(device)
    v_rows, v_cols = v_rows.float().to(device), v_cols.float().to(device)
    observed = to_unit_range(corrupted.float())

    def project(clean: torch.Tensor) -> torch.Tensor:
        unit = to_unit_range(clean.float())
        residual = observed - rows @ unit @ columns.T
        correction = v_rows.T @ ((u_rows.T @ residual @ u_cols) * gain) @ v_cols
        return to_model_range(unit + correction).to(clean.dtype)

    return project


def estimate_blur_sigma(images: torch.Tensor, reblur_sigma: float = 1.0) -> torch.Tensor:
    """
    Per-image Gaussian blur std in pixels, from how much a known extra blur weakens the strongest edges (Hu and de
    Haan 2006): an edge blurred by `s` has a peak gradient proportional to `1 / s`; blurred again by `r` it has
    `1 / sqrt(s^2 + r^2)`, so the ratio `q` of the two gives `s = r / sqrt(q^2 - 1)`.

    Args:
        images (`torch.Tensor` of shape `(B, C, H, W)`): values in `[-1, 1]`, at least 8x8 pixels.
        reblur_sigma (`float`, defaults to 1.0): the extra blur `r`, pixels.

    Returns:
        `torch.Tensor` of shape `(B,)`: the estimate in pixels, clipped to `[0.3, MAX_BLUR_SIGMA]`. A sharp photo reads
        the blur it already holds (`SHARP_PHOTO_BLUR`; see `added_blur_sigma`); noise lowers the reading.
    """
    def peak_gradient(unit: torch.Tensor) -> torch.Tensor:
        grey = unit.mean(1)
        gradient = torch.zeros_like(grey)
        gradient[:, :, 1:-1] += ((grey[:, :, 2:] - grey[:, :, :-2]) / 2) ** 2
        gradient[:, 1:-1, :] += ((grey[:, 2:, :] - grey[:, :-2, :]) / 2) ** 2
        inner = gradient[:, 2:-2, 2:-2].flatten(1).sqrt()  # away from the mirrored edges
        return inner.topk(max(1, inner.shape[1] // 50), dim=1).values.mean(1)  # the strongest 2%

    unit = to_unit_range(images.float())
    again = to_unit_range(gaussian_blur(images.float(), reblur_sigma))
    ratio = peak_gradient(unit) / peak_gradient(again).clamp_min(1e-6)
    return (reblur_sigma / (ratio**2 - 1).clamp_min(1e-6).sqrt()).clamp(0.3, MAX_BLUR_SIGMA)


def added_blur_sigma(images: torch.Tensor, sharp: float = SHARP_PHOTO_BLUR) -> torch.Tensor:
    """The Gaussian blur std `(B,)` in pixels added to images that were `sharp` before: `sqrt(s^2 - sharp^2)` of the
    `estimate_blur_sigma` reading `s`, 0 where the reading is at or below `sharp`."""
    return (estimate_blur_sigma(images).double().pow(2) - sharp**2).clamp_min(0).sqrt()


def check_sigma(sigma: float) -> float:
    """`sigma` as a float if it is a finite number in `[0, 1]`, else `ValueError`."""
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not math.isfinite(sigma) or not 0 <= sigma <= 1:
        raise ValueError(f"noise_sigma must be a number in [0, 1] ([0, 1] image units), got {sigma!r}")
    return float(sigma)


# Noise std ([0, 1] units) of the smoothed reference that missing-pixel detection compares against.
DETECTION_SIGMA = 0.3
# Fresh-noise std ([0, 1] units) at which a restoration-trained model starts: low, so the input's detail survives.
LEARNED_RESTORATION_SIGMA = 0.05


@dataclass(frozen=True)
class RestorationPlan:
    """What `RobustDDPMPipeline` does with an `image=`: a validated choice among its restoration methods.

    `method`: `"sdedit"`, `"noise"` (noise-matched start), `"inpaint"`, `"linear"` (data consistency) or `"auto"`
    (detected per image, [`~pipelines.detection.detect_corruption`])."""

    method: str
    corruption: str | None = None
    severity: int | None = None
    noise_sigma: float | torch.Tensor | None = None  # a `(B,)` tensor: one std per image (detected noise)
    mask: Any = None
    strength: float | None = None
    blur_sigma: float | None = None  # Gaussian blur std in pixels, restored at any size (`separable_consistency`)

    @property
    def separable_blur(self) -> bool:
        """A Gaussian blur given in pixels, or to estimate (no severity): restored with its separable operator."""
        return self.method == "linear" and self.corruption == "gaussian_blur" and self.severity is None


def uses_separable_blur(plan: "RestorationPlan", height: int, width: int) -> bool:
    """Whether `plan` on `height x width` images is undone by the separable deblurring of `blur_sigma`: a blur given in
    pixels or to be estimated, or a named `gaussian_blur` severity from `PHOTO_METHODS_PIXELS` up."""
    named = plan.corruption == "gaussian_blur" and plan.severity is not None and plan.method == "linear"
    return plan.separable_blur or (named and height * width >= PHOTO_METHODS_PIXELS)


def restoration_method(plan: "RestorationPlan", height: int, width: int) -> str:
    """The method that runs for `plan` on `height x width` images: a linear corruption above `MAX_OPERATOR_PIXELS`
    gets the noise-matched start (`"noise"`), since its `(H*W, H*W)` operator matrix is not built, unless it is a
    Gaussian blur undone separably (`uses_separable_blur`)."""
    if plan.method == "linear" and not uses_separable_blur(plan, height, width) and height * width > MAX_OPERATOR_PIXELS:
        return "noise"
    return plan.method


def plan_restoration(
    corruption: str | None = None,
    severity: int | None = None,
    noise_sigma: float | None = None,
    mask: Any = None,
    strength: float | None = None,
    blur_sigma: float | None = None,
) -> RestorationPlan:
    """Check a combination of restoration arguments and choose the method; `ValueError` names a bad one."""
    if blur_sigma is not None:
        others = [n for n, v in (("severity", severity), ("noise_sigma", noise_sigma), ("mask", mask),
                                 ("strength", strength)) if v is not None]
        if others or corruption not in (None, "gaussian_blur"):
            raise ValueError(f"blur_sigma describes a Gaussian blur; do not combine it with "
                             f"{', '.join(others) or 'corruption ' + repr(corruption)}")
        if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, int | float) or not 0 < blur_sigma <= MAX_BLUR_SIGMA:
            raise ValueError(f"blur_sigma must be a Gaussian blur std in pixels in (0, {MAX_BLUR_SIGMA}], got {blur_sigma!r}")
        return RestorationPlan("linear", "gaussian_blur", blur_sigma=float(blur_sigma))
    if strength is not None:
        others = [n for n, v in (("corruption", corruption), ("severity", severity), ("noise_sigma", noise_sigma),
                                 ("mask", mask)) if v is not None]
        if others:
            raise ValueError(f"strength (SDEdit) cannot be combined with {', '.join(others)}")
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")
        return RestorationPlan("sdedit", strength=float(strength))
    if severity is not None and (corruption is None or corruption == "auto"):
        raise ValueError("severity needs a corruption name from the table (corruption='gaussian_noise', ...)")
    if noise_sigma is not None:
        if corruption not in (None, "gaussian_noise") or mask is not None:
            raise ValueError("noise_sigma describes Gaussian noise; do not combine it with another corruption or a mask")
        if severity is not None:
            raise ValueError("give noise_sigma or severity, not both")
        return RestorationPlan("noise", corruption="gaussian_noise", noise_sigma=check_sigma(noise_sigma))
    if mask is not None:
        if corruption is not None and canonical_name(corruption) not in MISSING_PIXEL_CORRUPTIONS:
            raise ValueError(f"mask= marks missing pixels; it does not fit corruption '{corruption}'")
        return RestorationPlan("inpaint", mask=mask)
    if corruption is None:
        return RestorationPlan("sdedit", strength=0.3)
    if corruption == "auto":
        return RestorationPlan("auto")
    name = canonical_name(corruption)
    if severity is not None:
        corruption_parameter(name, severity)  # checks 1..5
    if name in MISSING_PIXEL_CORRUPTIONS:
        return RestorationPlan("inpaint", corruption=name, severity=severity)
    if name == "gaussian_blur" and severity is None:
        return RestorationPlan("linear", name)  # its std is estimated per image (`estimate_blur_sigma`)
    if name in LINEAR_CORRUPTIONS or name == "gaussian_noise":
        if severity is None:
            raise ValueError(f"corruption '{name}' needs severity= (1..5) to know its operator or noise level")
        if name == "gaussian_noise":
            return RestorationPlan("noise", name, severity, noise_sigma=corruption_parameter(name, severity))
        return RestorationPlan("linear", name, severity)
    return RestorationPlan("noise", name, severity)
