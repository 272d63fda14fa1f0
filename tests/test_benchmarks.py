"""The benchmarks time what training runs: their steps are built by the training loop's factories."""

import importlib.util
import os

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
    """A module of `benchmarks/` (a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
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
