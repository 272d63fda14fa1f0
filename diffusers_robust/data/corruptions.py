"""Batched, seeded image corruptions with the CIFAR-10-C severity table.

Every op takes images `(B, C, H, W)` in `[-1, 1]` on any device and returns a tensor of the same shape,
dtype and device, clamped to `[-1, 1]`. Parameters are in the units of the CIFAR-10-C table
(Hendrycks & Dietterich, ICLR 2019), which are defined on `[0, 1]` images; the ops convert internally.
Random ops take an optional `torch.Generator`: the same seed gives the same output, and every sample
(and pixel) of a batch draws its own noise.
"""

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
import yaml

from .units import to_model_range, to_unit_range

# Parameter per severity 1..5. Units: see each op's docstring.
SEVERITY_TABLE: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    # Not in CIFAR-10-C: the fraction of pixels masked, half as one random square box, half as pixel dropout.
    "masking": (0.05, 0.1, 0.2, 0.3, 0.4),
}
CORRUPTIONS: tuple[str, ...] = tuple(SEVERITY_TABLE)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor of shape (B, C, H, W) in [-1, 1], got {shape}")


def _from_unit(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return to_model_range(images.clamp(0, 1)).to(dtype)


def _random(kind: str, shape: Sequence[int], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform or normal float32 draws made on the generator's device, moved to `like`'s device."""
    device = generator.device if generator is not None else like.device
    draw = torch.rand if kind == "uniform" else torch.randn
    return draw(tuple(shape), generator=generator, device=device, dtype=torch.float32).to(like.device)


def gaussian_noise(images: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add white noise `N(0, sigma^2)`; `sigma` in `[0, 1]` units (0.04..0.10 for severities 1..5)."""
    _check_images(images)
    unit = to_unit_range(images.float())
    return _from_unit(unit + sigma * _random("normal", unit.shape, unit, generator), images.dtype)


def shot_noise(images: torch.Tensor, photons: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Poisson noise `Poisson(x * photons) / photons`; fewer photons is noisier (500..50)."""
    _check_images(images)
    unit = to_unit_range(images.float()).clamp(0, 1)
    device = generator.device if generator is not None else unit.device
    counts = torch.poisson((unit * photons).to(device), generator=generator).to(unit.device)
    return _from_unit(counts / photons, images.dtype)


def impulse_noise(images: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Salt and pepper: a fraction `amount` of the values is set to 0 or 1 (half each), per channel."""
    _check_images(images)
    unit = to_unit_range(images.float())
    hit = _random("uniform", unit.shape, unit, generator) < amount
    salt = _random("uniform", unit.shape, unit, generator) < 0.5
    unit = torch.where(hit, salt.to(unit.dtype), unit)
    return _from_unit(unit, images.dtype)


def speckle_noise(images: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multiplicative noise `x + x * N(0, scale^2)`."""
    _check_images(images)
    unit = to_unit_range(images.float())
    return _from_unit(unit + unit * scale * _random("normal", unit.shape, unit, generator), images.dtype)


def gaussian_blur(images: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Separable Gaussian blur with standard deviation `sigma` in pixels, reflect padding. Deterministic."""
    _check_images(images)
    if sigma <= 0:
        return images.clone()
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    batch, channels, height, width = images.shape
    flat = to_unit_range(images.float()).reshape(batch * channels, 1, height, width)
    pad = min(radius, height - 1, width - 1)
    kernel = kernel[radius - pad : radius + pad + 1]
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), kernel.view(1, 1, -1, 1))
    return _from_unit(flat.reshape(batch, channels, height, width), images.dtype)


def jpeg_compression(images: torch.Tensor, quality: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Encode and decode each image as JPEG at `quality` (1..95) with Pillow. Deterministic; runs on the CPU."""
    _check_images(images)
    unit = to_unit_range(images.float()).clamp(0, 1)
    arrays = (unit.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    decoded = []
    for array in arrays:
        picture = PIL.Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=int(quality))
        restored = np.asarray(PIL.Image.open(buffer), dtype=np.float32) / 255
        decoded.append(restored[..., None] if restored.ndim == 2 else restored)
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).to(images.device)
    return _from_unit(out, images.dtype)


def contrast(images: torch.Tensor, factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scale each channel's deviation from its mean by `factor` (< 1 lowers contrast)."""
    _check_images(images)
    unit = to_unit_range(images.float())
    means = unit.mean(dim=(2, 3), keepdim=True)
    return _from_unit((unit - means) * factor + means, images.dtype)


def brightness(images: torch.Tensor, delta: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add `delta` to the HSV value channel (hue and saturation kept); for one channel, add it to the pixel."""
    _check_images(images)
    unit = to_unit_range(images.float()).clamp(0, 1)
    value = unit.amax(dim=1, keepdim=True)
    new_value = (value + delta).clamp(0, 1)
    # RGB = V * f(H, S): scaling by new_value / value moves V alone; black pixels (S = 0) become grey.
    scaled = torch.where(value > 0, unit * (new_value / value.clamp_min(1e-12)), new_value.expand_as(unit))
    return _from_unit(scaled, images.dtype)


def pixelate(images: torch.Tensor, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Box-downsample to `scale` of the size, then upsample back to `(H, W)` by pixel replication, as
    CIFAR-10-C does with Pillow's box filter.

    Note: at 32x32 the table's scales .95/.9/.85 mostly shift content by whole pixels, so the error is not
    monotone in severity (figures: `benchmarks/RESULTS.md`, "Figures behind the code")."""
    _check_images(images)
    height, width = images.shape[-2:]
    small = (max(1, int(height * scale)), max(1, int(width * scale)))
    unit = F.interpolate(to_unit_range(images.float()), size=small, mode="area")
    return _from_unit(F.interpolate(unit, size=(height, width), mode="nearest-exact"), images.dtype)


def masking(images: torch.Tensor, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Set an expected `fraction` of each image's pixels to black (-1): one random square box covering
    `fraction / 2` of the area, and random pixel dropout (all channels) for the rest."""
    _check_images(images)
    if not 0 <= fraction < 1:
        raise ValueError(f"masking fraction must be in [0, 1), got {fraction}")
    batch, _, height, width = images.shape
    side_h = round(height * math.sqrt(fraction / 2))
    side_w = round(width * math.sqrt(fraction / 2))
    corners = _random("uniform", (batch, 2), images, generator)
    top = (corners[:, 0] * (height - side_h + 1)).floor().long().clamp(max=height - side_h)
    left = (corners[:, 1] * (width - side_w + 1)).floor().long().clamp(max=width - side_w)
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < (top + side_h).view(-1, 1, 1))
           & (cols >= left.view(-1, 1, 1)) & (cols < (left + side_w).view(-1, 1, 1)))
    box_fraction = side_h * side_w / (height * width)
    drop_probability = max(0.0, (fraction - box_fraction) / (1 - box_fraction)) if box_fraction < 1 else 0.0
    dropped = _random("uniform", (batch, height, width), images, generator) < drop_probability
    mask = (box | dropped).unsqueeze(1)
    return images.masked_fill(mask, -1.0)


CORRUPTION_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "jpeg_compression": jpeg_compression,
    "contrast": contrast,
    "brightness": brightness,
    "pixelate": pixelate,
    "masking": masking,
}
# Aliases users reach for; each maps to one canonical name.
ALIASES = {"salt_and_pepper": "impulse_noise", "blur": "gaussian_blur", "jpeg": "jpeg_compression"}


def canonical_name(name: str) -> str:
    """Resolve an alias (`salt_and_pepper`, `blur`, `jpeg`) and check the name exists."""
    resolved = ALIASES.get(name, name)
    if resolved not in CORRUPTION_OPS:
        raise ValueError(f"unknown corruption '{name}'; choose from {sorted(CORRUPTION_OPS) + sorted(ALIASES)}")
    return resolved


def corruption_parameter(name: str, severity: int) -> float:
    """The table's parameter for `name` at `severity` 1..5."""
    name = canonical_name(name)
    if isinstance(severity, bool) or int(severity) != severity or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an integer from 1 to 5, got {severity!r}")
    return SEVERITY_TABLE[name][int(severity) - 1]


def apply_corruption(
    images: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""
    Corrupt a batch with corruption `name` at CIFAR-10-C `severity`.

    Args:
        images (`torch.Tensor` of shape `(B, C, H, W)`): values in `[-1, 1]`, any device, float dtype.
        name (`str`): one of `CORRUPTIONS` (`gaussian_noise`, `shot_noise`, `impulse_noise` (alias
            `salt_and_pepper`), `speckle_noise`, `gaussian_blur`, `jpeg_compression`, `contrast`,
            `brightness`, `pixelate`, `masking`).
        severity (`int`): 1 (mildest) to 5.
        generator (`torch.Generator`, *optional*): seeds the random ops.

    Returns:
        `torch.Tensor` like `images`, in `[-1, 1]`.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_robust.data.corruptions import apply_corruption
    >>> x = torch.zeros(2, 3, 32, 32)
    >>> y = apply_corruption(x, "gaussian_noise", 3, generator=torch.Generator().manual_seed(0))
    >>> y.shape
    torch.Size([2, 3, 32, 32])
    ```
    """
    parameter = corruption_parameter(name, severity)
    return CORRUPTION_OPS[canonical_name(name)](images, parameter, generator=generator)


class RandomCorruption:
    r"""
    Corrupt each sample of a batch with probability `p`, with a corruption drawn uniformly from `corruptions`
    and a severity drawn uniformly from `severity` (inclusive range).

    Args:
        corruptions (`Sequence[str]`): corruption names (see [`apply_corruption`]).
        severity (`tuple[int, int]`, defaults to `(1, 5)`): inclusive range of severities.
        p (`float`, defaults to 0.5): probability that a sample is corrupted.

    Example:

    ```py
    >>> import torch
    >>> from diffusers_robust.data.corruptions import RandomCorruption
    >>> corrupt = RandomCorruption(["gaussian_noise", "salt_and_pepper"], severity=(1, 3), p=0.5)
    >>> images, applied = corrupt(torch.zeros(4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    >>> len(applied)  # one entry per sample: None or (name, severity)
    4
    ```
    """

    def __init__(self, corruptions: Sequence[str], severity: tuple[int, int] | Sequence[int] = (1, 5), p: float = 0.5):
        if isinstance(corruptions, str) or not corruptions:
            raise ValueError("corruptions must be a non-empty list of corruption names")
        self.corruptions = [canonical_name(name) for name in corruptions]
        low, high = (int(severity[0]), int(severity[1])) if isinstance(severity, Sequence) else (severity, severity)
        for value in (low, high):
            corruption_parameter(self.corruptions[0], value)
        if low > high:
            raise ValueError(f"severity range must be (low, high) with low <= high, got {tuple(severity)}")
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.severity = (low, high)
        self.p = float(p)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[tuple[str, int] | None]]:
        """Return the corrupted batch `(B, C, H, W)` and, per sample, `(name, severity)` or `None` if untouched."""
        _check_images(images)
        batch = images.shape[0]
        device = generator.device if generator is not None else torch.device("cpu")
        chosen = torch.rand(batch, generator=generator, device=device) < self.p
        kinds = torch.randint(len(self.corruptions), (batch,), generator=generator, device=device)
        levels = torch.randint(self.severity[0], self.severity[1] + 1, (batch,), generator=generator, device=device)
        applied: list[tuple[str, int] | None] = [
            (self.corruptions[int(k)], int(s)) if c else None for c, k, s in zip(chosen, kinds, levels, strict=True)
        ]
        out = images.clone()
        for key in sorted({a for a in applied if a is not None}):
            index = torch.tensor([i for i, a in enumerate(applied) if a == key], device=images.device)
            out[index] = apply_corruption(images[index], key[0], key[1], generator=generator)
        return out, applied

    @property
    def label_dim(self) -> int:
        """Length of [`labels`]: one slot per corruption in the list."""
        return len(self.corruptions)

    def labels(self, applied: list[tuple[str, int] | None], device: torch.device | str = "cpu") -> torch.Tensor:
        """Corruption labels `(B, label_dim)`: `severity / 5` in the slot of the applied corruption, zeros for
        untouched samples. Fed to the UNet beside the augment labels, so it can tell corrupted training images
        apart and generate clean ones from zero labels (non-leaking, like augmentation)."""
        labels = torch.zeros(len(applied), self.label_dim, device=device)
        for row, item in enumerate(applied):
            if item is not None:
                labels[row, self.corruptions.index(item[0])] = item[1] / 5.0
        return labels

    def to_dict(self) -> dict[str, Any]:
        return {"corruptions": list(self.corruptions), "severity": list(self.severity), "p": self.p}

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "RandomCorruption":
        unknown = set(config) - {"corruptions", "severity", "p"}
        if unknown:
            raise ValueError(f"unknown RandomCorruption key(s) {sorted(unknown)}; expected corruptions, severity, p")
        return cls(**config)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "RandomCorruption":
        return cls.from_dict(yaml.safe_load(text))

    def __repr__(self) -> str:
        return f"RandomCorruption(corruptions={self.corruptions}, severity={self.severity}, p={self.p})"
