"""The benchmarks time what training runs: their steps are built by the training loop's factories."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, run_training_script, tiny_training_args
from PIL import Image
from safetensors.torch import load_file

from diffusers_robust.data.datasets import collate_image_batch, load_image_dataset
from diffusers_robust.training.config import TrainingConfig
from diffusers_robust.training.distributed import step_seed


def load_benchmark(name: str):
    """A module of `benchmarks/` (a folder of scripts, not a package), importing its siblings as a script run does."""
    import sys

    folder = os.path.join(REPO_ROOT, "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so a spawned process that unpickles its functions finds this same module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_benchmark_step_gives_the_training_scripts_weights(tmp_path, tiny_preset):
    # Eight copies of one digit: the first batch is the same in any order, so the benchmark's step sees exactly the
    # batch that the training script's shuffled loader gave its first step.
    from sklearn.datasets import load_digits

    digit = Image.fromarray((load_digits().images[0] * 255 / 16).astype(np.uint8), mode="L")
    for split, count in (("train", 8), ("test", 2)):
        os.makedirs(tmp_path / "data" / split)
        for index in range(count):
            digit.save(tmp_path / "data" / split / f"{index}.png")
    recipe = {"input_perturbation": 0.1, "snr_gamma": 5.0, "corruptions": ["gaussian_noise", "impulse_noise"],
              "corruption_p": 0.5, "corruption_severity": [1, 3], "learning_rate": 1e-3, "lr_warmup_steps": 0,
              "max_train_steps": 1, "train_batch_size": 8, "seed": 3}
    out = tmp_path / "out"
    run_training_script(tiny_training_args(tiny_preset, out, dataset=str(tmp_path / "data"), validation_images=2,
                                           **recipe), check=True)
    trained = load_file(out / "checkpoints" / "checkpoint-1" / "model.safetensors")

    config = TrainingConfig(pipeline=tiny_preset, dataset=str(tmp_path / "data"), **recipe)
    loaded = load_image_dataset(config.dataset, "train", channels=1, resolution=8)
    batch = collate_image_batch([loaded.dataset[index] for index in range(8)])
    step, model = load_benchmark("bench_train_step").make_trainer(
        tiny_preset, config, batch["augment_labels"].shape[1], torch.device("cpu"))
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    torch.manual_seed(step_seed(config.seed + 1, 0, 0))  # the training loop's dropout and noise seeds of its first step
    step(batch, torch.Generator().manual_seed(step_seed(config.seed, 0, 0)))

    stepped = model.state_dict()
    assert stepped.keys() == trained.keys()
    assert any(not torch.equal(initial[name], stepped[name]) for name in stepped)  # the step trained something
    for name, value in stepped.items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_bench_train_step_runs_its_smallest_configuration_with_the_profile(monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys, "argv", ["bench_train_step.py", "--steps", "2", "--block", "1", "--batch-size", "8",
                                      "--threads", "1", "--profile"])
    load_benchmark("bench_train_step").main()
    printed = capsys.readouterr().out
    assert "| diffusers example |" in printed and "ratio (diffusers-robust / diffusers example)" in printed
    parts = dict(re.findall(r"^\| ([^|]+) \| ([0-9.]+) \| [0-9.]+% \|$", printed, re.MULTILINE))
    assert {"UNet forward", "backward", "optimizer step, zero_grad", "EMA"} <= set(parts)
    whole = float(re.search(r"^\| whole step \(sum\) \| ([0-9.]+) \|", printed, re.MULTILINE)[1])
    assert sum(float(v) for k, v in parts.items() if k != "whole step (sum)") == pytest.approx(whole, abs=0.05)


@pytest.mark.slow
def test_restore_photos_benchmark_runs_its_smallest_configuration(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from conftest import make_tiny_unet

    from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler

    RobustDDPMPipeline(unet=make_tiny_unet(sample_size=32, channels=3), scheduler=RobustDDPMScheduler(50)).save_pretrained(
        tmp_path / "pipe")
    benchmark = load_benchmark("restore_photos")
    cases = ["gaussian std 0.1", "50% missing pixels (mask known)", "blur 1 px (estimated)"]
    monkeypatch.setattr(sys, "argv", ["restore_photos.py", "--pipeline", str(tmp_path / "pipe"), "--images", "2",
                                      "--tune_images", "2", "--output", str(tmp_path / "figures.json"), "--cases", *cases])
    benchmark.main()
    figures = json.loads((tmp_path / "figures.json").read_text())
    rows = figures["rows"]
    assert [row["case"] for row in rows] == cases
    # What auto found, per image, on the clean tiles and on each case it scores.
    assert {case: len(found) for case, found in figures["detections"].items()} == {
        "clean": 2, "gaussian std 0.1": 2, "50% missing pixels (mask known)": 2}
    by_case = {row["case"]: row for row in rows}
    assert set(by_case["gaussian std 0.1"]["classical"]) == {"non-local means", "wavelet (BayesShrink)", "total variation"}
    assert by_case["gaussian std 0.1"]["auto"] is not None and by_case["blur 1 px (estimated)"]["auto"] is None
    # scikit-image's inpainting, given the true mask, beats the input by far: the mask the benchmark passes is right.
    inpainting = by_case["50% missing pixels (mask known)"]
    assert inpainting["classical"]["biharmonic inpainting"]["scores"][0] > inpainting["input"][0] + 10
    printed = capsys.readouterr().out
    assert "| gaussian std 0.1 |" in printed and "| true damage | clean | gaussian_noise |" in printed
    # The figures it wrote are never replaced, and an unknown case is named before any work.
    for extra, message in ((["--output", str(tmp_path / "figures.json")], "exists"), (["--cases", "gaussian 0.3"], "unknown")):
        monkeypatch.setattr(sys, "argv", ["restore_photos.py", "--pipeline", str(tmp_path / "pipe"), *extra])
        with pytest.raises(SystemExit):
            benchmark.main()
        assert message in capsys.readouterr().err


def test_the_photo_benchmarks_noise_level_reads_a_channel_with_no_detail_as_noiseless():
    """A flat black channel (a near-white JPEG tile has one) has no nonzero diagonal wavelet detail: scikit-image reads
    NaN there with a warning; the baselines' noise level reads 0 for it, silently, and non-local means keeps the tile."""
    import warnings

    import numpy as np

    denoise, _ = load_benchmark("restore_photos").baselines("JPEG quality 10")["non-local means"]
    tile = np.zeros((32, 32, 3))
    tile[..., 1] = np.linspace(0, 1, 32)[None, :]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = denoise(tile, 0.8, None)
    assert np.isfinite(restored).all() and np.abs(restored - tile).max() < 1e-6


@pytest.mark.slow
def test_bench_overheads_runs_both_programs_on_a_colour_preset(tmp_path, monkeypatch, capsys):
    """Its smallest configuration on an RGB preset (the CIFAR-10 preset's case, made small): ours used to stop where
    the peer converts the grey digits to the preset's channels."""
    import shutil
    import sys

    from conftest import make_tiny_unet

    from diffusers_robust import RobustDDPMScheduler

    preset = tmp_path / "rgb-preset"
    make_tiny_unet(sample_size=16, channels=3).save_config(preset / "unet")
    RobustDDPMScheduler(num_train_timesteps=100).save_config(preset / "scheduler")
    shutil.copy(os.path.join(REPO_ROOT, "pipelines", "ddpm-digits", "model_index.json"), preset)
    benchmark = load_benchmark("bench_overheads")
    assert benchmark.preset_shape(str(preset)) == (3, 16)
    monkeypatch.setattr(sys, "argv", ["bench_overheads.py", "--preset", str(preset), "--steps", "1", "2", "--repeats", "1"])
    benchmark.main()
    printed = capsys.readouterr().out
    assert "| ours / peer |" in printed and printed.count("steps:") == 4


def _main_job_reference_keys() -> set[str]:
    """The figures `scripts/main_job.sh` prints for each reference arm (its `rows`)."""
    import re

    with open(os.path.join(REPO_ROOT, "scripts", "main_job.sh"), encoding="utf-8") as handle:
        script = handle.read()
    rows = script[script.index("rows = ["):script.index("for label, key, fmt in rows")]
    return set(re.findall(r'\("[^"]+", "(\w+)", "\{', rows))


def test_the_main_jobs_reference_holds_every_figure_the_job_prints():
    import json

    import yaml

    keys = _main_job_reference_keys()
    assert {"coverage", "recall", "background_noise", "frechet_classifier"} <= keys
    assert keys <= set(load_benchmark("imperfect_data").REFERENCE_KEYS)
    with open(os.path.join(REPO_ROOT, "benchmarks", "imperfect_data_reference.json"), encoding="utf-8") as handle:
        reference = json.load(handle)
    arms = reference["arms"]
    with open(os.path.join(REPO_ROOT, "training", "configs", "imperfect-digits.yaml"), encoding="utf-8") as handle:
        job = yaml.safe_load(handle)
    assert reference["recipe"] == {key: job[key] for key in ("max_train_steps", "prediction_type", "snr_gamma",
                                                             "noisy_data_max_weight")}
    assert set(arms) == {"job's recipe", "plain DDPM", "clean 10% only", "all-clean oracle"}
    for figures in arms.values():
        assert keys <= set(figures) and {f"{key}_spread" for key in keys} <= set(figures) and figures["seeds"] >= 2


@pytest.mark.slow
def test_imperfect_data_benchmark_runs_its_smallest_configuration(tmp_path, tiny_preset, monkeypatch, capsys):
    """Two steps per arm on a tiny preset, 16 samples each: the table, the files and the main job's reference."""
    import json
    import sys

    import yaml

    benchmark = load_benchmark("imperfect_data")
    reference = tmp_path / "reference.json"
    monkeypatch.setattr(sys, "argv", ["imperfect_data.py", "--output_dir", str(tmp_path / "runs"), "--settings", "noisy90",
                                      "--seeds", "0", "--max_train_steps", "2", "--jobs", "1", "--pipeline", tiny_preset,
                                      "--num_samples", "16", "--write_reference", str(reference), "--prediction_type", "sample",
                                      "--snr_gamma", "5", "--noisy_data_max_weight", "2"])
    benchmark.main()
    printed = capsys.readouterr().out
    for arm in ("oracle", "noisy90-plain", "noisy90-ambient", "clean-only"):
        assert f"| {arm} | 1 |" in printed
        assert os.path.isfile(tmp_path / "runs" / f"{arm}-seed0" / "figures.json")
    assert "| floor: clean train split vs held-out |" in printed
    with open(tmp_path / "runs" / "noisy90-ambient-seed0" / "training_config.yaml", encoding="utf-8") as handle:
        assert yaml.safe_load(handle)["noisy_data_max_weight"] == 2.0  # the cap reached the objective's training run
    written = json.loads(reference.read_text())
    assert written["recipe"] == {"max_train_steps": 2, "prediction_type": "sample", "snr_gamma": 5.0,
                                 "noisy_data_max_weight": 2.0}
    arms = written["arms"]
    assert set(arms) == {"job's recipe", "plain DDPM", "clean 10% only", "all-clean oracle"}
    for figures in arms.values():
        assert figures["seeds"] == 1 and _main_job_reference_keys() <= set(figures)
        assert 0 <= figures["coverage"] <= 1 and figures["coverage_spread"] == 0
    # A weight cap the objective cannot take is refused before any training, naming the option.
    monkeypatch.setattr(sys, "argv", ["imperfect_data.py", "--output_dir", str(tmp_path / "bad"), "--noisy_data_max_weight", "1"])
    with pytest.raises(SystemExit):
        benchmark.main()
    assert "--noisy_data_max_weight (s_max) must be > 1" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_bench_data_runs_its_smallest_configuration(monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys, "argv", ["bench_data.py", "--images", "32", "--batch-size", "16"])
    load_benchmark("bench_data").main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| map-style", "| streaming"))]
    assert len(rows) == 6 and all(float(row.split("|")[3].replace(",", "")) > 0 for row in rows)


@pytest.mark.slow
def test_bench_time_to_quality_runs_its_smallest_configuration(tmp_path, monkeypatch, capsys):
    import json
    import sys

    output = tmp_path / "ttq.json"
    monkeypatch.setattr(sys, "argv", ["bench_time_to_quality.py", "--arms", "peer", "ours", "--max-images", "128",
                                      "--eval-every-images", "64", "--samples", "16", "--output", str(output)])
    load_benchmark("bench_time_to_quality").main()
    printed = capsys.readouterr().out
    assert "| peer |" in printed and "| ours |" in printed
    results = json.loads(output.read_text())
    assert set(results) == {"peer", "ours"} and all(result["history"] for result in results.values())


@pytest.mark.slow
def test_restore_detector_runs_its_smallest_configuration(tmp_path, monkeypatch, capsys):
    import sys

    from conftest import make_tiny_unet

    from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler
    from diffusers_robust.data.corruptions import CORRUPTIONS

    RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=RobustDDPMScheduler(50)).save_pretrained(tmp_path / "pipe")
    monkeypatch.setattr(sys, "argv", ["restore_detector.py", "--pipeline", str(tmp_path / "pipe"), "--images", "2",
                                      "--psnr_images", "2"])
    load_benchmark("restore_detector").main()
    printed = capsys.readouterr().out
    assert printed.count("\n| ") >= 1 + 5 * len(CORRUPTIONS) + 3  # clean, every corruption at s1-s5, three PSNR rows
    assert "| gaussian_noise/s3 |" in printed and "| impulse_noise/s3 |" in printed


@pytest.mark.slow
def test_calibrate_detector_runs_its_smallest_configuration(tmp_path, monkeypatch, capsys):
    import json
    import sys

    from conftest import make_tiny_unet

    from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler

    RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=RobustDDPMScheduler(50)).save_pretrained(tmp_path / "pipe")
    monkeypatch.setattr(sys, "argv", ["calibrate_detector.py", "--pipeline", str(tmp_path / "pipe"), "--images", "3",
                                      "--write", str(tmp_path / "calibration.json")])
    calibrate = load_benchmark("calibrate_detector")
    calibrate.main()
    assert "NOISE_RATIO" in capsys.readouterr().out
    written = json.loads((tmp_path / "calibration.json").read_text())
    with open(os.path.join(REPO_ROOT, "benchmarks", "detector_calibration.json")) as handle:
        recorded = json.load(handle)
    assert written.keys() == recorded.keys() and written["noise_ratio"].keys() == recorded["noise_ratio"].keys()
    assert written["severity_right"].keys() == recorded["severity_right"].keys() and written["images"] == 3
    calibrate.severity_cutoff(written), calibrate.noise_ratio_bounds(written)  # the rules read what the script writes


@pytest.mark.slow
def test_small_data_benchmark_runs_its_smallest_configuration(tmp_path, monkeypatch, capsys):
    """Two steps of one arm, two seeds at once, on a new balanced subset of 10 digits annotated with sigma_min (written
    once: two seeds writing it at once raced), scored last and best."""
    import sys

    monkeypatch.setattr(sys, "argv", ["small_data.py", "--output_dir", str(tmp_path), "--images", "10",
                                      "--max_train_steps", "2", "--seeds", "0", "1", "--jobs", "2", "--num_samples", "8",
                                      "--arms", "sigma_min 0.05"])
    load_benchmark("small_data").main()
    printed = capsys.readouterr().out
    assert "| sigma_min 0.05 |" in printed and "| sigma_min 0.05: best checkpoint (step " in printed
    train = sorted((tmp_path / "data" / "digits-10-sigma0.05" / "train").glob("*.png"))
    assert len(train) == 10 and len(list((tmp_path / "data" / "digits-10-sigma0.05" / "test").glob("*.png"))) == 300
    sidecar = (tmp_path / "data" / "digits-10-sigma0.05" / "annotations.csv").read_text()
    assert sidecar.count("0.05") == 10
    figures = json.loads((tmp_path / "n10" / "sigma_min-0.05-seed0" / "figures.json").read_text())
    assert 0 <= figures["memorisation"]["share_nearer_than_held_out"] <= 1 and figures["digits"]["classes_present"] >= 1
    checked = load_benchmark("small_data").outside_subset_check(str(tmp_path), 10, 8)
    assert [line.split(":")[0] for line in checked.splitlines()] == [
        f"sigma_min-0.05-seed{seed} {weights}" for seed in (0, 1) for weights in ("last", "best")]


@pytest.mark.slow
def test_robustness_ablation_runs_its_smallest_configuration(tmp_path, tiny_preset, monkeypatch, capsys):
    """Two steps of one trained arm and one derived from it, on a tiny preset, each evaluated on a few images."""
    import sys

    output = tmp_path / "ablation"
    monkeypatch.setattr(sys, "argv", ["robustness_ablation.py", "--output_dir", str(output), "--arms", "plain",
                                      "epsilon-scaling", "--max_train_steps", "2", "--jobs", "1", "--pipeline", tiny_preset,
                                      "--num_images", "8", "--num_samples", "8"])
    load_benchmark("robustness_ablation").main()
    printed = capsys.readouterr().out
    assert "| plain |" in printed and "| epsilon-scaling |" in printed
    assert (output / "ablation.json").is_file() and (output / "epsilon-scaling" / "evaluation" / "report.json").is_file()


@pytest.mark.slow
def test_recipe_sweep_runs_its_smallest_configuration(tmp_path, monkeypatch, capsys):
    """Three variants of the main job's recipe (an option, a UNet width), two steps each, scored against the train
    split."""
    import json
    import sys

    output = tmp_path / "sweep"
    narrow = "UNet half as wide (16, 32, 32)"
    monkeypatch.setattr(sys, "argv", ["recipe_sweep.py", "--output_dir", str(output), "--variants", "job", "weight cap 8",
                                      narrow, "--max_train_steps", "2", "--num_samples", "16", "--jobs", "1"])
    load_benchmark("recipe_sweep").main()
    printed = capsys.readouterr().out
    assert "| job |" in printed and "| weight cap 8 |" in printed and f"| {narrow} |" in printed
    with open(output / "weight-cap-8" / "training_config.yaml", encoding="utf-8") as handle:
        assert "noisy_data_max_weight: 8.0" in handle.read()
    exported = json.loads((output / "UNet-half-as-wide-(16-32-32)" / "unet" / "config.json").read_text())
    assert exported["block_out_channels"] == [16, 32, 32]
    figures = json.loads((output / "job" / "figures.json").read_text())
    assert 0 <= figures["coverage"] <= 1 and 0 <= figures["confident_fraction"] <= 1
