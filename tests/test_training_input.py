"""Bad training input stops with a clear message and loses nothing already saved."""

import dataclasses
import os
import re

import datasets
import pytest
from conftest import REPO_ROOT, tiny_training_args
from conftest import run_training_script as run

from diffusers_robust.training.config import TrainingConfig, build_argument_parser, parse_training_config


@pytest.fixture(scope="module")
def text_parquet(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("text") / "captions.parquet"
    datasets.Dataset.from_dict({"caption": ["a", "b", "c"]}).to_parquet(str(path))
    return str(path)


@pytest.mark.parametrize("overrides,message", [
    (dict(dataset="/no/such/images"), "dataset path /no/such/images does not exist"),
    (dict(resolution=9), "resolution 9 cannot be downsampled .* multiple of 2"),
    (dict(pipeline="./no-such-preset"), "no preset or pipeline folder './no-such-preset': presets are"),
    (dict(lr_scheduler="step"), "lr_scheduler must be one of"),
    (dict(corruptions=["fog"], corruption_p=0.5), "unknown corruption 'fog'"),
])
@pytest.mark.slow
def test_bad_input_stops_before_training_with_a_message(tiny_preset, tmp_path, overrides, message):
    result = run(tiny_training_args(tiny_preset, tmp_path / "out", **overrides))
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr[-2000:]
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow
def test_dataset_without_image_column_is_named(tiny_preset, tmp_path, text_parquet):
    result = run(tiny_training_args(tiny_preset, tmp_path / "out", dataset=text_parquet, validation_split="null"))
    assert result.returncode != 0 and "no image column found" in result.stderr and "caption" in result.stderr


def test_yaml_recipe_with_unknown_key_is_named(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 1\nlearning_rat: 0.001\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['learning_rat'\]"):
        parse_training_config(["--config", str(recipe)])


def test_command_line_overrides_the_recipe_and_parses_types(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed: 1\nuse_ema: true\ncorruptions: [gaussian_noise]\ncorruption_p: 0.5\n")
    config = parse_training_config(["--config", str(recipe), "--seed", "7", "--use_ema", "false",
                                    "--corruptions", "jpeg", "blur", "--max_grad_norm", "null"])
    assert (config.seed, config.use_ema, config.corruptions, config.max_grad_norm) == (7, False, ["jpeg", "blur"], None)
    assert config.corruption_p == 0.5


@pytest.mark.parametrize("values,message", [
    (dict(mixed_precision="fp8"), "mixed_precision"),
    (dict(corruption_p=0.5), "non-empty corruptions"),
    (dict(corruption_severity=[0, 3]), "corruption_severity"),
    (dict(max_train_steps=None), "set max_train_steps or num_epochs"),
    (dict(train_batch_size=0), "train_batch_size"),
    (dict(restoration_training=True), "restoration_training needs corruptions"),
    (dict(restoration_training=True, corruptions=["gaussian_noise"], corruption_p=0.5), "restoration_training needs snr_gamma"),
    # values that used to be accepted and break later (issue 17)
    (dict(output_dir=""), "output_dir is empty"),
    (dict(output_dir="  "), "output_dir is empty"),
    (dict(seed=-1), r"seed must be in \[0, 4294967296\)"),
    (dict(validation_holdout_seed=2**32), r"validation_holdout_seed must be in \[0, 4294967296\)"),
    (dict(num_threads=10**23), r"num_threads must be in \[1, 4096\] or null"),
    (dict(epsilon_scale_slope=-1.0), r"epsilon scaling reaches lambda_t = -998 <= 0 at timestep 999"),
    (dict(epsilon_scale_base=float("nan")), "epsilon_scale_base must be a finite number"),
])
def test_bad_values_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**values)


def test_every_options_bounds_and_choices_are_enforced():
    for item in dataclasses.fields(TrainingConfig):
        bounds, choices = item.metadata["bounds"], item.metadata["choices"]
        outside = []
        if bounds is not None and bounds.low is not None:
            outside.append(bounds.low if bounds.low_open else bounds.low - 1)
        if bounds is not None and bounds.high is not None:
            outside.append(bounds.high if bounds.high_open else bounds.high + 1)
        if choices is not None:
            outside.append("no-such-choice")
        is_list = item.default is dataclasses.MISSING and isinstance(item.default_factory(), list)
        for value in outside:
            value = [value] if is_list else value
            with pytest.raises(ValueError, match=f"^{item.name} must be"):
                TrainingConfig(**{item.name: value})


def test_help_groups_options_and_says_which_may_change_on_resume():
    text = build_argument_parser().format_help()
    for group in ("Run", "Data", "Imperfect training data", "Diffusion objective", "Optimisation", "Checkpoints"):
        assert f"\n{group}:\n" in text
    optimisation = " ".join(text[text.index("\nOptimisation:\n"):text.index("\nEMA:\n")].split())
    assert "--seed" not in optimisation
    assert "--learning_rate LEARNING_RATE peak learning rate (default: 0.0002; > 0; may change on resume)" in optimisation
    assert "--train_batch_size TRAIN_BATCH_SIZE images per process per micro-batch (default: 64; >= 1) " in optimisation


def test_yaml_strings_are_parsed_like_the_command_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 1e-4\ntrain_batch_size: '32'\nmax_grad_norm: null\ncorruption_severity: [1, 3]\n")
    config = parse_training_config(["--config", str(recipe)])  # YAML reads 1e-4 (no dot) as a string
    assert (config.learning_rate, config.train_batch_size, config.max_grad_norm) == (1e-4, 32, None)


@pytest.mark.parametrize("values,message", [
    (dict(train_batch_size="eight"), "train_batch_size must be int, got 'eight'"),
    (dict(use_ema="maybe"), "use_ema must be bool"),
    (dict(corruptions="gaussian_noise"), "corruptions must be a list of str"),
    (dict(seed=None), "seed must be int, got None"),
    (dict(learning_rate=[0.1]), "learning_rate must be float, got \\[0.1\\]"),
])
def test_values_of_the_wrong_type_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig.from_dict(values, source="recipe.yaml")


def test_shipped_recipes_parse():
    config = TrainingConfig.from_yaml(os.path.join(REPO_ROOT, "training", "configs", "digits.yaml"))
    assert config.report and config.report_samples == 256 and config.max_train_steps == 6000
    cifar = TrainingConfig.from_yaml(os.path.join(REPO_ROOT, "training", "configs", "cifar10.yaml"))
    assert cifar.pipeline == "ddpm-cifar10-32" and cifar.mixed_precision == "bf16"
    photos = TrainingConfig.from_yaml(os.path.join(REPO_ROOT, "training", "configs", "photos.yaml"))
    assert photos.pipeline == "ddpm-photos-32" and photos.dataset == "photos" and photos.validation_split == "test"
    small = TrainingConfig.from_yaml(os.path.join(REPO_ROOT, "training", "configs", "small-data.yaml"))
    assert small.keep_best and small.augment_conditioning and small.augment.endswith("edm.yaml")
