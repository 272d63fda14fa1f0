"""Learning from imperfect data: noisy-data noising and target, annotations, time-first record choice, sampling stop,
imperfect-data recipes, and training end to end from annotated folders and streams."""

import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO_ROOT, make_tiny_unet, run_training_script, tiny_training_args, training_env
from torch.utils.data import DataLoader

from diffusers_robust import RobustDDIMScheduler, RobustDDPMPipeline, RobustDDPMScheduler, RobustDiffusionObjective
from diffusers_robust.data.annotations import (
    BLUR_SIGMA_MIN,
    JPEG_SIGMA_MIN,
    check_annotation,
    estimate_noise_std,
    lowest_usable_sigma,
    read_sidecar,
)
from diffusers_robust.data.datasets import collate_image_batch, load_image_dataset
from diffusers_robust.data.imperfect import make_imperfect, measure_sigma_min, parse_recipe, save_imperfect
from diffusers_robust.evaluation.metrics import copying_share
from diffusers_robust.training.config import TrainingConfig


def digits(count: int | None = None) -> torch.Tensor:
    loaded = load_image_dataset("digits", channels=1, resolution=8)
    images = torch.cat([b["pixel_values"] for b in DataLoader(loaded.dataset, batch_size=512, collate_fn=collate_image_batch)])
    return images[:count] if count else images


# --- the noising and the target (AMBIENT.md section 1), checked by Monte Carlo against the clean-data minimiser ---

def _slopes(scheduler, t: int, prior_std: float, noise_std: float, samples: int = 400_000):
    """Least-squares slope of the epsilon target and of the x0 target on x_t, for scalar x0 ~ N(0, prior_std^2) observed
    as y = x0 + noise_std z (model units), and the analytic slopes of the clean minimisers E[eps | x_t], E[x0 | x_t]."""
    generator = torch.Generator().manual_seed(0)
    x0 = prior_std * torch.randn(samples, 1, 1, 1, generator=generator, dtype=torch.float64)
    y = x0 + noise_std * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    timesteps = torch.full((samples,), t)
    out = scheduler.add_noisy_data_noise(y, torch.full((samples,), noise_std, dtype=torch.float64), timesteps, generator)
    x_t = out.noisy_images.flatten()
    alpha = float(scheduler.alphas_cumprod[t])
    variance = alpha * prior_std**2 + 1 - alpha
    fitted = float((out.target.flatten() * x_t).mean() / (x_t * x_t).mean())
    return x_t, out.target.flatten(), fitted, variance, alpha


@pytest.mark.parametrize("t", [150, 400])
def test_noisy_data_noising_gives_x_t_the_marginal_of_a_clean_image_noised_to_t(t):
    scheduler = RobustDDPMScheduler()
    x_t, _, _, variance, _ = _slopes(scheduler, t, prior_std=0.5, noise_std=0.4)
    assert x_t.var().item() == pytest.approx(variance, rel=0.01)
    # `add_noise` on the noisy image (the pitfall) would add abar_t * noise_std^2 of variance too much.
    alpha = float(scheduler.alphas_cumprod[t])
    assert abs((variance + alpha * 0.16) - x_t.var().item()) > 0.03 * variance


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_double_tweedie_target_is_minimised_by_the_clean_data_denoiser(prediction_type):
    """For a Gaussian prior the clean denoiser is linear in x_t: the least-squares fit of the target on x_t (its
    minimiser) must have the clean denoiser's slope, though no clean image was ever seen."""
    scheduler = RobustDDPMScheduler(prediction_type=prediction_type)
    t, prior_std, noise_std = 300, 0.5, 0.4
    _, _, fitted, variance, alpha = _slopes(scheduler, t, prior_std, noise_std)
    eps_slope, x0_slope = math.sqrt(1 - alpha) / variance, math.sqrt(alpha) * prior_std**2 / variance
    expected = {"epsilon": eps_slope, "sample": x0_slope,
                "v_prediction": math.sqrt(alpha) * eps_slope - math.sqrt(1 - alpha) * x0_slope}[prediction_type]
    assert fitted == pytest.approx(expected, rel=0.02)


def test_the_plain_target_on_noisy_images_learns_the_noisy_distribution_instead():
    """The check above can fail: regressing the plain target (k = 1) on the same x_t gives another slope."""
    scheduler = RobustDDPMScheduler()
    t, prior_std, noise_std = 300, 0.5, 0.4
    x_t, target, fitted, variance, alpha = _slopes(scheduler, t, prior_std, noise_std)
    levels = scheduler.noise_levels()
    k = float(levels[t] / (levels[t] ** 2 - noise_std**2).sqrt())
    plain = float(((target / k) * x_t).mean() / (x_t * x_t).mean())
    assert fitted == pytest.approx(math.sqrt(1 - alpha) / variance, rel=0.02)
    assert abs(plain - fitted) > 0.05 * fitted


def test_a_record_cannot_serve_a_time_below_its_noise_level():
    scheduler = RobustDDPMScheduler()
    with pytest.raises(ValueError, match=r"noise_sigmas\[0\].*timestep 10"):
        scheduler.add_noisy_data_noise(torch.zeros(1, 1, 4, 4), torch.tensor([0.5]), torch.tensor([10]))
    with pytest.raises(ValueError, match="white Gaussian noise"):
        RobustDDPMScheduler(input_perturbation=0.1).add_noisy_data_noise(
            torch.zeros(1, 1, 4, 4), torch.tensor([0.1]), torch.tensor([500]))


# --- the objective: clean batches bit for bit, time first, then an admissible record ---

def _zero_model(sample, timesteps, labels):
    return torch.zeros_like(sample)


def test_a_batch_of_clean_records_trains_exactly_as_the_plain_objective(tiny_unet):
    from diffusers_robust.models import LabelConditionedUNet

    model = LabelConditionedUNet(tiny_unet)
    objective = RobustDiffusionObjective(RobustDDPMScheduler(), snr_gamma=5.0)
    images = digits(16)
    plain = objective(model, images, generator=torch.Generator().manual_seed(3))
    annotated = objective(model, images, generator=torch.Generator().manual_seed(3),
                          noise_sigmas=torch.zeros(16, dtype=torch.float64), sigma_max=torch.full((16,), math.inf))
    assert torch.equal(plain.loss, annotated.loss) and torch.equal(plain.timesteps, annotated.timesteps)
    assert annotated.records is None


def test_clean_rows_of_a_mixed_batch_get_the_plain_noising_and_target():
    scheduler = RobustDDPMScheduler()
    images, timesteps = digits(4), torch.tensor([900, 700, 500, 300])
    mixed = scheduler.add_noisy_data_noise(images, torch.tensor([0.0, 0.3, 0.0, 0.2]), timesteps,
                                           torch.Generator().manual_seed(0))
    plain = scheduler.add_training_noise(images, timesteps, torch.Generator().manual_seed(0))
    for row in (0, 2):
        assert torch.equal(mixed.noisy_images[row], plain.noisy_images[row])
        assert torch.equal(mixed.target[row], plain.target[row])
    assert not torch.equal(mixed.target[1], plain.target[1])


def test_time_is_drawn_first_and_each_slot_gets_a_record_that_can_serve_it():
    scheduler = RobustDDPMScheduler()
    objective = RobustDiffusionObjective(scheduler, max_weight=4.0)
    sigmas = torch.tensor([0.2] * 28 + [0.0] * 4, dtype=torch.float64)  # [0, 1] units: 0.4 in model units
    upper = torch.full((32,), math.inf)
    upper[3] = 0.6  # a sharp but off-distribution record: only below sigma 0.6 ([0, 1] units)
    levels = scheduler.noise_levels()
    times, served_by = [], []
    for seed in range(200):
        out = objective(_zero_model, torch.zeros(32, 1, 8, 8), generator=torch.Generator().manual_seed(seed),
                        noise_sigmas=sigmas, sigma_max=upper)
        times.append(out.timesteps)
        served_by.append(out.records)
    times, records = torch.cat(times), torch.cat(served_by)
    lowest = torch.tensor([lowest_usable_sigma(float(s), 0.0, 4.0) for s in sigmas]) * 2
    assert bool((levels[times] >= lowest[records]).all())
    assert bool((levels[times[records == 3]] < 1.2).all())
    # Clean records exist, so every time keeps its share: uniform over [0, 1000).
    assert times.double().mean().item() == pytest.approx(499.5, abs=12)
    low = times < int(torch.searchsorted(levels, torch.tensor(0.4 * math.sqrt(4 / 3), dtype=torch.float64)))
    assert bool((records[low] >= 28).all())  # low times are served by the clean records only
    assert (records[~low] < 28).float().mean().item() > 0.8  # the others mostly by the noisy ones


def test_noisy_only_batches_train_only_the_times_their_noise_allows():
    scheduler = RobustDDPMScheduler()
    objective = RobustDiffusionObjective(scheduler, max_weight=4.0)
    sigmas = torch.full((16,), 0.1, dtype=torch.float64)
    out = objective(_zero_model, torch.zeros(16, 1, 8, 8), generator=torch.Generator().manual_seed(0), noise_sigmas=sigmas)
    first = int(torch.searchsorted(scheduler.noise_levels(), torch.tensor(0.2 * math.sqrt(4 / 3), dtype=torch.float64)))
    assert int(out.timesteps.min()) >= first and bool((out.loss > 0).all())


# --- sampling: stop at the trusted level and return the clean estimate there ---

def test_a_pipeline_with_a_sampling_stop_returns_the_clean_estimate_where_it_stops(tmp_path):
    unet = make_tiny_unet()
    scheduler = RobustDDIMScheduler(sampling_stop_sigma=0.1)
    pipe = RobustDDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = RobustDDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.scheduler.config.sampling_stop_sigma == 0.1
    calls = []
    loaded.unet.register_forward_hook(lambda module, args, output: calls.append(int(torch.as_tensor(args[1]).flatten()[0])))
    images = loaded(batch_size=2, num_inference_steps=20, generator=torch.Generator().manual_seed(0), output_type="pt").images

    levels = scheduler.noise_levels()
    scheduler.set_timesteps(20)
    trusted = [int(t) for t in scheduler.timesteps if levels[int(t)] >= 0.2]
    assert calls == trusted and levels[calls[-1]] >= 0.2  # no call below the trusted level
    # The same computed by hand: DDIM down to the last trusted timestep, then its predicted x0.
    sample = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    for t in trusted:
        output = scheduler.step(unet(sample, t).sample, t, sample)
        sample = output.prev_sample
    expected = (output.pred_original_sample / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(images, expected, atol=1e-6)
    # Restoration still works: noise below the trusted level starts from that level.
    restored = loaded(image=images, noise_sigma=0.02, output_type="pt").images
    assert restored.shape == images.shape and torch.isfinite(restored).all()


def test_without_a_stop_generation_is_unchanged():
    unet = make_tiny_unet()
    pipe = RobustDDPMPipeline(unet=unet, scheduler=RobustDDIMScheduler())
    from diffusers import DDIMPipeline, DDIMScheduler

    reference = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    ours = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(1), output_type="np").images
    theirs = reference(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(1), eta=0.0,
                       output_type="np").images
    assert np.array_equal(ours, theirs)


# --- annotations and recipes ---

def test_noise_estimate_reads_the_noise_not_the_digits_edges():
    images = digits(600)
    generator = torch.Generator().manual_seed(0)
    assert estimate_noise_std(images).median().item() < 0.02
    for sigma in (0.1, 0.2, 0.3):
        noisy = images + 2 * sigma * torch.randn(images.shape, generator=generator)
        assert estimate_noise_std(noisy).median().item() == pytest.approx(sigma, rel=0.25)  # edges add a little


@pytest.mark.parametrize("values, message", [
    ((-0.1, 0.0, math.inf), "noise_sigma must be a number >= 0"),
    ((float("nan"), 0.0, math.inf), "noise_sigma must be a number >= 0"),
    ((math.inf, 0.0, math.inf), "noise_sigma must be finite"),
    ((0.0, 0.3, 0.2), "sigma_max 0.2 must exceed"),
])
def test_bad_annotation_values_are_refused_naming_the_record(values, message):
    with pytest.raises(ValueError, match=message):
        check_annotation("folder/7.png", *values)


def _folder_of_digits(root, count: int = 24) -> list[str]:
    import PIL.Image

    os.makedirs(root, exist_ok=True)
    names = []
    for index, image in enumerate(digits(count)):
        name = f"d{index:02d}.png"
        PIL.Image.fromarray(((image[0] + 1) * 127.5).round().byte().numpy(), mode="L").save(os.path.join(root, name))
        names.append(name)
    return names


def test_a_sidecar_next_to_an_image_folder_annotates_its_records(tmp_path):
    names = _folder_of_digits(tmp_path / "data")
    rows = ["file_name,noise_sigma,sigma_min"] + [f"{n},0.1," for n in names[:10]] + [f"{names[10]},,0.3"]
    (tmp_path / "data" / "annotations.csv").write_text("\n".join(rows) + "\n")
    loaded = load_image_dataset(str(tmp_path / "data"), channels=1, resolution=8)
    by_name = dict(zip([os.path.basename(p) for p in [r["record_id"] for r in loaded.dataset]],
                       [r["noise_sigma"] for r in loaded.dataset], strict=True))
    assert [by_name[n] for n in names[:10]] == [0.1] * 10
    assert by_name[names[10]] == pytest.approx(0.3) and by_name[names[11]] == 0.0
    summary = loaded.annotation_summary(4.0)
    assert (summary.clean, summary.noisy, summary.restricted) == (13, 10, 1)
    # sigma_min records carry one fixed noise draw, the same in every epoch.
    index = names.index(names[10])
    record = loaded.dataset[index]
    loaded.set_epoch(5)
    assert np.array_equal(np.asarray(loaded.dataset[index]["pixel_values"]), np.asarray(record["pixel_values"]))
    # JSON sidecars work the same; ignoring them gives clean records.
    (tmp_path / "data" / "annotations.csv").unlink()
    (tmp_path / "data" / "annotations.json").write_text(json.dumps({names[0]: {"noise_sigma": 0.05}}))
    assert load_image_dataset(str(tmp_path / "data"), channels=1, resolution=8).annotation_summary(4.0).noisy == 1
    assert load_image_dataset(str(tmp_path / "data"), channels=1, resolution=8, annotations="ignore").annotations is None


def test_sidecars_that_name_unknown_files_or_leave_records_out_are_refused(tmp_path):
    names = _folder_of_digits(tmp_path / "data", 6)
    (tmp_path / "data" / "annotations.csv").write_text("file_name,noise_sigma\nmissing.png,0.1\n")
    with pytest.raises(ValueError, match=r"match no record.*missing\.png"):
        load_image_dataset(str(tmp_path / "data"), channels=1, resolution=8)
    (tmp_path / "data" / "annotations.csv").write_text(f"file_name,noise_sigma\n{names[0]},0.1\n")
    with pytest.raises(ValueError, match=r"annotations_required: 5 record\(s\)"):
        load_image_dataset(str(tmp_path / "data"), channels=1, resolution=8, annotations_required=True)
    (tmp_path / "data" / "annotations.csv").write_text(f"file_name,noise_level\n{names[0]},0.1\n")
    with pytest.raises(ValueError, match=r"unknown annotation\(s\) \['noise_level'\]"):
        read_sidecar(tmp_path / "data" / "annotations.csv")


def test_imperfect_recipe_is_seeded_keeps_floats_unclipped_and_saves_clipped_pngs(tmp_path):
    images = digits(200)
    recipe = parse_recipe("gaussian_noise:0.2=0.9,clean=0.1")
    first, second = make_imperfect(images, recipe, seed=0), make_imperfect(images, recipe, seed=0)
    assert np.array_equal(first.images, second.images)
    assert (first.groups == 1).sum() == 20
    clean = first.groups == 1
    assert np.allclose(first.images[clean], ((images[clean] + 1) / 2).permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert first.images.min() < -0.2 and first.images.max() > 1.2  # unclipped
    residual = first.images[~clean] - ((images[~clean] + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert residual.std() == pytest.approx(0.2, rel=0.05)
    paths = save_imperfect(first, str(tmp_path / "noisy"), recipe, 0)
    floats = load_image_dataset(paths["float"], channels=1, resolution=8)
    pngs = load_image_dataset(paths["png"], channels=1, resolution=8)
    assert floats.annotation_summary(4.0).noisy == pngs.annotation_summary(4.0).noisy == 180
    record = np.asarray(floats.dataset[0]["pixel_values"])
    assert np.allclose(record, first.images[0].transpose(2, 0, 1) * 2 - 1, atol=1e-6)
    png_values = np.concatenate([np.asarray(r["pixel_values"]).ravel() for r in pngs.dataset])
    assert png_values.min() >= -1 and png_values.max() <= 1
    with pytest.raises(ValueError, match="shares must sum to 1"):
        parse_recipe("gaussian_noise:0.2=0.5")
    with pytest.raises(ValueError, match="severity 1..5"):
        parse_recipe("gaussian_blur:7=1.0")


def test_sigma_min_tables_are_the_measured_figures():
    images = digits()
    assert {s: measure_sigma_min(images, "gaussian_blur", s) for s in range(1, 6)} == BLUR_SIGMA_MIN
    assert {s: measure_sigma_min(images, "jpeg_compression", s) for s in range(1, 6)} == JPEG_SIGMA_MIN


def test_copying_share_finds_copies_and_not_new_images():
    train = digits(300)
    copies = train[:50] + 0.01 * torch.randn(train[:50].shape, generator=torch.Generator().manual_seed(0))
    assert copying_share(copies, train) == 1.0
    assert copying_share(digits()[-100:], train) < 0.2


# --- training end to end ---

_run = functools.partial(run_training_script, check=True)  # a failed run raises, naming its stderr


@pytest.fixture(scope="module")
def noisy_parquet(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("imperfect")
    recipe = parse_recipe("gaussian_noise:0.1=1.0")
    return save_imperfect(make_imperfect(digits(96), recipe, seed=0), str(root / "noisy"), recipe, 0)["float"]


@pytest.mark.slow
def test_training_on_noisy_only_data_saves_the_trusted_level_and_samples_above_it(tiny_preset, tmp_path, noisy_parquet):
    _run(tiny_training_args(tiny_preset, tmp_path / "out", dataset=noisy_parquet, image_column="image",
                            validation_split="null"))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["annotations"]["noisy"] == 96 and metrics["annotations"]["clean"] == 0
    trusted = lowest_usable_sigma(0.1, 0.0, 4.0)
    assert metrics["annotations"]["lowest_trusted_sigma"] == pytest.approx(trusted)
    pipe = RobustDDPMPipeline.from_pretrained(tmp_path / "out")
    assert pipe.scheduler.config.sampling_stop_sigma == pytest.approx(trusted)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    ({"corruptions": ["gaussian_noise"], "corruption_p": 0.5}, "corruption_p is set, but 96 training records"),
    ({"input_perturbation": 0.1}, "input_perturbation is set"),
    ({"noise_sigma": 9.0, "annotations": "null"}, r"no timestep can use it"),
    ({"noise_sigma": -1.0}, "noise_sigma must be >= 0"),
])
def test_options_that_contradict_annotated_data_are_refused_before_the_first_step(tiny_preset, tmp_path, noisy_parquet,
                                                                                   overrides, message):
    assert_refused_before_training(tiny_preset, tmp_path / "out", noisy_parquet, message, **overrides)


@pytest.mark.parametrize("recipe, allowed", [("flip", True), ("edm", False)])
def test_noisy_records_allow_augmentations_that_only_move_pixels(tmp_path, recipe, allowed):
    from accelerate import PartialState

    from diffusers_robust.training.loop import check_annotated_data

    PartialState()  # the loop logs through Accelerate's logger
    rng = np.random.default_rng(0)
    for index in range(4):
        PIL.Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / f"{index}.png")
    (tmp_path / "annotations.csv").write_text("file_name,noise_sigma\n" + "".join(f"{i}.png,0.1\n" for i in range(4)))
    data = load_image_dataset(str(tmp_path), "train", channels=1, resolution=8)
    config = TrainingConfig(dataset=str(tmp_path), augment=os.path.join(REPO_ROOT, "training/configs/augment", f"{recipe}.yaml"))
    scheduler = RobustDDPMScheduler(num_train_timesteps=1000)
    if allowed:
        assert check_annotated_data(config, data, scheduler)["noisy"] == 4
    else:
        with pytest.raises(ValueError, match="augment is set, but 4 training records are noisy"):
            check_annotated_data(config, data, scheduler)


def assert_refused_before_training(preset, output_dir, dataset: str, message: str, **overrides) -> None:
    """A training run on the float parquet `dataset` with `overrides` exits 2 naming `message`, with no traceback, and
    leaves no output folder."""
    result = _run(tiny_training_args(preset, output_dir, dataset=dataset, image_column="image", validation_split="null",
                                     **overrides), check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not os.path.exists(output_dir)


def _state(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True])
def test_a_resumed_run_on_annotated_data_matches_an_uninterrupted_one_bit_for_bit(tiny_preset, tmp_path, streaming):
    root = tmp_path / "data"
    recipe = parse_recipe("gaussian_noise:0.2=0.5,gaussian_blur:3=0.25,clean=0.25")
    source = save_imperfect(make_imperfect(digits(64), recipe, seed=0), str(root), recipe, 0)["png"]
    common = dict(dataset=source, validation_split="null", lr_scheduler="constant", checkpointing_steps=6,
                  checkpoints_total_limit=5, train_batch_size=8, streaming=str(streaming).lower())
    _run(tiny_training_args(tiny_preset, tmp_path / "reference", max_train_steps=12, **common))
    _run(tiny_training_args(tiny_preset, tmp_path / "resumed", max_train_steps=6, **common))
    _run(tiny_training_args(tiny_preset, tmp_path / "resumed", max_train_steps=12, resume_from_checkpoint="latest", **common))
    expected = _state(tmp_path / "reference" / "checkpoints" / "checkpoint-12")
    actual = _state(tmp_path / "resumed" / "checkpoints" / "checkpoint-12")
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    metrics = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert (metrics["annotations"]["noisy"], metrics["annotations"]["restricted"]) == (32, 16)


@pytest.mark.slow
def test_two_processes_stream_an_annotated_dataset(tiny_preset, tmp_path, noisy_parquet):
    from test_distributed import launch_two_processes

    launch_two_processes(tiny_training_args(tiny_preset, tmp_path / "out", dataset=noisy_parquet, image_column="image",
                                            validation_split="null", streaming="true", train_batch_size=8))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["annotations"]["noisy"] == 96
    first, second = metrics["parameter_checksums_per_rank"]
    assert first == second
    assert metrics["scheduler_robust_options"]["sampling_stop_sigma"] == pytest.approx(lowest_usable_sigma(0.1, 0.0, 4.0))


def test_annotations_travel_with_a_stream_split_over_processes(noisy_parquet):
    shards = [load_image_dataset(noisy_parquet, channels=1, resolution=8, streaming=True, rank=r, world_size=2)
              for r in range(2)]
    seen = [[(r["record_id"], r["noise_sigma"]) for r in shard.dataset] for shard in shards]
    ids = [record for shard in seen for record, _ in shard]
    assert len(ids) == len(set(ids)) == 96
    assert all(sigma == pytest.approx(0.1) for shard in seen for _, sigma in shard)


@pytest.mark.slow
def test_annotate_command_writes_the_sidecar_prints_a_histogram_and_keeps_an_existing_one(tmp_path):
    names = _folder_of_digits(tmp_path / "data", 12)
    command = [sys.executable, "-m", "diffusers_robust", "annotate", str(tmp_path / "data"), "--channels", "1"]
    result = subprocess.run(command, env=training_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "estimated noise std of 12 images" in result.stdout and "#" in result.stdout
    assert "read as clean (below 0.027)" in result.stdout
    rows = read_sidecar(tmp_path / "data" / "annotations.csv")
    assert sorted(rows) == sorted(names) and all(0 <= r["noise_sigma"] < 0.2 for r in rows.values())
    again = subprocess.run(command, env=training_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.slow
def test_make_imperfect_command_writes_floats_pngs_and_the_recipe(tmp_path):
    command = [sys.executable, "-m", "diffusers_robust", "make-imperfect", "--recipe", "gaussian_blur:3=0.5,clean=0.5",
               "--output_dir", str(tmp_path / "blurred")]
    result = subprocess.run(command, env=training_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    recipe = json.loads((tmp_path / "blurred" / "recipe.json").read_text())
    assert recipe["records"] == {"gaussian_blur:3": 748, "clean:0": 749}
    assert recipe["sigma_min_measured"] == {"gaussian_blur:3": BLUR_SIGMA_MIN[3]}  # the table was measured on digits
    loaded = load_image_dataset(str(tmp_path / "blurred" / "png"), channels=1, resolution=8)
    assert loaded.annotation_summary(4.0).restricted == 748
    bad = subprocess.run([*command[:-2], "--output_dir", str(tmp_path / "x"), "--recipe", "fog:1=1.0"],
                         env=training_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "recipe corruption must be one of" in bad.stderr


def _smooth_rgb(count: int = 64, size: int = 32) -> torch.Tensor:
    """Smooth colour images in [-1, 1]: low-frequency gradients, as real photo crops mostly are."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(-1, 1)


def test_make_imperfect_measures_sigma_min_on_the_images_it_damages():
    recipe = parse_recipe("gaussian_blur:3=0.5,jpeg_compression:3=0.5")
    smooth = make_imperfect(_smooth_rgb(), recipe, seed=0)
    levels = {recipe[g].corruption: a["sigma_min"] for g, a in zip(smooth.groups, smooth.annotations, strict=True)}
    # On the 8x8 digits blur severity 3 removes enough detail for 0.34; on smooth 32x32 colour images far less.
    assert levels["gaussian_blur"] < 0.1 < BLUR_SIGMA_MIN[3]
    assert levels["gaussian_blur"] == measure_sigma_min(_smooth_rgb(), "gaussian_blur", 3)
    on_digits = make_imperfect(digits(), parse_recipe("gaussian_blur:3=1.0"), seed=0)
    assert {a["sigma_min"] for a in on_digits.annotations} == {BLUR_SIGMA_MIN[3]}


def test_make_imperfect_keeps_the_datas_channels_and_size_by_default(tmp_path, capsys):
    import PIL.Image

    from diffusers_robust.cli import main as cli_main

    pixels = ((_smooth_rgb(12).permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    os.makedirs(tmp_path / "photos")
    for index, image in enumerate(pixels):
        PIL.Image.fromarray(image).save(tmp_path / "photos" / f"crop_{index}.png")
    code = cli_main(["make-imperfect", "--dataset", str(tmp_path / "photos"), "--recipe", "gaussian_noise:0.1=1.0",
                     "--output_dir", str(tmp_path / "noisy")])
    assert code == 0, capsys.readouterr().err
    written = sorted((tmp_path / "noisy" / "png").glob("*.png"))
    assert sorted(p.name for p in written) == sorted(f"crop_{index}.png" for index in range(12))  # was 000000.png on
    with PIL.Image.open(written[0]) as image:
        assert image.mode == "RGB" and image.size == (32, 32)  # was 8x8 grey (the digits' defaults)
    rows = read_sidecar(tmp_path / "noisy" / "png" / "annotations.csv")
    assert sorted(rows) == sorted(p.name for p in written)  # the sidecar names them as they are


@pytest.mark.slow
def test_annotations_auto_trains_on_each_images_estimated_noise_level(tiny_preset, tmp_path):
    recipe = parse_recipe("gaussian_noise:0.2=0.5,clean=0.5")
    data = make_imperfect(digits(64), recipe, seed=0)
    source = save_imperfect(data, str(tmp_path / "data"), recipe, 0)["png"]  # its sidecar holds the true levels
    estimated = np.array(load_image_dataset(source, channels=1, resolution=8, annotations="auto").annotations["noise_sigma"])
    truth = np.array([a.get("noise_sigma", 0.0) for a in data.annotations])
    # The estimates separate the noisy half from the clean one (median 0.11 against 0.0 on 8-bit digits, whose black
    # background clips half the noise away), though not every record (README, "estimated" annotations).
    assert np.median(estimated[truth > 0]) > 0.08 and np.median(estimated[truth == 0]) < 0.02
    result = run_training_script(tiny_training_args(tiny_preset, tmp_path / "out", dataset=source, annotations="auto",
                                                    validation_split="null", max_train_steps=2, validation_steps=100))
    assert result.returncode == 0, result.stderr[-2000:]
    counted = json.loads((tmp_path / "out" / "metrics.json").read_text())["annotations"]
    assert (counted["records"], counted["noisy"]) == (64, int((estimated > 0).sum()))  # the estimates, not the sidecar
    assert counted["levels"] == "levels estimated per image (annotations: auto)"
    assert f"{counted['noisy']} with Gaussian noise (levels estimated per image" in (tmp_path / "out" / "README.md").read_text()
    assert "(levels estimated per image (annotations: auto))" in result.stderr  # the log says it too
