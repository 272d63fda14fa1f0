"""What damaged an image: the detector behind `corruption="auto"` and `diffusers-robust restore` with no option.

Per image, in this order (images `(B, C, H, W)` in `[-1, 1]`; levels in `[0, 1]` image units). Two calibrations:
images under `FLAT_REGION_PIXELS` (16x16) by the one set on the train split of the 8x8 digits, larger ones by the one
set on the embedded photos (held-out figures for both: README, "What damaged it").

1. Missing pixels (`missing_pixel_evidence`). Black or white values that the prior's estimate disagrees with by more
   than 0.3: a white one means salt-and-pepper (`impulse_noise`), black ones alone a hole (`masking`). Clean edges at
   black or white agree with the prior, so they are not counted. From 16x16 up no prior is asked: a hole is a share of
   pixels black in every channel that their neighbours would fill brighter, salt-and-pepper a share of extreme values
   that stand out from their 3x3 median in an image that does not read as strongly noisy (clipped Gaussian noise leaves
   extreme values too).
2. Noise. Below 16x16, how noisy the prior finds the image: for each level `s` of `NOISE_LEVELS`, denoise as if the
   image held Gaussian noise of std `s` and measure the change (RMS, `[0, 1]` units). Noise of std `sigma` is removed
   whole while `s >= sigma`, so the change stays near `s`; an image the prior finds clean changes by much less. The
   estimate is the largest `s` whose change is at least `NOISE_RATIO` of it (0: the prior finds it clean). From 16x16
   up, the image's flat regions give the level (`estimated_noise_levels`, 0 under `CLEAN_READING`, as `annotate` reads
   it), corrected for 8-bit clipping by `photo_noise_std`.
3. Blur. Blurred images also look noisy to the prior, but hold almost no finest-scale detail for that noise level: their
   Haar diagonal noise estimate is below `BLUR_HIGH_FREQUENCY` times the level found, where noise keeps it near or
   above the level. The severity is the one whose undoing (pseudo-inverse of its operator) the prior finds most like
   its own images. Below 16x16 only: from there up a blurred image reads clean and is kept as it is, since the
   evidence is weak (`added_blur_sigma` reads more than 0.7 px of blur on 44% of the clean held-out 32x32 photos, which
   are soft themselves, and on 93% of those blurred by 1 px); name the blur (`blur_sigma=`) when it is known.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..data.annotations import estimated_noise_levels
from ..data.units import to_model_range, to_unit_range
from .restoration import (
    DETECTION_SIGMA,
    Denoiser,
    denoise_from_timestep,
    detect_missing_pixels,
    estimate_noise_sigma,
    fill_missing,
    noise_matched_timestep,
    operator_matrix,
    pseudo_inverse,
)

# Images of at least this many pixels (16x16) are judged by the photos' calibration: the noise level from the image's
# flat regions (`estimated_noise_levels`, as `annotate` reads it) and the missing-pixel rules below; smaller ones (the
# 8x8 digits, where too few regions are flat) by the prior (`noise_level`) and the digits' rules.
FLAT_REGION_PIXELS = 16 * 16
# Salt-and-pepper from 16x16 up: values at black or white that differ from the median of their 3x3 neighbourhood (per
# channel) by more than `IMPULSE_CONTRAST`, at least `IMPULSE_SHARE` of them per pixel (`impulse_evidence`), and a noise
# reading (`photo_noise_std` of the flat regions, which impulses hardly touch) under `IMPULSE_MAX_NOISE`. On the 8-bit
# training photos: 98.9% of tiles under 5% salt-and-pepper flagged (held-out 100%), 1 of 547 clean tiles, none under
# Gaussian noise of std 0.1 or 0.2; 99% of salted tiles read under 0.074, 99% under noise of std 0.2 above 0.079. (The
# prior's estimate at noise 0.1, used before, follows a full-scale impulse: 10 of 96 held-out salted tiles read clean.)
IMPULSE_CONTRAST = 0.3
IMPULSE_SHARE = 0.01
IMPULSE_MAX_NOISE = 0.077
# Holes from 16x16 up: the least share of pixels black in every channel (`HOLE_SHARE`), and of those pixels that their
# known neighbours would fill brighter than `HOLE_CONTRAST` (`HOLE_EVIDENCE`; a dark photo's own black stays black). On
# the 8-bit training photos: clipped Gaussian noise of std 0.1-0.3 leaves at most 12.3% black (dark tiles), 20% missing
# pixels at least 16.3%, 50% at least 44.7%; both rules together flag 3 of 547 clean tiles (0.5%) and 84% / 90% of tiles
# with 20% / 50% missing pixels (the rest are dark, where a hole costs little; held-out tiles: 97%). With a contrast of
# 0.3: 0.2% and 76% / 81%. `tests/test_photos.py` re-measures these.
HOLE_SHARE = 0.15
HOLE_CONTRAST = 0.15
HOLE_EVIDENCE = 0.05
# (reading, std): the median `estimate_noise_std` reading of the 8-bit training photos under Gaussian noise of that std.
# Clipping at black and white lowers the reading as the noise grows (0.166 at 0.2), so from 16x16 up a reading is mapped
# back to the std through this table (`photo_noise_std`; `tests/test_photos.py` re-measures it).
PHOTO_NOISE_READINGS = ((0.049, 0.05), (0.073, 0.075), (0.096, 0.1), (0.116, 0.125), (0.134, 0.15), (0.166, 0.2),
                        (0.192, 0.25), (0.215, 0.3), (0.259, 0.4))
# Levels ([0, 1] units) at which the prior is asked how much it would change the image.
NOISE_LEVELS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
# Change / level at or above which the image holds at least that much noise (train split medians with a prior trained on
# clean digits: clean digits at most 0.33 at any level; noise of std s 0.53-0.61 at s). `benchmarks/calibrate_detector.py`
# re-measures this and the two constants below into `benchmarks/detector_calibration.json`; `tests/test_detection.py`
# checks them against it.
NOISE_RATIO = 0.58
# The finest-scale (Haar diagonal) noise estimate over the noise level the prior sees: noise keeps it high, blur takes
# it low. Below this, the image is blurred. Within 1 point of the threshold with the fewest errors in the worst case
# (train split: at most 5.3% of noisy digits under it (std 0.3), 3% of blur s3 above; 0.35-0.36 would give 4.3%); blur
# s2 is half caught (43%), s1 reads clean.
BLUR_HIGH_FREQUENCY = 0.38
# Relative singular-value cutoff of the pseudo-inverse that tests each blur severity: the largest cutoff whose share of
# severities picked right is within 1 point of the best (train split, s1-s5: 0.01 99.7%, 0.02 99.5%, 0.05 98.0%, the
# restoration's 0.1 86.7%: 36% at s4). A larger cutoff amplifies less of the image's own noise.
SEVERITY_TEST_CUTOFF = 0.02


@dataclass(frozen=True)
class Detection:
    """What damaged one image, and the restoration it calls for.

    `corruption`: `None` (clean), `"gaussian_noise"`, `"impulse_noise"`, `"masking"` or `"gaussian_blur"`; `severity`
    (blur, 1..5) or `noise_sigma` (Gaussian noise std, `[0, 1]` units) when it has one."""

    corruption: str | None
    severity: int | None = None
    noise_sigma: float | None = None

    @property
    def method(self) -> str:
        """`"none"` (kept as it is), `"noise"`, `"inpaint"` or `"linear"`: the pipeline's restoration method."""
        return {None: "none", "gaussian_noise": "noise", "gaussian_blur": "linear"}.get(self.corruption, "inpaint")

    def to_dict(self) -> dict:
        return {**asdict(self), "method": self.method}


def photo_noise_std(readings: torch.Tensor) -> torch.Tensor:
    """The Gaussian noise std `(B,)` behind `estimate_noise_std` readings `(B,)` of 8-bit photos, through
    `PHOTO_NOISE_READINGS` (linear between entries and beyond the last, at most 0.5); readings under the first entry,
    where clipping does not matter, are kept."""
    table = torch.tensor(PHOTO_NOISE_READINGS, dtype=torch.float64)
    readings = readings.double()
    index = torch.searchsorted(table[:, 0].contiguous(), readings).clamp(1, len(table) - 1)
    (x0, y0), (x1, y1) = table[index - 1].unbind(-1), table[index].unbind(-1)
    mapped = (y0 + (readings - x0) * (y1 - y0) / (x1 - x0)).clamp(max=0.5)
    return torch.where(readings < table[0, 0], readings, mapped)


def prior_change(denoiser: Denoiser, alphas: torch.Tensor, images: torch.Tensor, level: float) -> torch.Tensor:
    """RMS change `(B,)` (`[0, 1]` units) when the prior denoises `images` as if they held Gaussian noise of std `level`."""
    start = noise_matched_timestep(alphas, torch.full((images.shape[0],), level))
    sample = alphas[start].view(-1, 1, 1, 1).sqrt().to(images.dtype) * images
    clean = denoise_from_timestep(denoiser, alphas, sample, start, 1)
    return ((images - clean) / 2).flatten(1).pow(2).mean(1).sqrt().double().cpu()


@torch.no_grad()
def noise_ratios(denoiser: Denoiser, alphas_cumprod: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The prior's change over the level, `(B, len(NOISE_LEVELS))`: `prior_change` at each level of `NOISE_LEVELS`
    divided by that level (near 1 or above while the level is at most the image's noise std, well below on clean images)."""
    alphas = alphas_cumprod.to(images.device)
    return torch.stack([prior_change(denoiser, alphas, images, level) / level for level in NOISE_LEVELS], dim=1)


def level_from_ratios(ratios: torch.Tensor, threshold: float = NOISE_RATIO) -> torch.Tensor:
    """Where each row of `noise_ratios` `(B, L)` falls through `threshold`, `(B,)` in `[0, 1]` units (interpolated between
    the two levels of `NOISE_LEVELS` around it); 0 where it stays below at every level."""
    levels = torch.tensor(NOISE_LEVELS, dtype=torch.float64)
    estimate = torch.zeros(ratios.shape[0], dtype=torch.float64)
    for index, row in enumerate(ratios):
        above = (row >= threshold).nonzero()
        if len(above) == 0:
            continue
        last = int(above[-1])
        if last + 1 == len(levels):
            estimate[index] = levels[last]
            continue
        fraction = (row[last] - threshold) / (row[last] - row[last + 1]).clamp_min(1e-12)
        estimate[index] = levels[last] + fraction.clamp(0, 1) * (levels[last + 1] - levels[last])
    return estimate


def noise_level(denoiser: Denoiser, alphas_cumprod: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Where the prior's change over the level falls through `NOISE_RATIO`, `(B,)` in `[0, 1]` units (interpolated between
    the two levels of `NOISE_LEVELS` around it); 0 where it stays below at every level."""
    return level_from_ratios(noise_ratios(denoiser, alphas_cumprod, images))


@torch.no_grad()
def blur_severity(denoiser: Denoiser, alphas_cumprod: torch.Tensor, images: torch.Tensor,
                  cutoff: float = SEVERITY_TEST_CUTOFF) -> torch.Tensor:
    """The severity `(B,)` (1..5) of `gaussian_blur` whose undoing looks most like the prior's images: each image is
    deblurred with the pseudo-inverse of each severity's operator (singular values under `cutoff` times the largest
    dropped), and the one the prior changes least (at noise levels 0.05 and 0.1) wins. For images under
    `FLAT_REGION_PIXELS`."""
    alphas = alphas_cumprod.to(images.device)
    batch, channels, height, width = images.shape
    scores = []
    for severity in range(1, 6):
        inverse = pseudo_inverse(operator_matrix("gaussian_blur", severity, height, width), cutoff)
        inverse = inverse.to(images.device)
        unit = to_unit_range(images).reshape(batch * channels, height * width) @ inverse.T
        deblurred = to_model_range(unit.reshape(batch, channels, height, width)).clamp(-1, 1)
        scores.append(sum(prior_change(denoiser, alphas, deblurred, level) for level in (0.05, 0.1)))
    return torch.stack(scores, dim=1).argmin(dim=1) + 1


def _reference(denoiser: Denoiser, alphas: torch.Tensor, images: torch.Tensor, level: float) -> torch.Tensor:
    """The prior's posterior mean of `images` read as holding Gaussian noise of std `level` (`[0, 1]` units)."""
    start = noise_matched_timestep(alphas, torch.full((images.shape[0],), level))
    return denoise_from_timestep(denoiser, alphas, alphas[start].view(-1, 1, 1, 1).sqrt().to(images.dtype) * images,
                                 start, 1)


def missing_pixel_evidence(denoiser: Denoiser, alphas: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """
    `(salt, holes)`, each `(B,)` bool: evidence of missing pixels.

    Below `FLAT_REGION_PIXELS` (the digits' calibration): black or white values that the prior's smooth estimate at
    `DETECTION_SIGMA` disagrees with by more than 0.3; a white one means salt-and-pepper, black ones alone holes. From
    there up (the photos' calibration), no prior: holes need `HOLE_SHARE` of the pixels black in every channel (clipped
    noise rarely darkens all three channels of a pixel at once) and `HOLE_EVIDENCE` of them far from black once filled
    from their neighbours (`hole_evidence`); salt-and-pepper, where there are no holes, needs `IMPULSE_SHARE` extreme
    values per pixel that stand out from their neighbourhood (`impulse_evidence`; `detect_corruption` also asks for a
    noise reading under `IMPULSE_MAX_NOISE`, since clipped Gaussian noise leaves extreme values too).
    """
    if images.shape[-1] * images.shape[-2] < FLAT_REGION_PIXELS:
        smooth = _reference(denoiser, alphas, images, DETECTION_SIGMA)
        black_flagged = detect_missing_pixels(images, smooth, "masking")
        salt = (detect_missing_pixels(images, smooth, "impulse_noise") & ~black_flagged).flatten(1).any(1)
        return salt.cpu(), black_flagged.flatten(1).any(1).cpu()
    black, contrasted = hole_evidence(images)
    holes = (black >= HOLE_SHARE) & (contrasted >= HOLE_EVIDENCE)
    return ((impulse_evidence(images) >= IMPULSE_SHARE) & ~holes).cpu(), holes.cpu()


def impulse_evidence(images: torch.Tensor) -> torch.Tensor:
    """Values at black or white (8-bit) that differ from the median of their 3x3 neighbourhood (same channel, edges
    replicated) by more than `IMPULSE_CONTRAST`, per pixel `(B,)` (a pixel hit in all three channels counts 3)."""
    unit = to_unit_range(images.float())
    batch, channels, height, width = unit.shape
    padded = F.pad(unit.reshape(batch * channels, 1, height, width), (1, 1, 1, 1), mode="replicate")
    median = F.unfold(padded, 3).median(dim=1).values.view(batch, channels, height, width)
    extreme = (unit < 0.5 / 255) | (unit > 1 - 0.5 / 255)
    return (extreme & ((unit - median).abs() > IMPULSE_CONTRAST)).flatten(1).float().sum(1) / (height * width)


def hole_evidence(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(black, contrasted)`, each `(B,)`: the share of pixels black in every channel, and the share of pixels that are
    black but filled from their neighbours (`fill_missing`) come out brighter than `HOLE_CONTRAST` in some channel."""
    black = (to_unit_range(images) < 0.5 / 255).all(dim=1, keepdim=True)
    filled = to_unit_range(fill_missing(images, black))
    contrasted = black & (filled.amax(dim=1, keepdim=True) > HOLE_CONTRAST)
    return black.flatten(1).float().mean(1), contrasted.flatten(1).float().mean(1)


@torch.no_grad()
def detect_corruption(denoiser: Denoiser, alphas_cumprod: torch.Tensor, images: torch.Tensor) -> list[Detection]:
    """
    Detect what damaged each image (see the module docstring).

    Args:
        denoiser: `(x_t, t) -> eps`, the pipeline's prior.
        alphas_cumprod (`torch.Tensor` of shape `(T,)`).
        images (`torch.Tensor` of shape `(B, C, H, W)`): values in `[-1, 1]`.

    Returns:
        One [`Detection`] per image.
    """
    alphas = alphas_cumprod.to(images.device)
    salt, holes = missing_pixel_evidence(denoiser, alphas, images)
    small = images.shape[-1] * images.shape[-2] < FLAT_REGION_PIXELS
    sigma = noise_level(denoiser, alphas, images) if small else photo_noise_std(estimated_noise_levels(images).cpu())
    high_frequency = estimate_noise_sigma(images).double().cpu() / sigma.clamp_min(1e-3)
    if not small:
        salt = salt & (sigma < IMPULSE_MAX_NOISE)
    blurred = ((sigma > 0) & (high_frequency < BLUR_HIGH_FREQUENCY) & ~salt.cpu() & ~holes.cpu() & small).nonzero()
    blurred = blurred.flatten().tolist()
    severities = dict(zip(blurred, blur_severity(denoiser, alphas, images[blurred]).tolist(), strict=True)) if blurred else {}
    detections = []
    for index in range(images.shape[0]):
        if salt[index]:
            detections.append(Detection("impulse_noise"))
        elif holes[index]:
            detections.append(Detection("masking"))
        elif index in severities:
            detections.append(Detection("gaussian_blur", int(severities[index])))
        elif sigma[index] > 0:
            detections.append(Detection("gaussian_noise", noise_sigma=float(sigma[index])))
        else:
            detections.append(Detection(None))
    return detections
