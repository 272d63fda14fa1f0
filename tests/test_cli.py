"""`diffusers-robust` end to end on a tiny saved pipeline: evaluate writes its report; bad input exits with 2."""

import json
import subprocess
import sys

import pytest
from conftest import make_tiny_unet, training_env

from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler

REPORT_KEYS = {"report_version", "dataset", "split", "train_split", "num_images", "seed", "sampler", "restoration",
               "generation", "losses"}
ROW_KEYS = {"case", "method", "psnr_input", "psnr", "psnr_median_filter", "ssim_input", "ssim", "ssim_median_filter",
            "accuracy_input", "accuracy", "accuracy_median_filter"}


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
    assert [row["case"] for row in report["restoration"]] == [
        "gaussian_noise/s3", "gaussian_noise/sigma0.3", "impulse_noise/s5", "gaussian_blur/s3"]
    assert [row["method"] for row in report["restoration"]] == ["noise", "noise", "inpaint", "linear"]
    assert all(set(row) == ROW_KEYS for row in report["restoration"])
    sigma = report["restoration"][1]
    assert 12 < sigma["psnr_input"] < 14  # sigma 0.3 on digits: about 12.9 dB, whatever the model
    generation = report["generation"]
    assert generation["samples"] == 8 and generation["feature_extractor"].startswith("pixels-16x16")
    assert set(generation["digits"]) == {"confident_fraction", "classes_present", "class_counts", "class_entropy_bits"}
    assert set(generation["memorisation"]) == {"median_distance_to_train", "median_distance_to_held_out",
                                               "share_closer_to_train"}
    assert {"clean", "restore/impulse_noise/s5"} <= set(report["losses"])
    markdown = (out / "report.md").read_text()
    assert "| gaussian_noise/sigma0.3 | noise |" in markdown and "restoration.png" in markdown
    for name in ("restoration.png", "samples.png"):
        assert (out / name).stat().st_size > 1000


@pytest.mark.parametrize("args,message", [
    (["evaluate", "/no/such/pipeline"], "error:"),
    (["evaluate", "PIPELINE", "--cases", "gaussian_noise/s9"], "gaussian_noise/s9"),
    (["evaluate", "PIPELINE", "--num_images", "0"], "num_images"),
    (["evaluate", "PIPELINE", "--dataset", "/no/such/folder"], "error:"),
])
def test_bad_input_exits_with_code_2_and_one_line(tiny_pipeline_folder, tmp_path, args, message):
    args = [tiny_pipeline_folder if a == "PIPELINE" else a for a in args]
    result = run_cli(*args, "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
