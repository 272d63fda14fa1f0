import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_tiny_unet
from sklearn.datasets import load_digits

from diffusers_robust import RobustDDPMScheduler
from diffusers_robust.evaluation.digits import digits_classifier, digits_quality
from diffusers_robust.evaluation.images import make_grid
from diffusers_robust.evaluation.losses import validation_losses
from diffusers_robust.models import LabelConditionedUNet


def test_digits_quality_tells_real_digits_from_noise():
    classifier = digits_classifier()
    real = (load_digits().images[:256] / 16.0)[..., None]
    upsampled = np.repeat(np.repeat(real, 2, axis=1), 2, axis=2)  # 16x16, area-resized back to 8x8 inside
    noise = np.random.default_rng(0).uniform(0, 1, (256, 8, 8, 1))
    assert digits_quality(upsampled, classifier=classifier)["confident_fraction"] > 0.95
    assert digits_quality(real, classifier=classifier)["classes_present"] == 10
    assert digits_quality(noise, classifier=classifier)["confident_fraction"] < 0.05


def test_validation_losses_are_seeded_and_cover_each_corruption_and_severity():
    model = LabelConditionedUNet(make_tiny_unet(), label_dim=0)
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scheduler = RobustDDPMScheduler()
    first = validation_losses(model, scheduler, images, ["gaussian_noise", "masking"], (1, 5))
    again = validation_losses(model, scheduler, images, ["gaussian_noise", "masking"], (1, 5))
    assert first == again
    cases = {"gaussian_noise/s1", "gaussian_noise/s5", "masking/s1", "masking/s5"}
    assert set(first) == {"clean"} | cases | {f"restore/{case}" for case in cases}
    assert len(set(first.values())) == 9


def test_make_grid_tiles_images_in_a_square():
    grid = make_grid(np.ones((5, 8, 8, 1)) * 0.5, min_size=1)
    assert grid.size == (24, 16)
    assert np.asarray(grid)[..., 0].max() == 128 and np.asarray(grid)[8:, 16:].max() == 0  # the blank cell


def test_report_grids_keep_grey_gaps_and_at_least_four_screen_pixels_per_pixel():
    grid = np.asarray(make_grid(np.ones((3, 8, 8, 1)), columns=2, min_size=1, gap=2, min_scale=4))
    assert grid.shape == (2 * 32 + 2, 2 * 32 + 2)  # 8 px x 4, a 2 px gap between cells
    assert (grid[:32, 32:34] == 128).all() and (grid[:32, :32] == 255).all() and (grid[34:, 34:] == 0).all()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_caption_band_is_white_with_dark_text_above_the_grid(mode):
    from diffusers_robust.evaluation.images import add_caption

    picture = PIL.Image.new(mode, (64, 32), "black")
    captioned = np.asarray(add_caption(picture, "4 samples").convert("RGB"))
    assert captioned.shape == (50, 64, 3) and (captioned[18:] == 0).all()
    band = captioned[:18]
    assert (band == 255).mean() > 0.8 and (band.max(axis=-1) < 128).any()  # white, with dark text, in any mode


def test_make_grid_enlarges_small_images_by_whole_pixels_to_at_least_256_pixels():
    images = np.random.default_rng(0).random((4, 8, 8, 1))
    grid = np.asarray(make_grid(images))  # 2 x 2 cells of 8 px: each pixel becomes a 16 x 16 square
    assert grid.shape[:2] == (256, 256)
    first = grid[:128, :128, 0] if grid.ndim == 3 else grid[:128, :128]
    assert (first == np.kron(first[::16, ::16], np.ones((16, 16), dtype=first.dtype))).all()
    assert first[::16, ::16].tolist() == (images[0, ..., 0] * 255).round().astype(np.uint8).tolist()


def test_frechet_distance_of_a_shifted_gaussian_is_the_squared_shift():
    from diffusers_robust.evaluation.metrics import frechet_distance, kernel_inception_distance

    features = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0))
    shifted = features + torch.tensor([0.5, 0.0, 0.0])
    assert abs(frechet_distance(features, shifted) - 0.25) < 1e-6  # same covariance: |mu_a - mu_b|^2
    other = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1))
    assert frechet_distance(features, other) < 0.01
    assert abs(kernel_inception_distance(features, other, subsets=5, subset_size=500)) < 0.01
    assert kernel_inception_distance(features, shifted * 2, subsets=5, subset_size=500) > 0.1


def test_psnr_ssim_median_filter_and_nearest_neighbours_on_known_cases():
    from diffusers_robust.evaluation.metrics import mean_psnr, median_filter, nearest_neighbour_distance, psnr, ssim

    clean = torch.zeros(2, 1, 8, 8)
    off = clean + 0.2  # 0.1 in [0, 1] units: PSNR 20 dB
    assert abs(mean_psnr(off, clean) - 20.0) < 1e-4 and torch.allclose(psnr(off, clean), torch.tensor([20.0, 20.0]))
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.allclose(ssim(image, image), torch.ones(2)) and float(ssim(image, -image).max()) < 0.5
    spiky = clean.clone()
    spiky[0, 0, 4, 4] = 1.0
    assert torch.equal(median_filter(spiky), clean)
    distance = nearest_neighbour_distance(torch.stack([clean[0], off[0]]), clean)
    assert torch.allclose(distance, torch.tensor([0.0, 0.1]), atol=1e-6)


def test_digits_classifier_never_saw_the_held_out_split():
    from diffusers_robust.data.datasets import load_digits_dataset

    classifier = digits_classifier()
    assert classifier.svm.shape_fit_[0] == len(load_digits_dataset()["train"]) == 1497


@pytest.mark.parametrize("cases", [8, 21])
def test_restoration_png_keeps_the_chart_whole_and_examples_at_four_or_more_screen_pixels_per_pixel(tmp_path, cases):
    from diffusers_robust.evaluation.report import _psnr_chart, plot_restoration

    rows = [{"case": f"case_{i}/s3", "psnr_input": 20.0, "psnr_baseline": 22.0, "psnr": 25.0} for i in range(cases)]
    examples = {rows[0]["case"]: torch.rand(3, 6, 1, 8, 8) * 2 - 1, rows[1]["case"]: torch.rand(3, 6, 3, 32, 32) * 2 - 1}
    plot_restoration(rows, str(tmp_path / "restoration.png"), examples, "Evaluation")
    picture = PIL.Image.open(tmp_path / "restoration.png")
    chart = _psnr_chart(rows, "Evaluation")
    # The chart sits on top as matplotlib drew it (4.8 in at 100 dpi), not squeezed by the example rows below it.
    assert chart.height == 480
    assert np.array_equal(np.asarray(picture.convert("RGB"))[:chart.height, :chart.width], np.asarray(chart))
    # Below the chart, two captioned rows of 4 images x 3 views: 8 px digits at >= 4 screen px, 32 px crops at 4.
    assert picture.height >= chart.height + 8 * 4 + 32 * 4 + 2 * 8
    assert picture.width >= 4 * (3 * 32 * 4)


def test_memorisation_reads_copies_of_training_images_as_closer_to_train_and_real_images_as_meaningful():
    from diffusers_robust.evaluation.metrics import Memorisation, Reference

    pixels = torch.from_numpy(load_digits().images.astype(np.float32))[:, None] / 8 - 1  # (1797, 1, 8, 8), 0..16 -> [-1, 1]
    train, held_out = pixels[:300], pixels[1200:1500]  # as many train as held-out images: the subset is all of them
    copies = (train + 0.01 * torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    copied = Memorisation(seed=0).compute(copies, Reference(held_out, train_images=train))["memorisation"]
    fresh = Memorisation(seed=0).compute(pixels[1500:], Reference(held_out, train_images=train))["memorisation"]
    assert copied["meaningful"] is True and fresh["meaningful"] is True  # both are images of the data
    assert copied["median_distance_to_train"] < 0.5 * fresh["median_distance_to_train"]
    assert copied["share_closer_to_train"] > fresh["share_closer_to_train"]
    # Calibrated on known answers: copies read all nearer than held-out images come, unseen digits about the quantile.
    assert copied["share_nearer_than_held_out"] == 1.0 and fresh["share_nearer_than_held_out"] < 0.1
    assert copied["distance_ratio_to_held_out"] < 0.3 and 0.8 < fresh["distance_ratio_to_held_out"] < 1.25


def test_precision_recall_density_and_coverage_tell_a_faithful_set_from_a_collapsed_and_a_far_one():
    from diffusers_robust.evaluation.metrics import manifold_figures

    real = torch.randn(300, 10, generator=torch.Generator().manual_seed(0))
    same = manifold_figures(torch.randn(512, 10, generator=torch.Generator().manual_seed(1)), real)
    assert min(same["precision"], same["recall"], same["coverage"]) > 0.85 and 0.8 < same["density"] < 1.2
    jitter = 1e-4 * torch.randn(512, 10, generator=torch.Generator().manual_seed(2))
    collapsed = manifold_figures(real[torch.arange(512) % 5] + jitter, real)  # five real points, each repeated
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.05 and collapsed["coverage"] < 0.2
    far = manifold_figures(torch.randn(512, 10, generator=torch.Generator().manual_seed(3)) + 100, real)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(ValueError, match="more than k=5 points"):
        manifold_figures(real[:5], real)


def test_clean_sample_figures_read_real_digits_as_clean_and_covering_and_tell_noise_and_collapse():
    """Real digits as samples: background noise near 0 and coverage over 0.8 (200 samples, 300 held out); the same with
    noise of std 0.2: background noise over 0.1 (the Haar estimate of clean samples reads about 0.02 on every model);
    512 copies of 20 digits: each reads as a digit (precision) but covers a third of the held-out digits at most."""
    from diffusers_robust.evaluation.digits import clean_sample_figures

    pixels = torch.from_numpy(load_digits().images.astype(np.float32))[:, None] / 8 - 1
    train, held_out, samples = pixels[:1000], pixels[1200:1500], pixels[1000:1200]
    classifier = digits_classifier()
    real = clean_sample_figures(samples, train, held_out, classifier)
    assert real["background_noise"] < 0.01 and real["coverage"] > 0.8 and real["precision"] > 0.9
    noisy = (samples + 0.4 * torch.randn(samples.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert clean_sample_figures(noisy, train, held_out, classifier)["background_noise"] > 0.1
    collapsed = clean_sample_figures(samples[torch.arange(512) % 20], train, held_out, classifier)
    assert collapsed["precision"] > 0.9 and collapsed["coverage"] < 0.35 and collapsed["recall"] < 0.05


def test_a_report_on_noisy_held_out_images_says_its_figures_compare_with_noisy_images():
    """Training on noisy data holds out noisy images: the report must not read as if its references were clean."""
    from diffusers_robust.data.photos import photo_tiles
    from diffusers_robust.evaluation.report import held_out_noise, held_out_noise_warning

    tiles = torch.tensor(photo_tiles(32, "test")[0][:32] / 127.5 - 1, dtype=torch.float32).permute(0, 3, 1, 2)
    noisy = torch.round(((tiles + 0.2 * torch.randn(tiles.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
                         + 1) * 127.5) / 127.5 - 1
    clean_reading, noisy_reading = held_out_noise(tiles), held_out_noise(noisy)
    assert clean_reading["noisy_share"] < 0.1 and held_out_noise_warning({"held_out_noise": clean_reading}) == []
    assert noisy_reading["noisy_share"] == 1.0 and 0.07 < noisy_reading["median_noise_std"] < 0.13
    assert "are noisy themselves:** 100% read as noisy" in held_out_noise_warning({"held_out_noise": noisy_reading})[0]


def test_the_progress_bar_weighs_each_case_by_the_denoiser_calls_its_method_takes_at_that_size():
    from diffusers_robust.evaluation.restoration import case_cost

    assert case_cost("impulse_noise", 3, 10) == 10 * 101  # RePaint on 8x8 digits
    assert case_cost("gaussian_blur", 3, 10) == 10 * 51  # DDNM
    # From 16x16 up: 5 steps of 8 views (`dihedral_average`) for inpainting and a Gaussian blur, 8 views for noise.
    assert case_cost("impulse_noise", 3, 10, size=(32, 32)) == case_cost("gaussian_blur", 3, 10, size=(32, 32)) == 10 * 41
    assert case_cost("pixelate", 3, 10, size=(32, 32)) == 10 * 51  # DDNM, one view
    assert case_cost("pixelate", 3, 10, size=(72, 72)) == case_cost("gaussian_noise", 3, 10, size=(32, 32)) == 10 * 9
    assert case_cost("gaussian_noise", 3, 10) == 10 * 2  # noise-matched, one view on the digits


def test_evaluate_refuses_too_few_images_for_the_neighbourhood_figures_before_any_work(tmp_path):
    from conftest import make_tiny_unet

    from diffusers_robust import RobustDDPMPipeline
    from diffusers_robust.evaluation.report import evaluate_pipeline

    pipeline = RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=RobustDDPMScheduler(num_train_timesteps=20))
    with pytest.raises(ValueError, match="need at least 6 held-out images and samples, got 8 and 4"):
        evaluate_pipeline(pipeline, "digits", num_images=8, num_samples=4, progress=False)
