"""Annotations that cannot be mixed: records keyed by their path in the folder, each named once, one sidecar per folder,
numbers that are numbers, masks that say what they mean and live outside the image folder, and a resume that notices an
edited annotation file wherever it lies."""

import json
import os

import numpy as np
import PIL.Image
import pytest

from diffusers_robust.data.annotations import annotate_dataset, read_sidecar
from diffusers_robust.data.datasets import load_image_dataset
from diffusers_robust.training.run_guard import folder_fingerprint, run_fingerprints


def _folder(root, names: list[str]) -> str:
    rng = np.random.default_rng(0)
    for name in names:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    return str(root)


def _load(folder, **kwargs):
    return load_image_dataset(folder, "train", channels=1, resolution=8, **kwargs)


def _levels(loaded) -> list[float]:
    return list(loaded.annotations["noise_sigma"])


@pytest.mark.parametrize("text,message", [
    ("file_name,noise_sigma\na.png,0.1\na.png,0.3\n", "'a.png' is annotated twice"),
    ("file_name,noise_sigma\na.png,0.1,7\n", "line 2 has more fields than the header"),
])
def test_a_csv_sidecar_with_a_row_twice_or_a_row_too_long_is_refused_naming_it(tmp_path, text, message):
    path = tmp_path / "annotations.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_sidecar(path)


@pytest.mark.parametrize("table,message", [
    ('{"a.png": {"noise_sigma": true}}', "must be numbers"),
    ('{"a.png": {"noise_sigma": "0.1"}}', "must be numbers"),
    ('{"a.png": {"noise_sigma": 0.1}, "a.png": {"noise_sigma": 0.3}}', r"\['a.png'\] annotated twice"),
])
def test_a_json_sidecar_with_a_bool_a_string_or_a_key_twice_is_refused(tmp_path, table, message):
    path = tmp_path / "annotations.json"
    path.write_text(table)
    with pytest.raises(ValueError, match=message):
        read_sidecar(path)


def test_two_sidecars_in_one_folder_are_refused_naming_both(tmp_path):
    folder = _folder(tmp_path / "data", ["a.png", "b.png"])
    (tmp_path / "data" / "annotations.csv").write_text("file_name,noise_sigma\na.png,0.1\n")
    (tmp_path / "data" / "annotations.json").write_text('{"b.png": {"noise_sigma": 0.2}}')
    with pytest.raises(ValueError, match="holds both annotations.csv and annotations.json"):
        _load(folder)


def test_a_file_name_and_a_record_id_naming_one_record_are_refused(tmp_path):
    folder = _folder(tmp_path / "data", ["a.png", "b.png"])
    (tmp_path / "data" / "annotations.json").write_text(json.dumps(
        {"a.png": {"noise_sigma": 0.1}, "data/train[0]": {"noise_sigma": 0.3}}))
    with pytest.raises(ValueError, match="'a.png' and 'data/train\\[0\\]' name the same record"):
        _load(folder)


def test_equal_file_names_in_subfolders_are_annotated_apart_by_their_path(tmp_path):
    names = [f"{part}/img_{index:04d}.png" for part in ("day", "night") for index in range(3)]
    folder = _folder(tmp_path / "data", names)
    annotate_dataset(folder, os.path.join(folder, "annotations.csv"), channels=1)
    rows = read_sidecar(os.path.join(folder, "annotations.csv"))
    assert sorted(rows) == sorted(names)  # 6 rows for 6 images, not 3
    rows["night/img_0000.png"]["noise_sigma"] = 0.0123
    (tmp_path / "data" / "annotations.csv").write_text(
        "file_name,noise_sigma\n" + "".join(f"{name},{values['noise_sigma']}\n" for name, values in rows.items()))
    loaded = _load(folder)
    assert _levels(loaded).count(0.0123) == 1 and len(loaded.dataset) == 6
    # A bare file name that several records share names none of them.
    (tmp_path / "data" / "annotations.csv").write_text("file_name,noise_sigma\nimg_0000.png,0.1\n")
    with pytest.raises(ValueError, match="match no record"):
        _load(folder)


def test_an_rgba_mask_is_refused_naming_the_record(tmp_path):
    folder = _folder(tmp_path / "data", ["a.png", "b.png"])
    os.makedirs(tmp_path / "masks")
    mask = np.zeros((8, 8, 4), dtype=np.uint8)
    mask[..., 3] = 255
    PIL.Image.fromarray(mask, "RGBA").save(tmp_path / "masks" / "a.png")
    (tmp_path / "data" / "annotations.csv").write_text("file_name,mask\na.png,../masks/a.png\n")
    with pytest.raises(ValueError, match="alpha channel"):
        _load(folder)


def test_mask_images_inside_the_image_folder_are_refused_not_trained_on(tmp_path):
    folder = _folder(tmp_path / "data", ["a.png", "b.png", "masks/a.png"])
    (tmp_path / "data" / "annotations.csv").write_text("file_name,mask\na.png,masks/a.png\n")
    with pytest.raises(ValueError, match="is itself an image of data/train: keep mask images outside"):
        _load(folder)


def test_fingerprints_see_a_same_size_annotation_edit_inside_and_outside_the_folder(tmp_path):
    folder = _folder(tmp_path / "data", ["a.png", "b.png"])
    sidecar = tmp_path / "data" / "annotations.csv"
    sidecar.write_text("file_name,noise_sigma\na.png,0.1\n")
    elsewhere = tmp_path / "levels.csv"
    elsewhere.write_text("file_name,noise_sigma\nb.png,0.2\n")
    before = folder_fingerprint([folder]), run_fingerprints(folder, {"annotations": str(elsewhere)})["annotations"]
    sidecar.write_text("file_name,noise_sigma\na.png,0.3\n")  # same size
    elsewhere.write_text("file_name,noise_sigma\nb.png,0.4\n")
    after = folder_fingerprint([folder]), run_fingerprints(folder, {"annotations": str(elsewhere)})["annotations"]
    assert before[0] != after[0] and before[1] != after[1]


def test_annotate_then_load_with_the_automatic_hold_out_agree_on_a_folder_without_test(tmp_path):
    from diffusers_robust.data.splits import plan_held_out

    folder = _folder(tmp_path / "my_photos", [f"img_{index:03d}.png" for index in range(30)])
    annotate_dataset(folder, os.path.join(folder, "annotations.csv"), channels=1)
    rows = read_sidecar(os.path.join(folder, "annotations.csv"))
    plan = plan_held_out(folder, "train")
    train = _load(folder, hold_out=plan.train_hold_out)  # was: "N annotated name(s) match no record of my_photos/train (rest)"
    held_out = load_image_dataset(plan.source, plan.split, hold_out=plan.hold_out, channels=1, resolution=8)
    assert len(train.dataset) + len(held_out.dataset) == 30
    indices = plan.train_hold_out.indices(30)
    assert _levels(train) == [rows[f"img_{index:03d}.png"]["noise_sigma"] for index in indices]
