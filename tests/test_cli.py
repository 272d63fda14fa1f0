"""`diffusers-robust` end to end on a tiny saved pipeline: train, sample, restore, evaluate and push; bad input exits
with 2 and one line."""

import json
import os
import subprocess
import sys

import pytest
from conftest import make_tiny_unet, training_env

from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler
from diffusers_robust.output_folders import MARKER_FILE

pytestmark = pytest.mark.slow  # every test here runs the `diffusers-robust` command in a fresh process

REPORT_KEYS = {"report_version", "dataset", "split", "held_out_share", "train_split", "num_images", "seed", "sampler",
               "train_images", "conversion", "held_out_noise", "restoration", "generation", "losses"}
ROW_KEYS = {"case", "method", "baseline", "caveat", "psnr_input", "psnr", "psnr_baseline", "ssim_input", "ssim",
            "ssim_baseline", "accuracy_input", "accuracy", "accuracy_baseline"}


@pytest.fixture(scope="module")
def tiny_pipeline_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=RobustDDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return str(folder)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffusers_robust", *args], env=training_env(), capture_output=True,
                          text=True, timeout=600)


def test_evaluate_writes_report_json_markdown_and_plots(tiny_pipeline_folder, tmp_path):
    out = tmp_path / "evaluation"
    result = run_cli("evaluate", tiny_pipeline_folder, "--output_dir", str(out), "--num_images", "16", "--num_samples", "8",
                     "--sampling_steps", "3", "--cases", "gaussian_noise/s3", "gaussian_noise/sigma0.3", "impulse_noise/s5",
                     "gaussian_blur/s3")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report) == REPORT_KEYS
    assert report["num_images"] == 16 and report["split"] == "test" and report["sampler"] == "DDIM-3"
    # Clean held-out digits: most read clean, and the report does not call them noisy.
    assert report["held_out_noise"]["noisy_share"] < 0.5 and "noisy themselves" not in (out / "report.md").read_text()
    assert [row["case"] for row in report["restoration"]] == [
        "gaussian_noise/s3", "gaussian_noise/sigma0.3", "impulse_noise/s5", "gaussian_blur/s3"]
    assert [row["method"] for row in report["restoration"]] == ["noise", "noise", "inpaint", "linear"]
    assert all(set(row) == ROW_KEYS for row in report["restoration"])
    # A classical baseline of the right kind per case, tuned on train images; none where the exact operator is inverted.
    baselines = [row["baseline"] for row in report["restoration"]]
    assert baselines[0].startswith(("Gaussian filter", "none")) and baselines[2] == "median 3x3" and baselines[3] is None
    assert report["restoration"][3]["psnr_baseline"] is None and "exact operator" in report["restoration"][3]["caveat"]
    sigma = report["restoration"][1]
    assert 12 < sigma["psnr_input"] < 14  # sigma 0.3 on digits: about 12.9 dB, whatever the model
    generation = report["generation"]
    assert generation["samples"] == 8 and generation["feature_extractor"].startswith("pixels-16x16")
    assert set(generation["digits"]) == {"confident_fraction", "classes_present", "class_counts", "class_entropy_bits"}
    assert set(generation["memorisation"]) == {"median_distance_to_train", "median_distance_to_held_out",
                                               "share_closer_to_train", "median_distance_held_out_to_train", "meaningful",
                                               "share_nearer_than_held_out", "distance_ratio_to_held_out"}
    assert generation["memorisation"]["meaningful"] is False  # an untrained model's samples are noise, not digits
    assert "**Not meaningful here**" in (out / "report.md").read_text()
    assert {"clean", "restore/impulse_noise/s5"} <= set(report["losses"])
    markdown = (out / "report.md").read_text()
    assert "| gaussian_noise/sigma0.3 | noise | Gaussian filter" in markdown and "restoration.png" in markdown
    assert "| gaussian_blur/s3* | linear | - |" in markdown and "\n* the restoration inverts the exact operator" in markdown
    for name in ("restoration.png", "samples.png"):
        assert (out / name).stat().st_size > 1000


@pytest.mark.parametrize("args,message", [
    (["evaluate", "/no/such/pipeline"], "error:"),
    (["evaluate", "PIPELINE", "--cases", "gaussian_noise/s9"], "gaussian_noise/s9"),
    (["evaluate", "PIPELINE", "--num_images", "0"], "num_images"),
    (["evaluate", "PIPELINE", "--dataset", "/no/such/folder"], "error:"),
    (["sample", "/no/such/pipeline"], "error:"),
    (["sample", "PIPELINE", "--num_images", "0"], "num_images"),
    (["restore", "PIPELINE", "/no/such/image.png"], "/no/such/image.png"),
    (["restore", "PIPELINE", "TINY_IMAGE", "--noise_sigma", "0.1"], "is (1, 1) pixels but the UNet takes (8, 8)"),
    (["restore", "PIPELINE", "SMALL_IMAGE", "--noise_sigma", "0.1", "--strength", "0.3"], "strength"),
    (["train", "--max_grad_norm", "-1"], "max_grad_norm must be > 0"),
    (["push", "/no/such/folder", "me/model"], "model_index.json"),
])
def test_bad_input_exits_with_code_2_and_one_line(tiny_pipeline_folder, tmp_path, args, message):
    images = {"TINY_IMAGE": _write_images(tmp_path / "tiny", 1, 1)[0], "SMALL_IMAGE": _write_images(tmp_path / "small", 1)[0]}
    args = [tiny_pipeline_folder if a == "PIPELINE" else images.get(a, a) for a in args]
    result = run_cli(*args, *([] if args[0] == "push" else ["--output_dir", str(tmp_path / "out")]))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def _write_images(folder, count: int, size: int = 8) -> list[str]:
    import numpy as np
    import PIL.Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"digit-{index}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_every_subcommand_has_help():
    for command in ("train", "sample", "restore", "evaluate", "push"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage: diffusers-robust " + command in result.stdout
    assert "--input_perturbation" in run_cli("train", "--help").stdout


def test_sample_writes_a_grid_and_each_image_reproducibly_per_seed(tiny_pipeline_folder, tmp_path):
    import numpy as np
    import PIL.Image

    for name in ("a", "b"):
        result = run_cli("sample", tiny_pipeline_folder, "--output_dir", str(tmp_path / name), "--num_images", "5",
                         "--batch_size", "2", "--num_inference_steps", "3", "--seed", "7")
        assert result.returncode == 0, result.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name != MARKER_FILE)
    assert files == ["grid.png"] + [f"image-{i:05d}.png" for i in range(5)]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert PIL.Image.open(tmp_path / "a" / "grid.png").size[0] >= 256  # 8x8 samples enlarged for people
    first, second = (np.asarray(PIL.Image.open(tmp_path / "a" / f"image-0000{i}.png")) for i in (0, 1))
    assert first.shape == (8, 8) and not np.array_equal(first, second)


def test_restore_writes_each_input_under_its_name_and_keeps_unmasked_pixels(tiny_pipeline_folder, tmp_path):
    import numpy as np
    import PIL.Image

    inputs = _write_images(tmp_path / "inputs", 3)
    masks = tmp_path / "masks"
    masks.mkdir()
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:5, 3:6] = 255
    for path in inputs:
        PIL.Image.fromarray(mask).save(masks / os.path.basename(path))
    result = run_cli("restore", tiny_pipeline_folder, str(tmp_path / "inputs"), "--output_dir", str(tmp_path / "out"),
                     "--masks", str(masks), "--restoration_steps", "5", "--batch_size", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    for path in inputs:
        before = np.asarray(PIL.Image.open(path))
        after = np.asarray(PIL.Image.open(tmp_path / "out" / os.path.basename(path)))
        assert after.shape == (8, 8)
        assert np.array_equal(after[mask == 0], before[mask == 0])  # inpainting keeps every known pixel
        assert not np.array_equal(after[mask > 0], before[mask > 0])


@pytest.mark.slow
def test_restore_takes_larger_images_and_a_blur_in_pixels(tiny_pipeline_folder, tmp_path):
    import numpy as np
    import PIL.Image

    _write_images(tmp_path / "inputs", 2, size=16)  # the pipeline's sample size is 8: its UNet is convolutional
    result = run_cli("restore", tiny_pipeline_folder, str(tmp_path / "inputs"), "--output_dir", str(tmp_path / "out"),
                     "--blur_sigma", "1.5", "--restoration_steps", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.asarray(PIL.Image.open(tmp_path / "out" / "digit-0.png")).shape == (16, 16)
    assert json.loads((tmp_path / "out" / "restoration.json").read_text())["images"]["digit-0.png"]["blur_sigma"] == 1.5
    # A folder of several sizes, one of them odd: each image restored at its own size, as restoring it alone would.
    _write_images(tmp_path / "mixed", 2, size=16)
    odd = np.random.default_rng(0).integers(0, 256, (13, 21), dtype=np.uint8)
    PIL.Image.fromarray(odd).save(tmp_path / "mixed" / "z.png")
    result = run_cli("restore", tiny_pipeline_folder, str(tmp_path / "mixed"), "--output_dir", str(tmp_path / "out2"),
                     "--noise_sigma", "0.1", "--batch_size", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.asarray(PIL.Image.open(tmp_path / "out2" / "z.png")).shape == (13, 21)
    assert np.asarray(PIL.Image.open(tmp_path / "out2" / "digit-1.png")).shape == (16, 16)
    alone = run_cli("restore", tiny_pipeline_folder, str(tmp_path / "mixed" / "digit-1.png"), "--output_dir",
                    str(tmp_path / "out3"), "--noise_sigma", "0.1")
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "out2" / "digit-1.png")),
                          np.asarray(PIL.Image.open(tmp_path / "out3" / "digit-1.png")))
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("digit-0.png", "digit-1.png", "z.png"):
        PIL.Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(masks / name)
    refused = run_cli("restore", tiny_pipeline_folder, str(tmp_path / "mixed"), "--output_dir", str(tmp_path / "out4"),
                      "--masks", str(masks))
    assert refused.returncode == 2 and "z.png is 16x16 pixels where its image is 21x13" in refused.stderr


def test_train_subcommand_trains_the_same_run_as_the_script(tiny_preset, tmp_path):
    from conftest import tiny_training_args

    result = run_cli("train", *tiny_training_args(tiny_preset, tmp_path / "run", max_train_steps=2, validation_steps=2,
                                                  checkpointing_steps=1, channels_last="true"))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["global_step"] == 2 and (tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert 0 < summary["seconds_to_first_step"] < 300  # start-up, imports included
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()  # channels_last weights checkpoint and export
    RobustDDPMPipeline.from_pretrained(tmp_path / "run")
