import os

import albumentations as A
import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT

from diffusers_robust.data.augment import AugmentPipeline

RECIPES = os.path.join(REPO_ROOT, "training", "configs", "augment")


def _image(seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", ["flip", "edm", "noisy"])
def test_recipe_file_round_trips(tmp_path, name):
    pipe = AugmentPipeline.from_file(os.path.join(RECIPES, f"{name}.yaml"), seed=0)
    for suffix in ("yaml", "json"):
        pipe.save(tmp_path / f"copy.{suffix}")
        again = AugmentPipeline.from_file(tmp_path / f"copy.{suffix}", seed=0)
        assert again.to_dict() == pipe.to_dict()
        assert again.leaves == pipe.leaves and again.label_dim == pipe.label_dim


def test_edm_recipe_is_flip_rotation_scale_translation_at_probability_012():
    pipe = AugmentPipeline.from_file(os.path.join(RECIPES, "edm.yaml"))
    transforms = pipe.to_dict()["transform"]["transforms"]
    assert [t["__class_fullname__"] for t in transforms] == ["HorizontalFlip", "Affine", "Affine", "Affine"]
    assert all(t["p"] == pytest.approx(0.12) for t in transforms)


def test_noisy_recipe_uses_albumentations_noise_transforms():
    pipe = AugmentPipeline.from_file(os.path.join(RECIPES, "noisy.yaml"))
    assert pipe.leaves == ["GaussNoise", "SaltAndPepper", "ShotNoise", "ISONoise", "ImageCompression"]


@pytest.mark.parametrize("name", ["edm", "noisy"])
def test_augment_labels_are_zero_exactly_when_nothing_was_applied(name):
    pipe = AugmentPipeline.from_file(os.path.join(RECIPES, f"{name}.yaml"), seed=0)
    untouched = touched = 0
    for i in range(400):
        image = _image(i)
        out, labels = pipe(image)
        assert labels.shape == (pipe.label_dim,) and labels.dtype == np.float32
        if np.array_equal(out, image):
            assert not labels.any(), "identical output must give zero labels"
            untouched += 1
        else:
            assert labels.any(), "changed output must give non-zero labels"
            touched += 1
    assert untouched > 50 and touched > 50


def test_affine_labels_encode_the_applied_rotation():
    pipe = AugmentPipeline(A.Compose([A.Affine(rotate=(90, 90), p=1.0)]), seed=0)
    _, labels = pipe(_image())
    applied, a11, a12, a21, a22 = labels[:5]
    assert applied == 1.0
    assert a11 == pytest.approx(-1.0, abs=1e-6) and a22 == pytest.approx(-1.0, abs=1e-6)
    assert abs(a12) == pytest.approx(1.0, abs=1e-6) and a12 == pytest.approx(-a21, abs=1e-6)


def test_seed_makes_augmentation_reproducible():
    a = AugmentPipeline.from_file(os.path.join(RECIPES, "edm.yaml"), seed=3)
    b = AugmentPipeline.from_file(os.path.join(RECIPES, "edm.yaml"), seed=3)
    for i in range(20):
        (x, lx), (y, ly) = a(_image(i)), b(_image(i))
        assert np.array_equal(x, y) and np.array_equal(lx, ly)


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.update(transforms=[]), r"unknown augment recipe key\(s\) \['transforms'\]"),
    (lambda r: r["transform"]["transforms"][0].update(probability=0.5),
     r"unknown key\(s\) \['probability'\] for transform HorizontalFlip"),
    (lambda r: r["transform"]["transforms"][0].update(__class_fullname__="Flipper"),
     "unknown Albumentations transform 'Flipper'"),
])
def test_unknown_recipe_keys_raise_naming_the_key(tmp_path, mutate, message):
    with open(os.path.join(RECIPES, "edm.yaml")) as handle:
        recipe = yaml.safe_load(handle)
    mutate(recipe)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=message):
        AugmentPipeline.from_file(path)


def test_missing_recipe_file_is_named():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        AugmentPipeline.from_file("nope.yaml")


def test_a_recipe_that_fails_on_the_images_stops_with_its_error_instead_of_skipping_every_record(tmp_path):
    from diffusers_robust.data.datasets import AugmentRecipeError, load_image_dataset

    recipe = tmp_path / "rgb-only.yaml"  # PlanckianJitter needs RGB images; digits are grey
    recipe.write_text(yaml.safe_dump({"__version__": A.__version__, "transform": A.to_dict(
        A.Compose([A.PlanckianJitter(p=1.0)]))["transform"]}))
    loaded = load_image_dataset("digits", "train", channels=1, resolution=8, augment=str(recipe))
    with pytest.raises(AugmentRecipeError, match=r"the augment recipe fails on digits/train\[0\] \(1-channel images\)"):
        loaded.dataset[0]
    assert load_image_dataset("digits", "train", channels=3, resolution=8, augment=str(recipe)).dataset[0]["valid"]


@pytest.mark.parametrize("name, permutes", [("flip", True), ("edm", False), ("noisy", False)])
def test_only_recipes_that_move_pixels_are_safe_on_noisy_records(name, permutes):
    pipe = AugmentPipeline.from_file(os.path.join(RECIPES, f"{name}.yaml"), seed=0)
    assert pipe.permutes_pixels_only is permutes
    if permutes:  # the same values, rearranged: a noisy image keeps its noise level
        image = _image(3)
        assert sorted(pipe(image)[0].ravel()) == sorted(image.ravel())
