"""The embedded `photos` dataset: real RGB photographs from installed wheels, tiled, with a held-out split made of other
photographs than the training split."""

import numpy as np
import pytest

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
