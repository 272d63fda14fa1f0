"""Embedded datasets are plug-ins: a labelled toy dataset registered from this one file loads by name, splits, and
brings its classifier and figures to the report and the recipe, with no dataset name tested in the package."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet

from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler
from diffusers_robust.data.datasets import load_image_dataset
from diffusers_robust.data.embedded import EMBEDDED_DATASETS, EmbeddedDataset, register_embedded_dataset
from diffusers_robust.data.splits import split_names
from diffusers_robust.data.units import to_unit_range
from diffusers_robust.evaluation.metrics import DatasetExtras
from diffusers_robust.evaluation.report import evaluate_pipeline
from diffusers_robust.training.config import TrainingConfig


def bars() -> tuple[np.ndarray, np.ndarray]:
    """24 grey 8x8 images: a horizontal bar (label 0) or a vertical one (label 1), at rows / columns 1..6."""
    images = np.zeros((24, 8, 8), dtype=np.uint8)
    labels = np.arange(24) % 2
    for index in range(24):
        position = 1 + index // 4
        if labels[index] == 0:
            images[index, position, :] = 255
        else:
            images[index, :, position] = 255
    return images, labels


class BarsClassifier:
    """The toy's classifier, fitted on its train split: logistic regression on the 64 pixels."""

    def __init__(self):
        from sklearn.linear_model import LogisticRegression

        images, labels = bars()
        train = TOY.split_indices("train", len(images))
        self.model = LogisticRegression().fit(images[train].reshape(len(train), 64) / 255, labels[train])

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """`(N, 2)` for images `(N, 1, 8, 8)` in `[-1, 1]`."""
        return self.model.predict_proba(to_unit_range(images).reshape(len(images), 64).numpy())


class BrightShare:
    """The toy's own generation figure: the share of bright pixels."""

    name = "bright_share"

    def compute(self, images: torch.Tensor, reference) -> dict:
        return {"bright_share": float((images > 0).float().mean())}


TOY_EXTRAS = DatasetExtras(classifier=BarsClassifier, generation_metrics=lambda classifier: [BrightShare()],
                           sample_quality=lambda images, classifier: {"bright": float((images > 0.5).mean())},
                           scorer="the share of bright pixels")
TOY = EmbeddedDataset(name="toy-bars", load_arrays=bars, split_of=lambda index: "test" if index % 4 == 0 else "train",
                      label_names=("horizontal", "vertical"), evaluation="test_embedded_datasets:TOY_EXTRAS")


@pytest.fixture
def toy_registered():
    register_embedded_dataset(TOY)
    yield TOY
    del EMBEDDED_DATASETS[TOY.name]


def test_a_registered_dataset_loads_by_name_with_its_split_rule(toy_registered):
    assert split_names("toy-bars") == ["train", "test", "all"]
    train = load_image_dataset("toy-bars", "train", channels=1, resolution=8)
    test = load_image_dataset("toy-bars", "test", channels=1, resolution=8)
    assert (len(train.dataset), len(test.dataset)) == (18, 6)
    assert toy_registered.labels("test").tolist() == [0, 0, 0, 0, 0, 0]  # every fourth image: all horizontal
    with pytest.raises(ValueError, match="dataset 'toy-bars' has splits"):
        load_image_dataset("toy-bars", "validation")
    with pytest.raises(ValueError, match="already registered"):
        register_embedded_dataset(TOY)


@pytest.mark.parametrize("changes,message", [
    (dict(split_of=lambda index: "validation"), r"split_of must give 'train' or 'test', got \['validation'\]"),
    (dict(label_names=("horizontal",)), "24 labels for 24 images, with values up to 1, .* label_names for each value"),
    (dict(evaluation="test_embedded_datasets.TOY_EXTRAS"), "evaluation must be 'module:attribute'"),
])
def test_a_malformed_entry_is_refused_naming_the_dataset(changes, message):
    with pytest.raises(ValueError, match=f"embedded dataset 'toy-bars': {message}"):
        dataclasses.replace(TOY, **changes).load()


def test_its_classifier_and_figures_reach_the_report_and_the_recipe(toy_registered, tmp_path):
    TrainingConfig(dataset="toy-bars", quality_samples=4)  # it scores samples, as digits do
    with pytest.raises(ValueError, match=r"quality_samples .* \(digits, toy-bars\), got dataset"):
        TrainingConfig(dataset=str(tmp_path), quality_samples=4)
    pipeline = RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=RobustDDPMScheduler(num_train_timesteps=100))
    report = evaluate_pipeline(pipeline, "toy-bars", num_images=6, num_samples=4, sampling_steps=2,
                               cases=[("gaussian_noise", 3)], progress=False)
    generation = report["generation"]
    assert "bright_share" in generation and "digits" not in generation
    row = report["restoration"][0]
    assert row["accuracy_input"] is not None and 0 <= row["accuracy"] <= 1  # the toy's classifier scored it
    assert report["train_images"] == 18
