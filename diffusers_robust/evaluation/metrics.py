"""Figures that score images: restoration (PSNR, SSIM), distribution distances (FID, KID) over a pluggable feature
extractor, memorisation (nearest-neighbour distances), and the digits classifier; each also as a [`Metric`]
(`name`, `compute(images, reference) -> figures`), the interface through which the report uses them.

Every metric takes image tensors `(B, C, H, W)` in `[-1, 1]` and reports on the `[0, 1]` scale.
"""

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..data.units import to_unit_range


def psnr(restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of `(B, C, H, W)` images in `[-1, 1]`, on the `[0, 1]` scale (peak 1)."""
    mse = (((restored - clean) / 2) ** 2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


def mean_psnr(restored: torch.Tensor, clean: torch.Tensor) -> float:
    """PSNR in dB of the mean squared error over a whole set of images (`[0, 1]` scale): unlike the mean of per-image
    PSNRs, an image left untouched by a corruption does not count as infinitely good."""
    return float(-10 * torch.log10((((restored.float() - clean.float()) / 2) ** 2).mean().clamp_min(1e-12)))


def ssim(restored: torch.Tensor, clean: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """
    Per-image SSIM (Wang et al. 2004) of `(B, C, H, W)` images in `[-1, 1]`, on the `[0, 1]` scale: Gaussian window of
    `sigma` pixels and `min(window, H, W)` taps (odd), reflect padding, averaged over pixels and channels.
    """
    x, y = to_unit_range(restored.float()), to_unit_range(clean.float())
    taps = min(window, x.shape[-2], x.shape[-1])
    taps -= 1 - taps % 2
    offsets = torch.arange(taps, dtype=torch.float32, device=x.device) - taps // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    kernel = (kernel.transpose(1, 2) @ kernel).unsqueeze(0).expand(x.shape[1], 1, taps, taps)

    def blur(image: torch.Tensor) -> torch.Tensor:
        padded = F.pad(image, [taps // 2] * 4, mode="reflect") if taps > 1 else image
        return F.conv2d(padded, kernel, groups=image.shape[1])

    mean_x, mean_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mean_x**2, blur(y * y) - mean_y**2
    cov = blur(x * y) - mean_x * mean_y
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1)


def median_filter(images: torch.Tensor, size: int = 3) -> torch.Tensor:
    """The classic baseline: a `size x size` median filter per channel, reflect padding; `(B, C, H, W)` in, same out."""
    pad = size // 2
    padded = F.pad(images, [pad] * 4, mode="reflect")
    patches = padded.unfold(2, size, 1).unfold(3, size, 1)  # (B, C, H, W, size, size)
    return patches.flatten(-2).median(dim=-1).values


class PixelFeatures:
    """An offline feature extractor for FID/KID: grey images area-resized to `size x size`, flattened, in `[0, 1]`.
    Figures made with it are labelled as such; they are not comparable with published (Inception) FID."""

    def __init__(self, size: int = 16):
        self.size = size
        self.name = f"pixels-{size}x{size} (offline; not comparable with Inception FID)"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        grey = to_unit_range(images.float()).mean(dim=1, keepdim=True)
        return F.interpolate(grey, size=(self.size, self.size), mode="area").flatten(1)


class InceptionFeatures:
    """
    The 2048-d pool features of Inception-v3 as published FID uses them, from a TorchScript file given by path
    (`inception-2015-12-05.pt`, the one NVlabs' StyleGAN metrics and clean-fid load); nothing is downloaded.
    Grey images are repeated to RGB; the model resizes to 299x299 itself.
    """

    def __init__(self, weights_path: str, device: torch.device | str = "cpu"):
        import os

        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"Inception weights {weights_path} do not exist (a TorchScript .pt file is expected)")
        try:
            self.model = torch.jit.load(weights_path, map_location=device).eval()
        except (RuntimeError, ValueError) as error:  # not a TorchScript archive (a state dict, a text file, a truncation)
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"Inception weights {weights_path} are not a TorchScript file ({message}); pass the "
                             "TorchScript Inception-v3 of the FID reference implementations") from None
        self.device = device
        self.name = f"inception-v3 ({os.path.basename(weights_path)})"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        uint8 = ((rgb.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).to(self.device)
        return self.model(uint8, return_features=True).float().cpu()


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID between two feature sets `(N, D)`: `|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`."""
    from scipy import linalg

    a, b = features_a.double().numpy(), features_b.double().numpy()
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product: regularise as the reference implementation does
        offset = np.eye(cov_a.shape[0]) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def kernel_inception_distance(features_a: torch.Tensor, features_b: torch.Tensor, subsets: int = 10,
                              subset_size: int = 1000, seed: int = 0) -> float:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel `(x.y / D + 1)^3`, averaged over random subsets."""
    a, b = features_a.double(), features_b.double()
    size = min(subset_size, a.shape[0], b.shape[0])
    if size < 2:
        raise ValueError("KID needs at least 2 images on each side")
    generator = torch.Generator().manual_seed(seed)
    dim, total = a.shape[1], 0.0
    for _ in range(subsets):
        x = a[torch.randperm(a.shape[0], generator=generator)[:size]]
        y = b[torch.randperm(b.shape[0], generator=generator)[:size]]
        kxx, kyy, kxy = ((x @ x.T) / dim + 1) ** 3, ((y @ y.T) / dim + 1) ** 3, ((x @ y.T) / dim + 1) ** 3
        off_diagonal = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (size * (size - 1))
        total += float(off_diagonal - 2 * kxy.mean())
    return total / subsets


# The neighbour whose distance sets a k-NN ball's radius in `manifold_figures` (Naeem et al.'s choice).
MANIFOLD_NEIGHBOURS = 5


def manifold_figures(features: torch.Tensor, real_features: torch.Tensor, k: int = MANIFOLD_NEIGHBOURS) -> dict[str, float]:
    r"""
    Fidelity and diversity of samples apart, from k-nearest-neighbour balls in a feature space: each point's ball
    reaches its `k`-th nearest neighbour in its own set.

    - `precision` (Kynkäänniemi et al. 2019): share of samples inside some real image's ball (fidelity).
    - `recall`: share of real images inside some sample's ball (diversity).
    - `density` (Naeem et al. 2020): real balls holding a sample, counted per sample, divided by `k` (1 on average
      when the samples are distributed as the real images; a sample in many balls counts for more).
    - `coverage` (Naeem et al. 2020): share of real images whose ball holds at least one sample. A model that collapses
      onto a few typical images keeps a high precision (and confident share) but covers little of the real data.

    Args:
        features (`torch.Tensor` of shape `(M, D)`): the samples' features; `real_features` `(N, D)` the held-out
            images'; both need more than `k` points.
        k (`int`, defaults to `MANIFOLD_NEIGHBOURS`, 5): the neighbour that sets a ball's radius.

    Returns:
        `dict` of the four figures, each in `[0, 1]` except `density` (`[0, N / k]`).
    """
    if min(features.shape[0], real_features.shape[0]) <= k:
        raise ValueError(f"manifold_figures needs more than k={k} points on each side, got {features.shape[0]} and "
                         f"{real_features.shape[0]}")
    fake, real = features.double(), real_features.double()
    real_radius = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # (N,); the 1st "neighbour" is the point itself
    fake_radius = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values  # (M,)
    distance = torch.cdist(fake, real)  # (M, N)
    inside_real = distance <= real_radius.unsqueeze(0)
    return {
        "precision": float(inside_real.any(dim=1).double().mean()),
        "recall": float((distance <= fake_radius.unsqueeze(1)).any(dim=0).double().mean()),
        "density": float(inside_real.sum(dim=1).double().mean() / k),
        "coverage": float(inside_real.any(dim=0).double().mean()),
    }


def nearest_neighbour_distance(queries: torch.Tensor, references: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Per query image, the RMS pixel distance (`[0, 1]` units) to its nearest reference image; `(N,)`."""
    refs = to_unit_range(references.float()).flatten(1)
    out = []
    for start in range(0, queries.shape[0], batch_size):
        q = to_unit_range(queries[start:start + batch_size].float()).flatten(1)
        out.append((torch.cdist(q, refs) / refs.shape[1] ** 0.5).min(dim=1).values)
    return torch.cat(out)


def copying_share(images: torch.Tensor, train_images: torch.Tensor, ratio: float = 1 / 3, batch_size: int = 256) -> float:
    """Share of `images` whose nearest train image is much closer than the second nearest: `d1 / d2 < ratio` (RMS pixel
    distances; a sample that copies one train image sits next to it and far from all others). Both `(N, C, H, W)` in
    `[-1, 1]`; `train_images` needs at least 2 images. Compare with the same figure for held-out images."""
    if train_images.shape[0] < 2:
        raise ValueError("copying_share needs at least 2 train images")
    refs = to_unit_range(train_images.float()).flatten(1)
    copies = 0
    for start in range(0, images.shape[0], batch_size):
        queries = to_unit_range(images[start:start + batch_size].float()).flatten(1)
        nearest = torch.cdist(queries, refs).topk(2, dim=1, largest=False).values
        copies += int((nearest[:, 0] < ratio * nearest[:, 1]).sum())
    return copies / images.shape[0]


@dataclass
class Reference:
    """What a metric compares against: held-out `images` `(N, C, H, W)` in `[-1, 1]`, and where known their class
    `labels` `(N,)` and `train_images` (for memorisation)."""

    images: torch.Tensor
    labels: np.ndarray | None = None
    train_images: torch.Tensor | None = None


class Metric(Protocol):
    """A figure of images against a [`Reference`]: `compute(images, reference)` returns named figures. Generation
    metrics receive samples; restoration metrics receive restored images aligned with `reference.images`. A new metric
    is a class here and an entry in [`generation_metrics`] or [`restoration_metrics`]."""

    name: str

    def compute(self, images: torch.Tensor, reference: Reference) -> dict[str, Any]: ...


class DistributionDistance:
    """FID and KID of the images against the reference images, over a feature extractor (pixels or Inception)."""

    name = "distribution"

    def __init__(self, features: "PixelFeatures | InceptionFeatures", seed: int = 0):
        self.features, self.seed = features, seed

    def compute(self, images: torch.Tensor, reference: Reference) -> dict[str, Any]:
        ours, theirs = self.features(images), self.features(reference.images)
        return {"feature_extractor": self.features.name, "fid": frechet_distance(ours, theirs),
                "kid": kernel_inception_distance(ours, theirs, seed=self.seed)}


class Memorisation:
    """Nearest-neighbour distances of samples to train images and to held-out images (a random train subset as large as
    the held-out set, so neither side wins by being bigger)."""

    name = "memorisation"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def compute(self, images: torch.Tensor, reference: Reference) -> dict[str, Any]:
        train, held_out = reference.train_images, reference.images
        subset = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(self.seed))[: held_out.shape[0]]]
        to_train, to_held_out = nearest_neighbour_distance(images, subset), nearest_neighbour_distance(images, held_out)
        held_out_to_train = nearest_neighbour_distance(held_out, subset)
        data_spacing = float(held_out_to_train.median())
        nearer = float((to_train < torch.quantile(held_out_to_train, MEMORISATION_QUANTILE)).float().mean())
        return {"memorisation": {
            "median_distance_to_train": float(to_train.median()),
            "median_distance_to_held_out": float(to_held_out.median()),
            "share_closer_to_train": float((to_train < to_held_out).float().mean()),
            # Held-out images to the train subset: how far apart real images are. Samples much farther than that from
            # every image are not images of the data (noise, say), and which side is nearer then means nothing.
            "median_distance_held_out_to_train": data_spacing,
            # Samples nearer a train image than all but MEMORISATION_QUANTILE of the held-out images are: unseen real
            # images read MEMORISATION_QUANTILE, copies of train images 1.0; and the median distances' ratio.
            "share_nearer_than_held_out": nearer,
            "distance_ratio_to_held_out": float(to_train.median()) / max(data_spacing, 1e-12),
            "meaningful": bool(float(to_held_out.median()) <= MEMORISATION_DISTANCE_FACTOR * data_spacing),
        }}


# The quantile of held-out images' distances to the train images below which a sample counts as nearer a train image
# than unseen real images come (`share_nearer_than_held_out`).
MEMORISATION_QUANTILE = 0.05
# Samples whose median distance to the held-out images exceeds this many times the held-out images' own distance to
# the train images are not images of the data: the memorisation share is then flagged as meaningless.
MEMORISATION_DISTANCE_FACTOR = 1.5


class PSNR:
    """PSNR in dB of the set's mean squared error against the reference images ([`mean_psnr`])."""

    name = "psnr"

    def compute(self, images: torch.Tensor, reference: Reference) -> dict[str, Any]:
        return {"psnr": mean_psnr(images, reference.images)}


class SSIM:
    """Mean SSIM against the reference images ([`ssim`])."""

    name = "ssim"

    def compute(self, images: torch.Tensor, reference: Reference) -> dict[str, Any]:
        return {"ssim": float(ssim(images, reference.images).mean())}


class ImageClassifier(Protocol):
    """A labelled dataset's classifier ([`DatasetExtras.classifier`]), fitted on its train split only."""

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities `(N, K)` of images `(N, C, H, W)` in `[-1, 1]` at the dataset's size."""


class ClassifierAccuracy:
    """Share of images the classifier assigns the reference's label."""

    name = "accuracy"

    def __init__(self, classifier: ImageClassifier):
        self.classifier = classifier

    def compute(self, images: torch.Tensor, reference: Reference) -> dict[str, Any]:
        predicted = self.classifier.probabilities(images).argmax(1)
        return {"accuracy": float((predicted == reference.labels).mean())}


def generation_metrics(features: "PixelFeatures | InceptionFeatures", seed: int, extra: Sequence[Metric] = ()) -> list[Metric]:
    """The report's generation metrics: FID/KID, memorisation, and `extra` (a labelled dataset's, [`DatasetExtras`])."""
    return [DistributionDistance(features, seed), Memorisation(seed), *extra]


@dataclass(frozen=True)
class DatasetExtras:
    """
    What a labelled embedded dataset adds to the evaluation; its [`~data.embedded.EmbeddedDataset`] entry names it.

    Args:
        classifier (`Callable[[], ImageClassifier]`): a classifier fitted on the dataset's train split only (so
            held-out images are never scored by one that saw them); the restoration rows' accuracy comes from it.
        generation_metrics (`Callable[[Any], list[Metric]]`): figures of generated samples, given that classifier.
        sample_quality (`Callable[[np.ndarray, Any], dict]`): the score of samples `(N, H, W, C)` in `[0, 1]` that the
            run summary and the model card show (`quality_samples`).
        scorer (`str`): what scores the samples, for the card ("a classifier trained on the real digits").
        minimum_images (`int`, defaults to 1): the fewest held-out images and samples its figures take (`evaluate`
            refuses fewer before any work).
    """

    classifier: Callable[[], ImageClassifier]
    generation_metrics: Callable[[Any], list[Metric]]
    sample_quality: Callable[[np.ndarray, Any], dict[str, Any]]
    scorer: str
    minimum_images: int = 1


def dataset_extras(source: Any) -> DatasetExtras | None:
    """The evaluation extras of the embedded dataset `source` names; None for any other source or an unlabelled one."""
    from ..data.embedded import embedded_dataset

    entry = embedded_dataset(source)
    if entry is None or entry.evaluation is None:
        return None
    module, attribute = entry.evaluation.split(":")
    return getattr(importlib.import_module(module), attribute)


def restoration_metrics(classifier: ImageClassifier | None = None) -> list[Metric]:
    """The report's restoration metrics: PSNR, SSIM, and with a labelled dataset's classifier its accuracy."""
    return [PSNR(), SSIM(), *([ClassifierAccuracy(classifier)] if classifier is not None else [])]
