import numpy as np
import torch
from conftest import make_tiny_unet
from sklearn.datasets import load_digits

from diffusers_robust import RobustDDPMScheduler
from diffusers_robust.evaluation import digits_quality, make_grid, validation_losses
from diffusers_robust.metrics import digits_classifier
from diffusers_robust.models import AugmentConditionedUNet


def test_digits_quality_tells_real_digits_from_noise():
    classifier = digits_classifier()
    real = (load_digits().images[:256] / 16.0)[..., None]
    upsampled = np.repeat(np.repeat(real, 2, axis=1), 2, axis=2)  # 16x16, area-resized back to 8x8 inside
    noise = np.random.default_rng(0).uniform(0, 1, (256, 8, 8, 1))
    assert digits_quality(upsampled, classifier=classifier)["confident_fraction"] > 0.95
    assert digits_quality(real, classifier=classifier)["classes_present"] == 10
    assert digits_quality(noise, classifier=classifier)["confident_fraction"] < 0.05


def test_validation_losses_are_seeded_and_cover_each_corruption_and_severity():
    model = AugmentConditionedUNet(make_tiny_unet(), augment_dim=0)
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scheduler = RobustDDPMScheduler()
    first = validation_losses(model, scheduler, images, ["gaussian_noise", "masking"], (1, 5))
    again = validation_losses(model, scheduler, images, ["gaussian_noise", "masking"], (1, 5))
    assert first == again
    cases = {"gaussian_noise/s1", "gaussian_noise/s5", "masking/s1", "masking/s5"}
    assert set(first) == {"clean"} | cases | {f"restore/{case}" for case in cases}
    assert len(set(first.values())) == 9


def test_make_grid_tiles_images_in_a_square():
    grid = make_grid(np.ones((5, 8, 8, 1)) * 0.5)
    assert grid.size == (24, 16)
    assert np.asarray(grid)[..., 0].max() == 128 and np.asarray(grid)[8:, 16:].max() == 0  # the blank cell
