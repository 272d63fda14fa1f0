"""A new user's first steps: named presets from any directory, a UNet built for the data's size and colours (never a
silent conversion), and input errors as one line with exit code 2."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from conftest import training_env

from diffusers_robust import RobustDDPMPipeline
from diffusers_robust.data.datasets import load_digits_dataset, load_image_dataset
from diffusers_robust.data.splits import plan_held_out
from diffusers_robust.pipelines.presets import available_presets, build_pipeline_from_preset, resolve_preset
from diffusers_robust.training.distributed import requested_processes
from diffusers_robust.training.progress import StepProgress, format_duration
from diffusers_robust.training.summary import HISTORY_POINTS, thin_history

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
            "--report", "false", "--logger", "none", "--checkpointing_steps", "2",
            "--validation_steps", "2", "--num_grid_images", "2", "--num_inference_steps", "2", *extra]


@pytest.mark.parametrize("extra, message", [
    ((), "have 3 channel(s) but the preset ddpm-digits takes 1: pass --channels 3 (the UNet is built for them) or "
         "--channels 1 to convert them"),
    (("--channels", "3"), "are 16x16 pixels but the preset ddpm-digits takes 8x8: pass --resolution 16"),
])
@pytest.mark.slow
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


@pytest.mark.slow
def test_version_and_a_fresh_start_from_resume_latest(tmp_path, rgb_folder):
    version = cli(tmp_path, "--version")
    assert version.returncode == 0 and version.stdout.startswith("diffusers-robust 0.")
    first = cli(tmp_path, *_train_args(rgb_folder, "out", "--channels", "1", "--resolution", "8",
                                       "--resume_from_checkpoint", "latest", "--max_train_steps", "1"))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "holds no checkpoint yet, so a fresh run starts" in first.stderr
    # Not a terminal: progress as lines (no bar redrawn per step), no Accelerate chatter per checkpoint.
    assert "step 1/1 (100%) |" in first.stderr and "ETA 0s" in first.stderr and "\r" not in first.stderr
    assert "Saving current state" not in first.stderr and "validation at step 1 (3 held-out images): clean " in first.stderr
    # The folder has no test split: a seeded tenth of it is held out, never trained on, and recorded.
    assert "has no 'test' split: holding out 10% of split 'train' (seed 0)" in first.stderr
    held_out = json.loads((tmp_path / "out" / "metrics.json").read_text())["held_out"]
    assert held_out == {"source": rgb_folder, "split": "train", "held_out_share": 0.1, "held_out_seed": 0, "images": 3}


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def data_a_user_has(tmp_path_factory):
    """The same 8x8 grey images in every form a user has them: an image folder (flat, and with train/test subfolders),
    parquet files named train/test (a glob, and their folder), `save_to_disk` folders and Datasets objects."""
    import datasets

    root = tmp_path_factory.mktemp("forms")
    digits = load_digits_dataset()
    train, test = digits["train"].select(range(40)), digits["test"].select(range(10))
    for split, part in (("train", train), ("test", test)):
        (root / "subfolders" / split).mkdir(parents=True)
        for index, image in enumerate(part["image"]):
            image.save(root / "subfolders" / split / f"{index:02d}.png")
    (root / "flat").mkdir()
    for index, image in enumerate(train["image"]):
        image.save(root / "flat" / f"{index:02d}.png")
    (root / "parquet").mkdir()
    train.to_parquet(str(root / "parquet" / "train.parquet"))
    test.to_parquet(str(root / "parquet" / "test.parquet"))
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root / "saved_dict"))
    train.save_to_disk(str(root / "saved_one"))
    return root, datasets.DatasetDict({"train": train, "test": test})


@pytest.mark.parametrize("form, counts", [
    ("subfolders", (40, 10)), ("parquet/*.parquet", (40, 10)), ("parquet", (40, 10)), ("saved_dict", (40, 10)),
    ("flat", (36, 4)), ("saved_one", (36, 4)), ("DatasetDict", (40, 10)), ("Dataset", (36, 4)),
])
def test_every_form_of_data_gives_training_and_held_out_images_that_never_overlap(data_a_user_has, form, counts):
    root, objects = data_a_user_has
    source = objects if form == "DatasetDict" else objects["train"] if form == "Dataset" else str(root / form)
    plan = plan_held_out(source, "train")
    train = load_image_dataset(source, "train", hold_out=plan.train_hold_out, channels=1, resolution=8)
    held_out = load_image_dataset(plan.source, plan.split, hold_out=plan.hold_out, channels=1, resolution=8)
    assert (len(train.dataset), len(held_out.dataset)) == counts  # test.parquet is never merged into training
    pixels = {np.asarray(r["pixel_values"]).tobytes() for r in train.dataset}
    assert not pixels & {np.asarray(r["pixel_values"]).tobytes() for r in held_out.dataset}


def test_the_hold_out_is_seeded_apart_from_training_and_validation_data_is_used_as_given(data_a_user_has):
    root, _ = data_a_user_has
    first, again = plan_held_out(str(root / "flat")), plan_held_out(str(root / "flat"), seed=0)
    assert first.hold_out.indices(40) == again.hold_out.indices(40) == sorted(first.hold_out.indices(40))
    assert first.hold_out.indices(40) != plan_held_out(str(root / "flat"), seed=1).hold_out.indices(40)
    assert set(first.hold_out.indices(40)).isdisjoint(first.train_hold_out.indices(40))
    given = plan_held_out(str(root / "flat"), validation_data=str(root / "subfolders" / "test"))
    assert (given.train_hold_out, given.source, given.split) == (None, str(root / "subfolders" / "test"), "train")
    with pytest.raises(ValueError, match=r"has splits \['train'\], got validation_split 'val': .* validation_data"):
        plan_held_out(str(root / "flat"), validation_split="val")


@pytest.mark.slow
def test_a_datasets_object_trains_from_python(tmp_path):
    """`run_training(config, dataset=...)` with a `datasets.Dataset` (no test split: a tenth is held out)."""
    script = (
        "from diffusers_robust.data.datasets import load_digits_dataset\n"
        "from diffusers_robust.training.config import TrainingConfig\n"
        "from diffusers_robust.training.loop import run_training\n"
        "data = load_digits_dataset()['train'].select(range(64))\n"
        "config = TrainingConfig(output_dir='out', max_train_steps=2, train_batch_size=8, checkpointing_steps=2,\n"
        "    validation_steps=2, num_grid_images=2, num_inference_steps=2, report=False, logger='none')\n"
        "run_training(config, dataset=data)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=training_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["held_out"]["source"].startswith("Dataset ") and metrics["held_out"]["images"] == 7
    assert metrics["images_seen"] == 16


@pytest.mark.slow
def test_a_launcher_that_drops_processes_on_cpu_says_so_with_the_command_that_runs_them(tmp_path):
    assert requested_processes(["accelerate", "launch", "--num_processes", "4", "x.py"]) == 4
    assert requested_processes(["accelerate", "launch", "--num-processes=3", "x.py"]) == 3
    assert requested_processes(["accelerate", "launch", "x.py"]) is None
    script = os.path.join(REPOSITORY, "training", "train_robust_ddpm.py")
    # The warning comes before set-up, so a run that then stops on a missing dataset is enough (and quick).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", script,
               *_train_args("./no-such-folder", "out")[1:]]
    result = subprocess.run(command, cwd=tmp_path, env=training_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "dataset path ./no-such-folder does not exist" in result.stderr, result.stderr[-3000:]
    assert "accelerate launch asked for 2 processes but runs 1 on this CPU machine" in result.stderr
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1" in result.stderr


def test_progress_lines_say_step_speed_loss_and_eta(caplog):
    progress = StepProgress(total=10, initial=2, interactive=False, interval=0.0)
    with caplog.at_level(logging.INFO, logger="diffusers_robust.training.progress"):
        progress.update(3, 0.5, 100.0)
        progress.update(4, 0.25, 120.0)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and lines[1].startswith("step 4/10 (40%) | ") and "| 120 images/s | loss 0.2500 (mean" in lines[1]
    assert lines[1].rsplit("ETA ", 1)[1] != "?" and format_duration(3725) == "1h02m" and format_duration(65) == "1m05s"


def test_the_package_and_the_command_line_start_without_importing_torch_diffusers_or_datasets():
    """`import diffusers_robust` and `diffusers-robust --help` stay fast (0.05 s and 0.2 s measured, from 10-12 s):
    public names resolve lazily, as in Diffusers."""
    code = ("import sys, contextlib, io\n"
            "import diffusers_robust\n"
            "from diffusers_robust.cli import build_parser\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    build_parser().parse_args(['train', '--help'])\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'datasets', 'accelerate') if m in sys.modules))\n"
            "print(diffusers_robust.RobustDDPMScheduler.__name__, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], env=training_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["[]", "RobustDDPMScheduler True"]


def test_metrics_json_keeps_histories_small_on_long_runs():
    history = {step: 1.0 / step for step in range(1, 100_001)}
    thinned = thin_history(history, HISTORY_POINTS)
    assert len(thinned) == HISTORY_POINTS and {1, 100_000} <= set(thinned) and thinned[100_000] == history[100_000]
    assert thin_history({1: 0.5, 2: 0.25}, HISTORY_POINTS) == {1: 0.5, 2: 0.25}  # short runs keep every step


def test_evaluate_defaults_to_a_quick_depth_and_full_restores_todays():
    from diffusers_robust.cli import build_parser, evaluation_depth
    from diffusers_robust.evaluation.defaults import (
        DEFAULT_RESTORATION_CASES,
        QUICK_RESTORATION_CASES,
        restoration_cases,
    )
    from diffusers_robust.training.config import TrainingConfig

    parse = build_parser().parse_args
    assert evaluation_depth(parse(["evaluate", "model"])) == (list(QUICK_RESTORATION_CASES), 200)
    assert evaluation_depth(parse(["evaluate", "model", "--full"])) == (list(DEFAULT_RESTORATION_CASES), 300)
    given = evaluation_depth(parse(["evaluate", "model", "--full", "--cases", "masking/s2", "--num_images", "7"]))
    assert given == ([("masking", 2)], 7) and len(QUICK_RESTORATION_CASES) == 8
    # the training run's report goes as deep as evaluate does, unless report_full
    assert restoration_cases(TrainingConfig().report_full) == QUICK_RESTORATION_CASES
    assert restoration_cases(TrainingConfig(report_full=True).report_full) == DEFAULT_RESTORATION_CASES
