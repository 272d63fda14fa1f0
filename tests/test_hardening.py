"""A hostile user's cases: diverged runs, reused folders, changed resumes, signals, two writers, a full disk, bad values,
bad files, an unreachable Hub. Each runs the real training script (through `accelerate launch` where a launcher
matters) and checks that nothing good is lost and the message names the problem."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from conftest import SCRIPT, can_mount_tmpfs, tiny_training_args, training_env, wait_for
from conftest import run_training_script as run
from safetensors.torch import load_file

from diffusers_robust.data.datasets import ImageRecordTransform
from diffusers_robust.pipelines.presets import build_pipeline_from_preset
from diffusers_robust.training.checkpoints import complete_checkpoints
from diffusers_robust.training.config import TrainingConfig, parse_training_config
from diffusers_robust.training.run_guard import check_resume_config

pytestmark = pytest.mark.slow



def weights_are_finite_and_sane(checkpoint: str) -> bool:
    tensors = load_file(os.path.join(checkpoint, "model.safetensors"))
    return all(torch.isfinite(t).all() and t.abs().max() < 1e3 for t in tensors.values())


def test_a_diverged_run_saves_nothing_and_names_the_last_good_checkpoint(tiny_preset, tmp_path):
    out = tmp_path / "out"
    assert run(tiny_training_args(tiny_preset, out, max_train_steps=2, checkpointing_steps=2,
                                  checkpoints_total_limit=1)).returncode == 0
    blown = run(tiny_training_args(tiny_preset, out, resume_from_checkpoint="latest", max_train_steps=10,
                                   checkpointing_steps=1, checkpoints_total_limit=1, learning_rate=1e35,
                                   max_grad_norm="null"))
    assert blown.returncode != 0 and "the training loss became" in blown.stderr
    saved = complete_checkpoints(str(out))
    assert [os.path.basename(p) for p in saved] == ["checkpoint-2"]  # the diverged step-3 weights never displaced it
    assert f"--resume_from_checkpoint {saved[0]}" in blown.stderr
    assert weights_are_finite_and_sane(saved[0])


def test_a_fresh_run_into_a_used_folder_stops_unless_overwrite_and_files_follow_the_umask(tiny_preset, tmp_path):
    out = tmp_path / "out"
    args = tiny_training_args(tiny_preset, out, max_train_steps=2, checkpointing_steps=1)
    assert run(args).returncode == 0
    again = run(args)
    assert again.returncode != 0 and "holds another run's checkpoints (checkpoint-1, checkpoint-2)" in again.stderr
    (out / "checkpoints" / "checkpoint-2" / "marker").write_text("old run")
    assert run([*args, "--overwrite_output_dir"]).returncode == 0  # the bare flag means true
    assert not (out / "checkpoints" / "checkpoint-2" / "marker").exists()
    umask = os.umask(0)
    os.umask(umask)
    for path in (out / "unet" / "diffusion_pytorch_model.safetensors", out / "checkpoints" / "checkpoint-2" / "model.safetensors"):  # noqa: E501
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_resume_refuses_changed_options_the_checkpoint_depends_on_and_keeps_the_first_config(tiny_preset, tmp_path):
    out = tmp_path / "out"
    assert run(tiny_training_args(tiny_preset, out, max_train_steps=2, checkpointing_steps=2)).returncode == 0
    first = (out / "training_config.yaml").read_text()
    refused = run(tiny_training_args(tiny_preset, out, resume_from_checkpoint="latest", max_train_steps=3, seed=3))
    assert refused.returncode == 2 and "seed:" in refused.stderr and "Traceback" not in refused.stderr
    base = TrainingConfig.from_yaml(out / "training_config.yaml")  # the same check, in process for the other options
    for option, value in (("train_batch_size", 8), ("use_ema", False), ("dataset_split", "test"),
                          ("validation_share", 0.2)):
        changed = dataclasses.replace(base, resume_from_checkpoint="latest", max_train_steps=3, **{option: value})
        with pytest.raises(ValueError, match=f"{option}: "):
            check_resume_config(str(out), changed)
    assert not (out / "checkpoints" / "checkpoint-3").exists()
    resumed = run(tiny_training_args(tiny_preset, out, resume_from_checkpoint="latest", max_train_steps=3,
                                     learning_rate=5e-4))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming with learning_rate = 0.0005 (the first run had 0.001)" in resumed.stderr
    assert (out / "training_config.yaml").read_text() == first
    # The schedule is a function of the step: step 3 (after 2 warm-up steps, the last of 3) trains at the new peak LR.
    assert json.loads((out / "metrics.json").read_text())["lr_history"] == {"3": pytest.approx(5e-4, rel=1e-12)}


def test_sigint_stops_at_a_step_with_a_checkpoint_and_a_left_lock_file_does_not_block(tiny_preset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # A restarted container: the file names a live process of this host (here the test's own), but no one locks it.
    (out / ".lock").write_text(f"{socket.gethostname()}:{os.getpid()}")
    args = tiny_training_args(tiny_preset, out, max_train_steps=100000, checkpointing_steps=100000,
                              validation_steps=100000)
    trainer = subprocess.Popen([sys.executable, SCRIPT, *args], env=training_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (out / ".lock").exists() and str(trainer.pid) in (out / ".lock").read_text())
        time.sleep(2)
        trainer.send_signal(signal.SIGINT)
        output, _ = trainer.communicate(timeout=120)
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 128 + signal.SIGINT
    assert "stopped by SIGINT at step" in output
    assert len(complete_checkpoints(str(out))) == 1 and not (out / ".lock").exists()


def test_a_full_disk_is_named_and_older_checkpoints_stay_resumable(tiny_preset, tmp_path):
    disk = tmp_path / "disk"
    if not can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    probe = tmp_path / "probe"
    assert run(tiny_training_args(tiny_preset, probe, max_train_steps=1, checkpointing_steps=1)).returncode == 0
    size = sum(f.stat().st_size for f in (probe / "checkpoints" / "checkpoint-1").iterdir())
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(2.6 * size) + 96 * 1024}", "tmpfs", str(disk)], check=True)
    try:
        args = tiny_training_args(tiny_preset, disk / "out", max_train_steps=8, checkpointing_steps=1,
                                  validation_steps=100, checkpoints_total_limit="null")
        full = run(args)
        assert full.returncode != 0 and f"no space left on {disk / 'out' / 'checkpoints'}" in full.stderr
        assert "iostream error" not in full.stderr.splitlines()[-1]
        saved = complete_checkpoints(str(disk / "out"))
        assert len(saved) >= 1 and all(weights_are_finite_and_sane(path) for path in saved)
        step = int(saved[-1].rsplit("-", 1)[1])
        resumed = run([*args, "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "2",
                       "--max_train_steps", str(step + 1), "--num_grid_images", "1"])
        assert resumed.returncode == 0, resumed.stderr[-2000:]  # room is made before the save, keeping the newest
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("overrides,message", [
    (dict(max_grad_norm=-1), "max_grad_norm must be > 0 or null"),
    (dict(snr_gamma=0), "snr_gamma must be > 0 or null"),
    (dict(learning_rate="nan"), "learning_rate must be a finite number"),
    (dict(mixed_precision="fp16"), "fp16 needs a GPU"),
])
def test_bad_values_stop_before_anything_is_written(tiny_preset, tmp_path, overrides, message):
    result = run(tiny_training_args(tiny_preset, tmp_path / "out", **overrides))
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "training_config.yaml").exists()


def test_recipe_values_are_validated_after_command_line_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("corruption_p: 0.1\n")
    assert parse_training_config(["--config", str(recipe), "--corruptions", "gaussian_noise"]).corruption_p == 0.1
    flags = parse_training_config(["--push_to_hub", "--hub_private_repo", "--use_ema", "false", "--hub_model_id", "a/b"])
    assert (flags.push_to_hub, flags.hub_private_repo, flags.use_ema) == (True, True, False)


def _image_folder(root, good: int, bad: int) -> None:
    root.mkdir(parents=True)
    for i in range(good):
        PIL.Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / f"good{i}.png")
    for i in range(bad):
        (root / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")


def test_a_dataset_or_validation_split_without_decodable_images_fails_before_the_first_step(tiny_preset, tmp_path):
    _image_folder(tmp_path / "broken", good=0, bad=3)
    result = run(tiny_training_args(tiny_preset, tmp_path / "out", dataset=str(tmp_path / "broken"), validation_split="null"))
    assert result.returncode != 0 and "broken split 'train' holds no decodable image" in result.stderr
    _image_folder(tmp_path / "split" / "train", good=3, bad=0)
    _image_folder(tmp_path / "split" / "test", good=0, bad=2)
    result = run(tiny_training_args(tiny_preset, tmp_path / "out2", dataset=str(tmp_path / "split")))
    assert result.returncode != 0 and "split 'test' holds no decodable image" in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out2" / "checkpoints").exists()


def test_a_batch_larger_than_the_dataset_is_said_and_recorded(tiny_preset, tmp_path):
    _image_folder(tmp_path / "three", good=3, bad=0)
    result = run(tiny_training_args(tiny_preset, tmp_path / "out", dataset=str(tmp_path / "three"), validation_split="null",
                                    max_train_steps=2))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exceeds the 3 training images: batches hold 3 images per process" in result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["train_batch_size_effective"] == 3 and metrics["mixed_precision"] == "no"


def test_a_bad_parquet_row_has_the_same_id_every_epoch():
    transform = ImageRecordTransform("image", channels=1, resolution=8, name="rows.parquet/train")
    ids = set()
    for epoch in range(2):
        transform.set_epoch(epoch)
        record = transform.record({"bytes": b"not an image", "path": None}, 7)
        ids.add(record["record_id"])
    assert len(ids) == 1 and "0x" not in ids.pop()


def test_push_to_hub_without_a_token_or_endpoint_fails_before_training(tiny_preset, tmp_path):
    env = training_env(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="0")
    env.pop("HF_TOKEN", None)
    args = tiny_training_args(tiny_preset, tmp_path / "out", push_to_hub="true", hub_model_id="me/model")
    result = run(args, env=env)
    assert result.returncode != 0 and "push_to_hub needs a Hub token" in result.stderr
    result = run(args, env={**env, "HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode != 0 and "push_to_hub: cannot reach the Hub at http://127.0.0.1:9" in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_preset_cannot_import_arbitrary_modules_or_use_a_wrong_component(tmp_path):
    from diffusers import AutoencoderKL

    from diffusers_robust import RobustDDPMScheduler

    for unet_entry, message in ((["this", "s"], "may only use"), (["diffusers", "AutoencoderKL"], "must be a UNet2DModel")):
        folder = tmp_path / unet_entry[0]
        RobustDDPMScheduler().save_config(folder / "scheduler")
        AutoencoderKL(block_out_channels=(8,), norm_num_groups=4).save_config(folder / "unet")
        index = {"_class_name": "RobustDDPMPipeline", "unet": unet_entry,
                 "scheduler": ["diffusers_robust.schedulers.scheduling_robust_ddpm", "RobustDDPMScheduler"]}
        (folder / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=message):
            build_pipeline_from_preset(folder)
    assert "this" not in sys.modules


def test_yaml_of_the_first_run_is_what_resume_compares_against(tiny_preset, tmp_path):
    out = tmp_path / "out"
    assert run(tiny_training_args(tiny_preset, out, max_train_steps=1, checkpointing_steps=1)).returncode == 0
    config = yaml.safe_load((out / "training_config.yaml").read_text())
    assert config["train_batch_size"] == 16 and config["overwrite_output_dir"] is False


def test_a_recipe_with_a_key_given_twice_is_refused_naming_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 1\nlearning_rate: 1e-3\nseed: 2\n")
    with pytest.raises(ValueError, match=r"recipe.yaml is not valid YAML at line 3, column 1: option 'seed' is given twice"):
        TrainingConfig.from_yaml(recipe)


def test_more_sampling_steps_than_training_timesteps_stop_before_training(tiny_preset, tmp_path):
    result = run(tiny_training_args(tiny_preset, tmp_path / "out", num_inference_steps=2000))
    assert result.returncode == 2 and "num_inference_steps 2000 exceeds the preset's" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
