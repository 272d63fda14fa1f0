"""Bounds and one line: sizes that would exhaust memory are refused before anything is allocated, naming the estimate;
an output folder that cannot hold a lock, a diverged run, a config that is a folder, Inception weights that are not
TorchScript are one line with exit 2 and leave no folder; a checkpoint damaged without changing size is skipped."""

import os
import subprocess

import pytest
from conftest import can_mount_tmpfs, tiny_training_args
from conftest import run_training_script as _run

from diffusers_robust.cli import main as cli_main
from diffusers_robust.models import activation_memory_estimate
from diffusers_robust.training.checkpoints import complete_checkpoints


def _one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


def test_the_memory_estimate_grows_with_batch_and_pixels_and_fits_the_digits_preset():
    config = {"block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention_head_dim": 32,
              "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]}
    small = activation_memory_estimate(config, 64, 8)
    assert small < 2**30  # the main job's step
    assert activation_memory_estimate(config, 128, 8) == 2 * small
    assert activation_memory_estimate(config, 64, 16) > 4 * small  # pixels, and attention's pixels squared


def test_a_resolution_that_cannot_fit_in_memory_is_refused_before_allocating(tiny_preset, tmp_path):
    out = tmp_path / "out"
    result = _run(tiny_training_args(tiny_preset, out, resolution=1000000), timeout=120)
    line = _one_line(result.stderr)
    assert result.returncode == 2 and "at resolution 1000000 needs about" in line and "GiB" in line
    assert not out.exists()


@pytest.mark.parametrize("case", ["lock_is_a_folder", "lock_is_a_dangling_link", "dev_null"])
def test_an_output_dir_that_cannot_hold_the_lock_is_one_line_exit_2(tiny_preset, tmp_path, case):
    out = tmp_path / "out"
    if case == "dev_null":
        out = "/dev/null"
    else:
        out.mkdir()
        if case == "lock_is_a_folder":
            (out / ".lock").mkdir()
        else:
            os.symlink(tmp_path / "elsewhere" / "lock", out / ".lock")
    result = _run(tiny_training_args(tiny_preset, out, max_train_steps=1), timeout=120)
    assert result.returncode == 2 and f"cannot write the output_dir {out}" in _one_line(result.stderr)
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.slow
def test_a_read_only_output_dir_is_one_line_exit_2(tiny_preset, tmp_path):
    mount = tmp_path / "ro"
    if not can_mount_tmpfs(mount):
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)], check=True)
    try:
        result = _run(tiny_training_args(tiny_preset, mount / "out", max_train_steps=1), timeout=120)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert result.returncode == 2 and "cannot write the output_dir" in _one_line(result.stderr)


def test_a_diverged_run_is_one_line_naming_what_to_do(tiny_preset, tmp_path):
    result = _run(tiny_training_args(tiny_preset, tmp_path / "out", max_train_steps=2, learning_rate=1e3,
                                     lr_warmup_steps=0, max_grad_norm="null", validation_steps=100), timeout=120)
    line = _one_line(result.stderr)
    assert result.returncode == 2 and "the training loss became [nan]" in line and "lower learning_rate" in line


def test_a_config_that_is_a_folder_says_so(tmp_path):
    result = _run(["--config", str(tmp_path)], timeout=60)
    assert result.returncode == 2 and "is a folder; pass a YAML recipe file" in _one_line(result.stderr)


def test_inception_weights_that_are_not_torchscript_are_one_line(tmp_path, capsys):
    from conftest import make_tiny_unet

    from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler

    pipeline = str(tmp_path / "model")
    RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=RobustDDPMScheduler(num_train_timesteps=20)).save_pretrained(pipeline)
    weights = tmp_path / "inception.pt"
    weights.write_bytes(b"not a zip archive")
    code = cli_main(["evaluate", pipeline, "--output_dir", str(tmp_path / "ev"), "--num_samples", "8", "--num_images", "8",
                     "--sampling_steps", "2", "--cases", "gaussian_noise/s1", "--inception_weights", str(weights)])
    assert code == 2 and "are not a TorchScript file" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "ev").exists()


@pytest.mark.slow
def test_a_newest_checkpoint_damaged_without_changing_size_is_skipped_on_resume(tiny_preset, tmp_path):
    out = tmp_path / "out"
    args = tiny_training_args(tiny_preset, out, max_train_steps=2, checkpointing_steps=1, validation_steps=100)
    assert _run(args).returncode == 0
    weights = out / "checkpoints" / "checkpoint-2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # the last tensor's bytes: safetensors would load them without a word
    weights.write_bytes(bytes(data))
    resumed = _run([*args, "--resume_from_checkpoint", "latest", "--max_train_steps", "3"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"skipping the damaged checkpoint {out / 'checkpoints' / 'checkpoint-2'} (model.safetensors changed" in resumed.stderr
    assert [os.path.basename(p) for p in complete_checkpoints(str(out))][-1] == "checkpoint-3"


def test_evaluate_says_when_it_converts_the_data_to_the_models_channels_and_size(tmp_path, capsys):
    import json

    import numpy as np
    import PIL.Image
    from conftest import make_tiny_unet

    from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        os.makedirs(tmp_path / "photos" / split)
        for index in range(6):
            PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / "photos" / split / f"{index}.png")
    pipeline = str(tmp_path / "model")
    RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=RobustDDPMScheduler(num_train_timesteps=20)).save_pretrained(pipeline)
    code = cli_main(["evaluate", pipeline, "--dataset", str(tmp_path / "photos"), "--split", "test", "--output_dir",
                     str(tmp_path / "ev"), "--num_samples", "4", "--num_images", "4", "--sampling_steps", "2", "--cases",
                     "gaussian_noise/s1"])
    assert code == 0, capsys.readouterr().err[-2000:]
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert "stored as 3x16x16 (channels x height x width) and were converted to the model's 1x8x8" in report["conversion"]
    assert "**Converted:**" in (tmp_path / "ev" / "report.md").read_text()


def test_a_sampling_batch_that_cannot_fit_in_memory_is_refused_naming_the_estimate(tmp_path, capsys):
    from conftest import make_tiny_unet

    from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler

    pipeline = str(tmp_path / "model")
    RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=RobustDDPMScheduler(num_train_timesteps=20)).save_pretrained(pipeline)
    code = cli_main(["sample", pipeline, "--batch_size", "100000000", "--num_images", "100000000", "--output_dir",
                     str(tmp_path / "s")])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "--batch_size 100000000 needs about" in line and "GiB" in line
    assert not (tmp_path / "s").exists()
