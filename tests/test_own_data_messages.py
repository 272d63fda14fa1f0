"""The own-data flow names what is wrong at once: a pipeline path with a typo never asks the Hub, an empty or
image-less dataset folder is named."""

import time

import pytest

from diffusers_robust.cli import main as cli_main
from diffusers_robust.data.datasets import load_image_dataset


@pytest.mark.parametrize("name", ["my_modle", "./runs/missing", "a/b/c"])
def test_a_pipeline_that_is_no_folder_and_no_hub_id_is_named_without_asking_the_hub(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # nothing may reach for the network, offline or not
    started = time.monotonic()
    code = cli_main(["sample", name, "--output_dir", str(tmp_path / "s")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"pipeline {name!r} is no folder here and no Hub id (owner/name)" in line
    assert time.monotonic() - started < 10  # no retries against an unreachable Hub (33 s before)


def test_a_folder_without_model_index_is_named(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    assert cli_main(["sample", str(tmp_path / "model"), "--output_dir", str(tmp_path / "s")]) == 2
    assert "is not a pipeline folder: it has no model_index.json" in capsys.readouterr().err


def test_an_empty_dataset_folder_and_one_without_images_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"dataset folder {tmp_path / 'empty'} holds no file"):
        load_image_dataset(str(tmp_path / "empty"), channels=1, resolution=8)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"dataset folder {tmp_path / 'notes'} holds no image Datasets can read"):
        load_image_dataset(str(tmp_path / "notes"), channels=1, resolution=8)


def test_the_card_calls_the_held_out_images_what_they_are():
    from diffusers_robust.hub import _held_out_text

    share = {"source": "my_photos", "split": "train", "held_out_share": 0.1, "held_out_seed": 0}
    assert _held_out_text(share, {}) == "10% of `train` held out (seed 0), never trained on"  # was: `test`
    own = {"source": "digits", "split": "test", "held_out_share": None, "held_out_seed": None}
    assert _held_out_text(own, {}) == "split `test` of `digits`"


def test_a_grey_and_colour_mix_of_several_sizes_is_one_message_judged_over_all_images(tmp_path):
    import numpy as np
    import PIL.Image

    from diffusers_robust.training.config import TrainingConfig
    from diffusers_robust.training.setup import check_image_shape

    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / "a_grey.png")  # the first is grey
    for index in range(5):
        PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"b_rgb_{index}.png")
    loaded = load_image_dataset(str(folder), channels=1, resolution=8)
    assert loaded.stored_shapes == {(1, 8, 8): (1, "a_grey.png"), (3, 16, 16): (5, "b_rgb_0.png")}
    assert loaded.source_shape == (3, 16, 16)  # what most images are, not the first
    config = TrainingConfig(dataset=str(folder), output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError) as refused:
        check_image_shape(config, loaded.stored_shapes, 1, 8)
    message = str(refused.value)
    assert "they mix 1 grey and 5 colour images (e.g. a_grey.png and b_rgb_0.png): pass --channels 3" in message
    assert "they come in 2 sizes (16x16: 5 (e.g. b_rgb_0.png), 8x8: 1 (e.g. a_grey.png)): pass --resolution N" in message
    explicit = TrainingConfig(dataset=str(folder), output_dir=str(tmp_path / "out"), channels=3, resolution=16)
    check_image_shape(explicit, loaded.stored_shapes, 1, 8)  # the flags decide: every image is converted
