"""A new user's first steps: named presets from any directory, a UNet built for the data's size and colours (never a
silent conversion), and input errors as one line with exit code 2."""

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from conftest import training_env

from diffusers_robust import RobustDDPMPipeline
from diffusers_robust.pipelines.presets import available_presets, build_pipeline_from_preset, resolve_preset


def cli(cwd, *args: str) -> subprocess.CompletedProcess:
    """`diffusers-robust ARGS` run from `cwd` (not the repository), as a user would."""
    return subprocess.run([sys.executable, "-m", "diffusers_robust", *args], cwd=cwd, env=training_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("photos") / "rgb16"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(24):
        PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{index:02d}.png")
    return str(folder)


def test_presets_are_named_and_found_from_any_directory(tmp_path, monkeypatch):
    assert {"ddpm-digits", "ddpm-cifar10-32", "ddpm-64"} <= set(available_presets())
    monkeypatch.chdir(tmp_path)
    for name in ("ddpm-digits", "pipelines/ddpm-digits"):
        assert build_pipeline_from_preset(name, seed=0).unet.config.sample_size == 8
    listed = cli(tmp_path, "presets")
    assert listed.returncode == 0 and "ddpm-digits" in listed.stdout and "8x8, 1 channel(s)" in listed.stdout


@pytest.mark.parametrize("name", ["./ddpm-digitz", "ddpm-digitz", "local/preset"])
def test_a_misspelled_preset_names_the_presets_and_never_asks_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()  # 'local/preset' then names a missing local folder, not a Hub repository
    with pytest.raises(FileNotFoundError, match=r"no preset or pipeline folder .*presets are \[.*'ddpm-digits'"):
        resolve_preset(name)


def _train_args(folder, out, *extra: str) -> list[str]:
    return ["train", "--dataset", folder, "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "8",
            "--validation_split", "null", "--report", "false", "--logger", "none", "--checkpointing_steps", "2",
            "--validation_steps", "2", "--num_grid_images", "2", "--num_inference_steps", "2", *extra]


@pytest.mark.parametrize("extra, message", [
    ((), "have 3 channel(s) but the preset ddpm-digits takes 1: pass --channels 3 (the UNet is built for them) or "
         "--channels 1 to convert them"),
    (("--channels", "3"), "are 16x16 pixels but the preset ddpm-digits takes 8x8: pass --resolution 16"),
])
def test_images_of_another_size_or_colour_stop_with_the_flag_to_pass(tmp_path, rgb_folder, extra, message):
    result = cli(tmp_path, *_train_args(rgb_folder, tmp_path / "out", *extra))
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_rgb_images_at_their_own_size_train_from_another_directory(tmp_path, rgb_folder):
    result = cli(tmp_path, *_train_args(rgb_folder, "out", "--channels", "3", "--resolution", "16"))
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
    assert (config["in_channels"], config["out_channels"], config["sample_size"]) == (3, 3, 16)
    pipe = RobustDDPMPipeline.from_pretrained(tmp_path / "out")
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


def test_version_and_a_fresh_start_from_resume_latest(tmp_path, rgb_folder):
    version = cli(tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.startswith("diffusers-robust 0.")
    first = cli(tmp_path, *_train_args(rgb_folder, "out", "--channels", "1", "--resolution", "8",
                                       "--resume_from_checkpoint", "latest", "--max_train_steps", "1"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "holds no checkpoint yet, so a fresh run starts" in first.stderr


def test_a_malformed_recipe_or_missing_dataset_is_one_line_exit_2_and_leaves_no_folder(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 0\nlearning_rate: [0.001\n")
    bad_yaml = cli(tmp_path, "train", "--config", str(recipe), "--output_dir", "out")
    assert bad_yaml.returncode == 2 and "Traceback" not in bad_yaml.stderr
    assert "recipe.yaml is not valid YAML at line" in bad_yaml.stderr
    missing = cli(tmp_path, *_train_args("shapez", "out"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
    assert "dataset 'shapez' is no local folder or file here, and the Hub could not give it" in missing.stderr
    assert not (tmp_path / "out").exists()
