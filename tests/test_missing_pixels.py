"""Learning from images with missing pixels (Ambient Diffusion): masks on records, the further-masked x0 objective, and
pipelines whose UNet sees the pixels through a mask."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_tiny_unet, tiny_training_args
from test_imperfect_data import _run, assert_refused_before_training, digits
from torch.utils.data import DataLoader

from diffusers_robust import RobustDDIMScheduler, RobustDDPMPipeline, RobustDDPMScheduler, RobustDiffusionObjective
from diffusers_robust.data.datasets import collate_image_batch, load_image_dataset
from diffusers_robust.data.imperfect import make_imperfect, parse_recipe, save_imperfect
from diffusers_robust.training.objective import MASKED_SNR_GAMMA, min_snr_weights


def _masked_unet(channels: int = 1, sample_size: int = 8):
    unet = make_tiny_unet(sample_size=sample_size, channels=channels)
    return type(unet).from_config({**unet.config, "in_channels": 2 * channels})


class _Recorder:
    """A model that records its input and returns a fixed prediction."""

    def __init__(self, prediction: torch.Tensor):
        self.prediction, self.inputs = prediction, []

    def __call__(self, sample, timesteps, labels):
        self.inputs.append(sample)
        return self.prediction


def test_the_masked_loss_counts_only_observed_pixels_and_shows_the_model_fewer():
    objective = RobustDiffusionObjective(RobustDDPMScheduler(prediction_type="sample"), further_mask_p=0.25)
    images = digits(64)
    observed = (torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    garbage = torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    perfect = _Recorder(images * observed + garbage * (1 - observed))  # right where observed, anything elsewhere
    out = objective(perfect, images, generator=torch.Generator().manual_seed(0), observed=observed)
    assert torch.equal(out.loss, torch.zeros(64))
    wrong = objective(_Recorder(images + 0.1), images, generator=torch.Generator().manual_seed(0), observed=observed)
    weights = min_snr_weights(objective.scheduler.alphas_cumprod, wrong.timesteps, MASKED_SNR_GAMMA, "sample")
    assert torch.allclose(wrong.loss, 0.01 * weights, rtol=1e-4)  # the mean over observed pixels only, min-SNR weighted
    shown = perfect.inputs[0]
    assert shown.shape == (64, 2, 8, 8)
    seen = shown[:, 1:]
    assert torch.all(seen <= observed) and torch.equal(shown[:, :1] * (1 - seen), torch.zeros_like(seen))
    assert (seen.sum() / observed.sum()).item() == pytest.approx(0.75, abs=0.03)


def test_validation_shows_a_missing_pixel_model_every_pixel():
    objective = RobustDiffusionObjective(RobustDDPMScheduler(prediction_type="sample"), further_mask_p=0.1)
    recorder = _Recorder(torch.zeros(2, 1, 8, 8))
    objective.full_view(recorder)(digits(2), torch.tensor([5, 9]), None)
    assert torch.equal(recorder.inputs[0], torch.cat([digits(2), torch.ones(2, 1, 8, 8)], dim=1))
    plain = RobustDiffusionObjective(RobustDDPMScheduler())
    assert plain.full_view(recorder) is recorder


def test_masked_training_predicts_the_clean_image_and_does_not_corrupt_further():
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        RobustDiffusionObjective(RobustDDPMScheduler(), further_mask_p=0.1)
    with pytest.raises(ValueError, match=r"further_mask_p must be in \[0, 1\)"):
        RobustDiffusionObjective(RobustDDPMScheduler(prediction_type="sample"), further_mask_p=1.0)


def test_a_missing_pixel_recipe_is_seeded_and_saves_masks_with_floats_and_pngs(tmp_path):
    recipe = parse_recipe("missing_pixels:0.5=0.75,clean=0.25")
    data = make_imperfect(digits(40), recipe, seed=0)
    again = make_imperfect(digits(40), recipe, seed=0)
    assert np.array_equal(data.masks, again.masks) and np.array_equal(data.images, again.images)
    incomplete = data.groups == 0
    assert data.masks[~incomplete].all() and abs(data.masks[incomplete].mean() - 0.5) < 0.05
    assert np.all(data.images[..., 0][data.masks == 0] == 0)
    paths = save_imperfect(data, str(tmp_path / "masked"), recipe, 0)
    from_floats = load_image_dataset(paths["float"], image_column="image", channels=1, resolution=8)
    from_pngs = load_image_dataset(paths["png"], channels=1, resolution=8)
    batches = [next(iter(DataLoader(d.dataset, batch_size=40, collate_fn=collate_image_batch))) for d in (from_floats,
                                                                                                          from_pngs)]
    assert torch.equal(batches[0]["observed"][:, 0], torch.from_numpy(data.masks).float())
    assert torch.equal(batches[0]["observed"], batches[1]["observed"])  # PNG records are sorted by file name, like these
    assert from_floats.observed_shares == from_pngs.observed_shares
    assert sum(share < 1 for share in from_floats.observed_shares) == 30
    assert not load_image_dataset(paths["float"], image_column="image", channels=1, resolution=8,
                                  annotations="ignore").masked


@pytest.mark.parametrize("mask, message", [
    (np.ones((4, 4), dtype=np.uint8), r"mask of shape \(4, 4\), expected the training resolution \(8, 8\)"),
    (np.zeros((8, 8), dtype=np.uint8), "its mask has no observed pixel"),
])
def test_bad_masks_are_refused_when_the_data_loads_naming_the_record(tmp_path, mask, message):
    import datasets

    images = list(((digits(6) + 1) / 2).permute(0, 2, 3, 1).numpy())
    masks = [np.ones((8, 8), dtype=np.uint8)] * 6
    masks[4] = mask
    table = datasets.Dataset.from_dict({"image": images, "mask": [m.tolist() for m in masks]},
                                       features=datasets.Features({"image": datasets.Array3D((8, 8, 1), "float32"),
                                                                   "mask": datasets.Sequence(datasets.Sequence(
                                                                       datasets.Value("uint8")))}))
    table.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=rf"bad.parquet/train\[4\]: {message}"):
        load_image_dataset(str(tmp_path / "bad.parquet"), image_column="image", channels=1, resolution=8)


def test_a_sidecar_names_mask_images_next_to_an_image_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, image in enumerate(digits(4)):
        PIL.Image.fromarray(((image[0] + 1) * 127.5).round().byte().numpy(), mode="L").save(folder / f"{index}.png")
    (tmp_path / "holes").mkdir()
    hole = np.full((8, 8), 255, dtype=np.uint8)
    hole[2:6, 2:6] = 0
    PIL.Image.fromarray(hole).save(tmp_path / "holes" / "1.png")
    (folder / "annotations.csv").write_text("file_name,mask\n1.png,../holes/1.png\n")
    loaded = load_image_dataset(str(folder), channels=1, resolution=8)
    assert loaded.observed_shares == [1.0, 0.75, 1.0, 1.0]
    record = loaded.dataset[1]
    assert np.array_equal(np.asarray(record["observed"])[0], hole > 0)
    assert np.all(np.asarray(record["pixel_values"])[0][2:6, 2:6] == 0)


def test_a_missing_pixel_pipeline_samples_through_one_fixed_mask_and_round_trips(tmp_path):
    scheduler = RobustDDIMScheduler(prediction_type="sample", sampling_observed_share=0.4)
    pipe = RobustDDPMPipeline(unet=_masked_unet(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    masks = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: masks.append(args[0][:, 1:].clone()))
    images = pipe(batch_size=3, num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    handle.remove()
    assert pipe.masked_input and images.shape == (3, 1, 8, 8) and len(masks) == 4
    assert all(torch.equal(m, masks[0]) for m in masks)
    assert 0.2 < masks[0].mean().item() < 0.6 and not torch.equal(masks[0][0], masks[0][1])
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = RobustDDPMPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.sampling_observed_share == 0.4
    again = loaded(batch_size=3, num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(images, again)
    restored = loaded(image=images, noise_sigma=0.1, output_type="pt").images
    assert restored.shape == images.shape and torch.isfinite(restored).all()
    from diffusers_robust.evaluation.losses import validation_losses
    from diffusers_robust.evaluation.report import pipeline_denoiser

    losses = validation_losses(pipeline_denoiser(loaded)[0], loaded.scheduler, digits(8), ["gaussian_noise"], (1,))
    assert all(np.isfinite(value) for value in losses.values())  # outside a call, the model sees every pixel
    with pytest.raises(ValueError, match="sampling_observed_share must be in"):
        RobustDDIMScheduler(sampling_observed_share=0.0)


@pytest.fixture(scope="module")
def masked_parquet(tmp_path_factory) -> str:
    recipe = parse_recipe("missing_pixels:0.5=1.0")
    root = tmp_path_factory.mktemp("masked")
    return save_imperfect(make_imperfect(digits(96), recipe, seed=0), str(root / "m50"), recipe, 0)["float"]


@pytest.mark.slow
def test_training_on_masked_records_builds_a_missing_pixel_model_that_loads_and_samples(tiny_preset, tmp_path,
                                                                                        masked_parquet):
    _run(tiny_training_args(tiny_preset, tmp_path / "out", dataset=masked_parquet, image_column="image",
                            validation_split="null", further_mask_p=0.2))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    share = metrics["annotations"]["observed_share"]
    assert metrics["annotations"]["masked"] == 96 and 0.45 < share < 0.55
    assert "Trained on images with missing pixels" in (tmp_path / "out" / "README.md").read_text()
    pipe = RobustDDPMPipeline.from_pretrained(tmp_path / "out")
    assert pipe.unet.config.in_channels == 2 and pipe.scheduler.config.prediction_type == "sample"
    assert pipe.scheduler.config.sampling_observed_share == pytest.approx(share * 0.8)
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 8, 1)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    ({"prediction_type": "epsilon"}, "missing-pixel training predicts the clean image"),
    ({"input_perturbation": 0.1}, "input_perturbation is set, but the training records carry masks"),
])
def test_options_that_contradict_masked_records_are_refused_before_the_first_step(tiny_preset, tmp_path, masked_parquet,
                                                                                   overrides, message):
    assert_refused_before_training(tiny_preset, tmp_path / "out", masked_parquet, message, **overrides)


def test_a_missing_pixel_pipeline_restores_photo_sized_images_through_its_mask_in_one_pass():
    """From 16x16 up restoration averages 8 turned views, but a missing-pixel model's fixed mask does not turn with
    them: it keeps one pass, with a mask drawn at the image's size (it used to be drawn at the model's sample size, so
    any other size failed). As it predicts the clean image, two probe passes of `sure_shrinkage` follow (384 values
    per image), through the same mask."""
    scheduler = RobustDDIMScheduler(prediction_type="sample", sampling_observed_share=0.5)
    pipe = RobustDDPMPipeline(unet=_masked_unet(sample_size=16), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    shapes = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    image = torch.rand(2, 1, 16, 24, generator=torch.Generator().manual_seed(0))
    restored = pipe(image=image, noise_sigma=0.1, output_type="pt", generator=torch.Generator().manual_seed(1)).images
    handle.remove()
    assert restored.shape == (2, 1, 16, 24) and shapes == [(2, 2, 16, 24)] * 3
