"""Dataset loading: sources, modes, streaming vs map-style, rank sharding, bad records, resumable streams."""

import logging
import os

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO_ROOT
from torch.utils.data import DataLoader

from diffusers_robust.data.datasets import (
    SkippedRecords,
    collate_image_batch,
    load_digits_dataset,
    load_image_dataset,
    to_mode,
)

EDM = os.path.join(REPO_ROOT, "training", "configs", "augment", "edm.yaml")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """24 good images of assorted modes and sizes, one truncated PNG and one zero-byte file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(24):
        size = (int(rng.integers(20, 48)), int(rng.integers(20, 48)))
        mode = ["RGB", "L", "RGBA", "P", "I;16"][i % 5]
        if mode == "I;16":
            image = PIL.Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
        else:
            image = PIL.Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
        image.save(folder / f"img_{i:02d}.png")
    good = (folder / "img_00.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "empty.png").write_bytes(b"")
    return folder


def _records(loaded, batch_size=5, num_workers=0):
    loader = DataLoader(loaded.dataset, batch_size=batch_size, collate_fn=collate_image_batch, num_workers=num_workers)
    out, skipped = {}, []
    for batch in loader:
        for record_id, pixels in zip(batch["record_ids"], batch["pixel_values"], strict=True):
            assert record_id not in out, f"{record_id} seen twice"
            out[record_id] = pixels
        skipped += batch["skipped"]
    return out, skipped


def test_digits_is_embedded_with_labels_and_splits():
    splits = load_digits_dataset()
    assert len(splits["train"]) == 1497 and len(splits["test"]) == 300
    assert splits["train"].features["label"].num_classes == 10
    assert splits["train"][0]["image"].size == (8, 8)
    loaded = load_image_dataset("digits", split="all", channels=1, resolution=16)
    assert len(loaded.dataset) == 1797


def test_records_are_tensors_in_minus_one_one_of_the_requested_shape(image_folder):
    loaded = load_image_dataset(str(image_folder), channels=3, resolution=16)
    records, _ = _records(loaded)
    assert len(records) == 24
    for pixels in records.values():
        assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1


def test_streaming_and_map_style_yield_the_same_images(image_folder):
    mapped, _ = _records(load_image_dataset(str(image_folder), channels=1, resolution=16))
    streamed, _ = _records(load_image_dataset(str(image_folder), channels=1, resolution=16, streaming=True, num_shards=4))
    assert set(mapped) == set(streamed) and len(mapped) == 24
    for key in mapped:
        assert torch.equal(mapped[key], streamed[key])


def test_two_rank_stream_sharding_is_disjoint_and_complete(image_folder):
    ranks = [
        _records(load_image_dataset(str(image_folder), resolution=16, streaming=True, num_shards=4, rank=r, world_size=2))[0]
        for r in (0, 1)
    ]
    assert set(ranks[0]).isdisjoint(ranks[1])
    assert len(ranks[0]) + len(ranks[1]) == 24 and abs(len(ranks[0]) - len(ranks[1])) <= 4


def test_bad_records_are_skipped_counted_and_reported_by_file(image_folder, caplog):
    loaded = load_image_dataset(str(image_folder), resolution=16)
    assert len(loaded.dataset) == 26
    tracker = SkippedRecords()
    loader = DataLoader(loaded.dataset, batch_size=8, collate_fn=collate_image_batch, num_workers=2)
    good = 0
    with caplog.at_level(logging.WARNING, logger="diffusers_robust.data.datasets"):
        for batch in loader:
            tracker.update(batch)
            good += len(batch["pixel_values"])
    assert good == 24 and tracker.count == 2
    assert any("truncated.png" in i for i in tracker.ids) and any("empty.png" in i for i in tracker.ids)
    assert "truncated.png" in caplog.text


def test_dataloader_workers_give_the_same_augmented_batches_as_the_main_process():
    loaded = load_image_dataset("digits", channels=1, resolution=16, augment=EDM, seed=1)
    single, _ = _records(loaded, batch_size=32)
    workers, _ = _records(loaded, batch_size=32, num_workers=2)
    assert single.keys() == workers.keys()
    assert all(torch.equal(single[k], workers[k]) for k in single)


def test_augment_labels_come_with_the_batch_and_change_with_the_epoch():
    loaded = load_image_dataset("digits", channels=1, resolution=16, augment=EDM, seed=1)
    first = next(iter(DataLoader(loaded.dataset, batch_size=256, collate_fn=collate_image_batch)))
    assert first["augment_labels"].shape == (256, loaded.label_dim)
    touched = first["augment_labels"].abs().sum(dim=1) > 0
    assert 0.2 < touched.float().mean() < 0.6  # four transforms at p = 0.12: 1 - 0.88^4 = 0.40
    loaded.set_epoch(1)
    second = next(iter(DataLoader(loaded.dataset, batch_size=256, collate_fn=collate_image_batch)))
    assert not torch.equal(first["augment_labels"], second["augment_labels"])


def test_stream_position_resumes_from_state_dict():
    def stream():
        return load_image_dataset("digits", channels=1, resolution=8, streaming=True, num_shards=4, seed=3).dataset

    full = [r["record_id"] for r in stream()]
    partial = stream()
    iterator, head = iter(partial), []
    for _ in range(37):
        head.append(next(iterator)["record_id"])
    state = partial.state_dict()
    resumed = stream()
    resumed.load_state_dict(state)
    tail = [r["record_id"] for r in resumed]
    assert head + tail == full and len(full) == 1497


def test_parquet_files_load_with_detected_image_column(tmp_path):
    load_digits_dataset()["test"].rename_column("image", "picture").to_parquet(str(tmp_path / "digits.parquet"))
    loaded = load_image_dataset(str(tmp_path / "*.parquet"), channels=1, resolution=8)
    assert loaded.image_column == "picture" and len(loaded.dataset) == 300
    records, _ = _records(loaded, batch_size=100)
    assert len(records) == 300


def test_arrow_files_load(tmp_path):
    load_digits_dataset()["test"].save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    loaded = load_image_dataset(str(arrow), channels=1, resolution=8)
    assert len(loaded.dataset) == 300


def test_no_image_column_is_a_clear_error(tmp_path):
    datasets.Dataset.from_dict({"text": ["a", "b"]}).to_parquet(str(tmp_path / "text.parquet"))
    with pytest.raises(ValueError, match=r"no image column found .* columns: \['text'\]"):
        load_image_dataset(str(tmp_path / "text.parquet"))
    with pytest.raises(ValueError, match="image_column 'img' is not a column"):
        load_image_dataset(str(tmp_path / "text.parquet"), image_column="img")


@pytest.mark.parametrize("path", ["/no/such/folder", "data/missing/images", "./missing"])
def test_missing_dataset_path_is_named(path):
    with pytest.raises(FileNotFoundError, match=f"dataset path {path} does not exist"):
        load_image_dataset(path)


def test_bad_split_channels_and_rank_are_named():
    with pytest.raises(ValueError, match="splits"):
        load_image_dataset("digits", split="validation")
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        load_image_dataset("digits", channels=2)
    with pytest.raises(ValueError, match="rank must be in"):
        load_image_dataset("digits", rank=2, world_size=2)


def test_mode_conversion_handles_alpha_palette_and_16_bit():
    transparent = PIL.Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.asarray(to_mode(transparent, 3)).min() == 255  # composited onto white
    sixteen = PIL.Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert np.asarray(to_mode(sixteen, 1)).max() == 255
    palette = PIL.Image.new("RGB", (2, 2), (10, 200, 30)).convert("P")
    assert to_mode(palette, 3).mode == "RGB" and to_mode(palette, 1).mode == "L"


def test_dataloader_workers_draw_new_augmentations_each_epoch():
    from diffusers_robust.training.config import TrainingConfig
    from diffusers_robust.training.setup import build_dataloader

    loaded = load_image_dataset("digits", "train", channels=1, resolution=8, augment=EDM, seed=0)
    loaded.dataset = loaded.dataset.select(range(64))
    config = TrainingConfig(output_dir="unused", train_batch_size=64, dataloader_num_workers=1)
    loader = build_dataloader(config, loaded, shuffle_seed=0)
    epochs = []
    for epoch in range(2):
        loaded.set_epoch(epoch)
        images = torch.cat([batch["pixel_values"] for batch in loader])
        epochs.append(sorted(image.numpy().round(4).tobytes() for image in images))  # the set, whatever the order
    assert len(epochs[0]) == len(epochs[1]) == 64 and epochs[0] != epochs[1]
