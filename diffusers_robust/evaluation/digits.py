"""The embedded digits' evaluation extras ([`DIGITS_EXTRAS`], named by the `digits` entry of `data/embedded.py`): a
classifier fitted on the train split only, the score of generated digits, and the clean-sample figures of learning from
imperfect data."""

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.units import to_model_range, to_unit_range
from .metrics import MANIFOLD_NEIGHBOURS, DatasetExtras, Reference, copying_share, frechet_distance, manifold_figures


@dataclass
class DigitsClassifier:
    """The digits classifier (`svm`, scikit-learn's `SVC` with Platt scaling) and the digits' view of an image: grey,
    area-resized to 8x8, values 0..16 as `load_digits` gives them."""

    svm: Any

    @staticmethod
    def inputs(images: torch.Tensor) -> np.ndarray:
        """`(N, 64)` classifier inputs of grey images `(N, 1, H, W)` in `[-1, 1]` (the first channel of any other)."""
        unit = to_unit_range(images.float().cpu())
        return F.interpolate(unit[:, :1], size=(8, 8), mode="area").reshape(len(unit), 64).numpy() * 16.0

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities `(N, 10)` of images `(N, 1, H, W)` in `[-1, 1]`."""
        return self.svm.predict_proba(self.inputs(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's feature space: its 10 one-vs-rest decision values `(N, 10)` for images `(N, 1, H, W)` in
        `[-1, 1]`, the space in which [`~metrics.frechet_distance`] compares digits."""
        return torch.from_numpy(self.svm.decision_function(self.inputs(images))).double()


def digits_classifier(seed: int = 0) -> DigitsClassifier:
    """
    A calibrated RBF-SVM fitted on the embedded digits' train split only (1497 images; `data.load_digits_dataset`), so
    held-out digits are never scored by a classifier that saw them.

    Chosen because it is not confident on garbage: it gives top probability >= 0.8 to most real held-out digits and to
    none of uniform or Gaussian noise images, where logistic regression is (`tests/test_evaluation.py` checks the first
    two; the comparison is in `benchmarks/RESULTS.md`, "Figures behind the code").
    """
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    from ..data.embedded import DIGITS

    digits = load_digits()
    train = DIGITS.split_indices("train", len(digits.target))
    with warnings.catch_warnings():
        # SVC's built-in Platt scaling is deprecated in favour of CalibratedClassifierCV, but the latter is
        # confident on most uniform-noise images here (RESULTS.md); Platt scaling is the calibration we want.
        warnings.simplefilter("ignore", FutureWarning)
        svm = SVC(gamma=0.001, C=10.0, probability=True, random_state=seed)
        return DigitsClassifier(svm.fit(digits.data[train], digits.target[train]))


def digits_quality(images: np.ndarray, confidence: float = 0.8,
                   classifier: DigitsClassifier | None = None) -> dict[str, float | list[int]]:
    """
    Score generated digits with a classifier trained on the real digits.

    Args:
        images (`np.ndarray` of shape `(N, H, W, 1)` in `[0, 1]`): generated samples at any resolution;
            they are area-resized to 8x8 like the real digits.

    Returns:
        `confident_fraction` (share of samples whose top class probability is at least `confidence`),
        `class_counts` (predicted class histogram, 10 entries), `classes_present` and `class_entropy_bits` (of the
        predicted classes; log2(10) = 3.32 when every class is equally common).
    """
    classifier = classifier or digits_classifier()
    tensor = to_model_range(torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2))
    probabilities = classifier.probabilities(tensor)
    predicted = probabilities.argmax(axis=1)
    counts = np.bincount(predicted, minlength=10)
    shares = counts[counts > 0] / counts.sum()
    return {
        "confident_fraction": float((probabilities.max(axis=1) >= confidence).mean()),
        "class_counts": counts.tolist(),
        "classes_present": int((counts > 0).sum()),
        "class_entropy_bits": float(-(shares * np.log2(shares)).sum()),
    }


# Pixels that are 0 in at least this share of the train split's digits are background (10 of the 64, at the left and
# right borders): held-out digits read 0.003 there (RMS, [0, 1] units), so what a sample shows there is noise it kept.
# The Haar estimate (`noise_std`) reads about 0.02 on every clean model, held-out digits included.
BACKGROUND_SHARE = 0.99


def background_noise(samples: torch.Tensor, train: torch.Tensor) -> float:
    """RMS value (`[0, 1]` units) of `samples` over the digits' background: the pixels that are 0 in at least
    `BACKGROUND_SHARE` of `train`. Both `(N, 1, H, W)` in `[-1, 1]`, seen as the classifier sees them (8x8)."""
    background = (DigitsClassifier.inputs(train) == 0).mean(axis=0) >= BACKGROUND_SHARE
    if not background.any():
        raise ValueError(f"no pixel is 0 in {BACKGROUND_SHARE:.0%} of the train images: they have no background")
    values = DigitsClassifier.inputs(samples)[:, background] / 16.0
    return float(np.sqrt((values**2).mean()))


def clean_sample_figures(samples: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor,
                         classifier: DigitsClassifier) -> dict[str, float]:
    """How clean, faithful, diverse and new digits samples are, all against `held_out` in the digits classifier's
    feature space ([`DigitsClassifier.features`]) where a space is needed: `frechet_classifier` (Fréchet distance);
    `precision`, `recall`, `density` and `coverage` ([`~metrics.manifold_figures`], k = 5; coverage is the headline: a
    model collapsed onto typical digits cannot win it); `background_noise` ([`background_noise`], 0 for real digits);
    `noise_std` (median [`estimate_noise_std`], `[0, 1]` units); `copying` ([`copying_share`] against `train`) and
    `copying_held_out` (the same for `held_out` itself: what a model that copies nothing scores). All images
    `(N, 1, H, W)` in `[-1, 1]`."""
    from ..data.annotations import estimate_noise_std

    features, real_features = classifier.features(samples), classifier.features(held_out)
    return {
        "frechet_classifier": frechet_distance(features, real_features),
        **manifold_figures(features, real_features),
        "background_noise": background_noise(samples, train),
        "noise_std": float(estimate_noise_std(samples.clamp(-1, 1)).median()),
        "copying": copying_share(samples, train),
        "copying_held_out": copying_share(held_out, train),
    }


class DigitsScore:
    """How the classifier of the real digits reads generated samples ([`digits_quality`])."""

    name = "digits"

    def __init__(self, classifier: DigitsClassifier | None = None):
        self.classifier = classifier

    def compute(self, images: torch.Tensor, reference: Reference) -> dict[str, Any]:
        return {"digits": digits_quality(to_unit_range(images).permute(0, 2, 3, 1).numpy(), classifier=self.classifier)}


class CleanSampleFigures:
    """[`clean_sample_figures`], the figures of learning from imperfect data."""

    name = "clean_samples"

    def __init__(self, classifier: DigitsClassifier | None = None):
        self.classifier = classifier

    def compute(self, images: torch.Tensor, reference: Reference) -> dict[str, Any]:
        self.classifier = self.classifier or digits_classifier()
        return {"clean_samples": clean_sample_figures(images, reference.train_images, reference.images, self.classifier)}


DIGITS_EXTRAS = DatasetExtras(
    classifier=digits_classifier,
    generation_metrics=lambda classifier: [DigitsScore(classifier), CleanSampleFigures(classifier)],
    sample_quality=lambda images, classifier: digits_quality(images, classifier=classifier),
    scorer="a classifier trained on the real digits",
    minimum_images=MANIFOLD_NEIGHBOURS + 1,  # the neighbourhood figures of `clean_sample_figures`
)
