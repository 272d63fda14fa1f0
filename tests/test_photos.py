"""The embedded `photos` dataset: real RGB photographs from installed wheels, tiled, with a held-out split made of other
photographs than the training split."""

import numpy as np
import pytest
import torch

from diffusers_robust.data.datasets import load_image_dataset
from diffusers_robust.data.embedded import PHOTOS
from diffusers_robust.data.photos import FLAT_TILE_STD, PHOTO_SOURCES, photo_tiles


def test_photos_load_by_name_as_rgb_32x32_tiles_with_stated_counts():
    splits = PHOTOS.load()
    assert (splits["train"].num_rows, splits["test"].num_rows) == (547, 192)  # the counts README and embedded.py state
    image = splits["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)
    loaded = load_image_dataset("photos", "test", channels=3, resolution=32)
    assert loaded.source_shape == (3, 32, 32)


def test_held_out_tiles_come_from_other_photographs_than_training_tiles():
    _, train_sources = photo_tiles(32, "train")
    _, test_sources = photo_tiles(32, "test")
    assert set(train_sources).isdisjoint(test_sources)
    assert {PHOTO_SOURCES[i].split for i in train_sources} == {"train"}
    assert {PHOTO_SOURCES[i].split for i in test_sources} == {"test"}
    train, _ = photo_tiles(32, "train")
    test, _ = photo_tiles(32, "test")
    # No held-out tile equals a training tile (the two split photos are different pictures).
    assert not (train.reshape(len(train), 1, -1) == test[:64].reshape(1, 64, -1)).all(-1).any()


def test_tiles_are_deterministic_non_flat_and_every_source_states_its_licence():
    first, _ = photo_tiles(32, "test")
    again, _ = photo_tiles(32, "test")
    np.testing.assert_array_equal(first, again)
    assert first.reshape(len(first), -1).std(1).min() >= FLAT_TILE_STD
    assert all(source.licence for source in PHOTO_SOURCES)
    assert {source.split for source in PHOTO_SOURCES} == {"train", "test"}


def test_larger_held_out_tiles_for_whole_image_restoration():
    tiles, _ = photo_tiles(128, "test")
    assert tiles.shape == (12, 128, 128, 3) and tiles.dtype == np.uint8


@pytest.mark.parametrize("size, split, message", [(4, "train", "8..256"), (32, "valid", "'train', 'test' or 'all'")])
def test_bad_tile_requests_are_named(size, split, message):
    with pytest.raises(ValueError, match=message):
        photo_tiles(size, split)


def _eight_bit_noisy(images: np.ndarray, std: float) -> torch.Tensor:
    rng = np.random.default_rng(0)
    noisy = np.round(np.clip(images / 255 + std * rng.standard_normal(images.shape), 0, 1) * 255) / 255
    return torch.tensor(noisy, dtype=torch.float32).permute(0, 3, 1, 2) * 2 - 1


@pytest.mark.parametrize("split, std, clean_share", [("train", 0.0, 0.91), ("test", 0.0, 0.98), ("train", 0.05, 0.03),
                                                     ("train", 0.1, 0.0)])
def test_annotations_call_clean_8bit_photos_clean_and_noisy_ones_noisy(split, std, clean_share):
    """The figures `CLEAN_READING`'s comment states (and the README): at least 90% of clean 8-bit photos read clean."""
    from diffusers_robust.data.annotations import estimated_noise_levels

    tiles, _ = photo_tiles(32, split)
    levels = estimated_noise_levels(_eight_bit_noisy(tiles, std))
    assert float((levels == 0).float().mean()) == pytest.approx(clean_share, abs=0.005)


def test_photo_calibrations_are_remeasured_on_the_training_photos():
    """Constants set on the train split, re-measured: the blur a sharp photo reads (`SHARP_PHOTO_BLUR`, the median
    reading rounded to 0.1 px), and the share of all-black pixels that calls a hole (`HOLE_SHARE`): above what clipped
    Gaussian noise of std 0.1-0.3 leaves in any tile, below what 20% missing pixels leave in any."""
    from diffusers_robust.data.units import to_unit_range
    from diffusers_robust.pipelines.detection import HOLE_EVIDENCE, HOLE_SHARE, hole_evidence
    from diffusers_robust.pipelines.restoration import SHARP_PHOTO_BLUR, estimate_blur_sigma

    tiles, _ = photo_tiles(32, "train")
    assert round(float(estimate_blur_sigma(_eight_bit_noisy(tiles, 0.0)).median()), 1) == SHARP_PHOTO_BLUR

    def black_share(images: torch.Tensor) -> torch.Tensor:
        return (to_unit_range(images) < 0.5 / 255).all(dim=1).flatten(1).float().mean(1)

    noisy = torch.stack([black_share(_eight_bit_noisy(tiles, std)) for std in (0.1, 0.2, 0.3)])
    lost = np.random.default_rng(1).random(tiles.shape[:3]) < 0.2
    holes = black_share(_eight_bit_noisy(np.where(lost[..., None], 0, tiles), 0.0))
    assert float(noisy.max()) < HOLE_SHARE < float(holes.min())
    # Both hole rules together, as HOLE_EVIDENCE's comment states: 3 clean tiles of 547 flagged, most of those with holes.
    for share, flagged in ((0.0, 3 / 547), (0.2, 0.843), (0.5, 0.905)):
        lost = np.random.default_rng(1).random(tiles.shape[:3]) < share
        black, contrasted = hole_evidence(_eight_bit_noisy(np.where(lost[..., None], 0, tiles), 0.0))
        assert float(((black >= HOLE_SHARE) & (contrasted >= HOLE_EVIDENCE)).float().mean()) == pytest.approx(flagged, abs=0.005)


def test_the_clipping_correction_of_noise_readings_is_remeasured_on_the_training_photos():
    """`PHOTO_NOISE_READINGS`: the median reading of the 8-bit training photos under each std, re-measured; and the
    mapping gives each std back from its median reading."""
    from diffusers_robust.data.annotations import estimate_noise_std
    from diffusers_robust.pipelines.detection import PHOTO_NOISE_READINGS, photo_noise_std

    tiles, _ = photo_tiles(32, "train")
    medians = [float(estimate_noise_std(_eight_bit_noisy(tiles, std)).median()) for _, std in PHOTO_NOISE_READINGS]
    assert medians == pytest.approx([reading for reading, _ in PHOTO_NOISE_READINGS], abs=0.001)
    stds = photo_noise_std(torch.tensor(medians))
    assert stds.tolist() == pytest.approx([std for _, std in PHOTO_NOISE_READINGS], abs=0.004)
    assert photo_noise_std(torch.tensor([0.0, 0.03, 0.4])).tolist() == pytest.approx([0.0, 0.03, 0.5])


def test_salt_and_pepper_is_told_from_clean_and_noisy_photos():
    """`IMPULSE_MAX_NOISE` between the readings of the 8-bit training photos under 5% salt-and-pepper (99% below) and
    under Gaussian noise of std 0.2 (99% above), as its comment states."""
    from diffusers_robust.data.annotations import estimated_noise_levels
    from diffusers_robust.pipelines.detection import IMPULSE_MAX_NOISE, IMPULSE_SHARE, impulse_evidence, photo_noise_std

    tiles, _ = photo_tiles(32, "train")
    rng = np.random.default_rng(0)
    hit = rng.random(tiles.shape[:3]) < 0.05
    salted = np.where(hit[..., None], (rng.random(tiles.shape[:3]) < 0.5)[..., None] * 255, tiles)
    salt_readings = photo_noise_std(estimated_noise_levels(_eight_bit_noisy(salted, 0.0)))
    noise_readings = photo_noise_std(estimated_noise_levels(_eight_bit_noisy(tiles, 0.2)))
    assert float(salt_readings.quantile(0.99)) < IMPULSE_MAX_NOISE < float(noise_readings.quantile(0.01))
    # The impulse rule with the noise reading, as IMPULSE_CONTRAST's comment states.
    for images, flagged in ((salted, 0.989), (tiles, 1 / 547)):
        damaged = _eight_bit_noisy(images, 0.0)
        reading = photo_noise_std(estimated_noise_levels(damaged))
        share = ((impulse_evidence(damaged) >= IMPULSE_SHARE) & (reading < IMPULSE_MAX_NOISE)).float().mean()
        assert float(share) == pytest.approx(flagged, abs=0.004)
    for std in (0.1, 0.2):
        noisy = _eight_bit_noisy(tiles, std)
        reading = photo_noise_std(estimated_noise_levels(noisy))
        assert not ((impulse_evidence(noisy) >= IMPULSE_SHARE) & (reading < IMPULSE_MAX_NOISE)).any()
