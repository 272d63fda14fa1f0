"""Restoration paths against known answers: an exact denoiser for Gaussian data, inpainting, data consistency."""

import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler
from diffusers_robust.data.corruptions import apply_corruption, contrast, gaussian_blur, gaussian_noise, impulse_noise
from diffusers_robust.evaluation.metrics import mean_psnr, psnr
from diffusers_robust.pipelines.restoration import (
    added_blur_sigma,
    detect_missing_pixels,
    estimate_noise_sigma,
    gaussian_blur_matrix,
    missing_pixel_mask,
    noise_matched_timestep,
    noise_to_signal,
    operator_matrix,
    plan_restoration,
    separable_consistency,
)

PRIOR_MEAN, PRIOR_STD = 0.1, 0.3  # model units: every pixel of the data set is N(0.1, 0.3^2), independently


class ExactGaussianDenoiser(ModelMixin, ConfigMixin):
    """The exact MMSE noise predictor for data whose pixels are i.i.d. N(PRIOR_MEAN, PRIOR_STD^2)."""

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 1):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device and dtype
        self.alphas_cumprod = RobustDDPMScheduler().alphas_cumprod

    def forward(self, sample: torch.Tensor, timestep) -> UNet2DOutput:
        t = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0])
        alpha = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(sample.dtype)
        gain = alpha.sqrt() * PRIOR_STD**2 / (alpha * PRIOR_STD**2 + 1 - alpha)
        clean = PRIOR_MEAN + gain * (sample - alpha.sqrt() * PRIOR_MEAN)
        return UNet2DOutput(sample=(sample - alpha.sqrt() * clean) / (1 - alpha).sqrt())


class ExactGaussianVelocity(ExactGaussianDenoiser):
    """The same exact denoiser, answering in `v = sqrt(a) eps - sqrt(1 - a) x0` (prediction_type v_prediction)."""

    def forward(self, sample: torch.Tensor, timestep) -> UNet2DOutput:
        eps = super().forward(sample, timestep).sample
        t = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0])
        alpha = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(sample.dtype)
        clean = (sample - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        return UNet2DOutput(sample=alpha.sqrt() * eps - (1 - alpha).sqrt() * clean)


@pytest.fixture(scope="module")
def exact_pipeline() -> RobustDDPMPipeline:
    return RobustDDPMPipeline(unet=ExactGaussianDenoiser(), scheduler=RobustDDPMScheduler())


def _unit(model_units: torch.Tensor) -> torch.Tensor:
    return (model_units + 1) / 2


def test_noise_matched_restoration_is_the_analytic_posterior_mean(exact_pipeline):
    observed = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8  # model units
    sigma = 0.1  # [0, 1] units: 0.2 in model units
    restored = exact_pipeline(image=_unit(observed), noise_sigma=sigma, output_type="pt").images * 2 - 1
    t = int(noise_matched_timestep(exact_pipeline.scheduler.alphas_cumprod, sigma))
    level = float(noise_to_signal(exact_pipeline.scheduler.alphas_cumprod)[t])
    assert abs(level - 2 * sigma) < 0.005  # the matched timestep has the input's noise level
    expected = PRIOR_MEAN + PRIOR_STD**2 / (PRIOR_STD**2 + level**2) * (observed - PRIOR_MEAN)
    torch.testing.assert_close(restored, expected, atol=1e-4, rtol=0)


def test_restoration_is_the_same_for_a_v_prediction_model(exact_pipeline):
    velocity = RobustDDPMPipeline(unet=ExactGaussianVelocity(), scheduler=RobustDDPMScheduler(prediction_type="v_prediction"))
    observed = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    for kwargs in (dict(noise_sigma=0.1), dict(noise_sigma=0.2, restoration_steps=4), dict(corruption="contrast", severity=3)):
        expected = exact_pipeline(image=observed, output_type="pt", **kwargs).images
        torch.testing.assert_close(velocity(image=observed, output_type="pt", **kwargs).images, expected, atol=1e-4, rtol=0)


def test_gaussian_severity_uses_the_table_sigma(exact_pipeline):
    """(`corruption="auto"` is tested under a prior that knows the answer in test_detection.py.)"""
    observed = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    by_severity = exact_pipeline(image=observed, corruption="gaussian_noise", severity=5, output_type="pt").images
    by_sigma = exact_pipeline(image=observed, noise_sigma=0.10, output_type="pt").images
    torch.testing.assert_close(by_severity, by_sigma)


def test_deterministic_steps_from_the_matched_start_are_reproducible_and_differ_from_one_step(exact_pipeline):
    observed = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    one = exact_pipeline(image=observed, noise_sigma=0.2, output_type="pt").images
    five = exact_pipeline(image=observed, noise_sigma=0.2, restoration_steps=5, output_type="pt").images
    again = exact_pipeline(image=observed, noise_sigma=0.2, restoration_steps=5, output_type="pt").images
    assert torch.equal(five, again)
    assert (five - one).abs().max() > 1e-3


def test_noise_estimate_follows_the_true_sigma():
    flat = torch.zeros(64, 1, 32, 32)
    for sigma in (0.05, 0.1, 0.2):
        noisy = flat + 2 * sigma * torch.randn(flat.shape, generator=torch.Generator().manual_seed(3))
        estimate = estimate_noise_sigma(noisy).median()
        assert abs(float(estimate) - sigma) < 0.1 * sigma


def test_inpainting_keeps_known_pixels_exactly_and_samples_the_prior_where_missing(exact_pipeline):
    image = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(64, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    generators = [torch.Generator().manual_seed(i) for i in range(64)]
    out = exact_pipeline(image=image, mask=mask, generator=generators, restoration_steps=20, output_type="pt").images
    known = mask == 0
    assert torch.equal(out[known], image[known])
    filled = out[~known] * 2 - 1  # independent pixels: the missing ones are draws from the prior
    assert abs(float(filled.mean()) - PRIOR_MEAN) < 0.05
    assert abs(float(filled.std()) - PRIOR_STD) < 0.05


def test_inpainting_one_image_equals_the_same_item_of_a_batch_with_per_image_generators(exact_pipeline):
    image = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    mask = torch.zeros(3, 1, 8, 8)
    mask[..., :4, :4] = 1
    batch = exact_pipeline(image=image, mask=mask, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)],
                           restoration_steps=20, output_type="pt").images
    single = exact_pipeline(image=image[1:2], mask=mask[1:2], generator=[torch.Generator().manual_seed(2)],
                            restoration_steps=20, output_type="pt").images
    torch.testing.assert_close(single[0], batch[1], atol=1e-5, rtol=0)


def test_impulse_detection_flags_outliers_but_not_pixels_the_reference_agrees_with():
    clean = torch.full((1, 1, 8, 8), -1.0)
    clean[..., 3:5, 3:5] = 1.0  # a white square: extreme values that are not noise
    damaged = clean.clone()
    damaged[..., 0, 0] = 1.0  # salt on black
    damaged[..., 3, 3] = -1.0  # pepper on white
    missing = detect_missing_pixels(damaged, clean, "impulse_noise")
    assert missing.shape == (1, 1, 8, 8)
    assert missing.sum() == 2 and missing[0, 0, 0, 0] and missing[0, 0, 3, 3]


def test_linear_corruption_is_undone_by_data_consistency(exact_pipeline):
    clean = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 1.2 - 0.6
    damaged = contrast(clean, 0.4)  # contrast severity 3: invertible
    out = exact_pipeline(image=_unit(damaged), corruption="contrast", severity=3, output_type="pt").images * 2 - 1
    assert float(psnr(out, clean).min()) > 40
    matrix = operator_matrix("contrast", 3, 8, 8)
    assert torch.allclose(matrix @ _unit(clean[0]).flatten(), _unit(damaged[0]).flatten(), atol=1e-5)


def test_operator_matrix_of_a_blur_matches_the_blur():
    image = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1
    blurred = apply_corruption(image, "gaussian_blur", 5)
    matrix = operator_matrix("gaussian_blur", 5, 8, 8)
    assert torch.allclose(matrix @ _unit(image).flatten(), _unit(blurred).flatten(), atol=1e-5)


def test_a_blur_given_in_pixels_is_undone_at_any_size_by_its_separable_operator(exact_pipeline):
    clean = torch.rand(3, 1, 16, 24, generator=torch.Generator().manual_seed(5)) * 1.2 - 0.6
    blurred = gaussian_blur(clean, 0.7)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    out = exact_pipeline(image=_unit(blurred), blur_sigma=0.7, generator=generators, output_type="pt").images * 2 - 1
    assert out.shape == clean.shape
    assert bool((psnr(out, clean) > psnr(blurred, clean) + 2).all())  # white-noise images: much of them is erased
    # Deterministic: the deconvolved input refined without fresh noise, whatever the generators.
    again = exact_pipeline(image=_unit(blurred), blur_sigma=0.7, output_type="pt").images * 2 - 1
    assert torch.allclose(again, out, atol=1e-5)
    rows, columns = gaussian_blur_matrix(16, 0.7), gaussian_blur_matrix(24, 0.7)
    assert torch.allclose(rows.float() @ _unit(clean[0, 0]) @ columns.float().T, _unit(blurred[0, 0]), atol=1e-5)


def test_the_separable_projection_keeps_what_the_blur_kept_and_leaves_the_rest():
    clean = torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(1)) * 2 - 1
    blurred = gaussian_blur(clean, 2.0)
    rows, columns = gaussian_blur_matrix(12, 2.0).float(), gaussian_blur_matrix(20, 2.0).float()
    project = separable_consistency(blurred, rows, columns, relative_cutoff=0.1)
    start = torch.zeros_like(clean)
    projected = project(start)
    # Re-blurred, the projection reproduces the input where the blur kept at least 10% of a frequency; the erased ones
    # are not amplified from zero.
    reblurred = rows @ _unit(projected) @ columns.T
    assert float((reblurred - _unit(blurred)).abs().max()) < 0.1
    assert float((project(projected) - projected).abs().max()) < 1e-4  # a projection: applying it twice changes nothing
    assert float(_unit(projected).abs().max()) < 3


def test_the_added_blur_is_estimated_on_held_out_photos_within_a_third_of_a_pixel():
    import PIL.Image
    import PIL.ImageFilter

    from diffusers_robust.data.photos import photo_tiles

    tiles, _ = photo_tiles(64, "test")
    for sigma in (1.0, 2.0):  # PIL's blur, not ours
        blurred = np.stack([np.asarray(PIL.Image.fromarray(t).filter(PIL.ImageFilter.GaussianBlur(sigma))) for t in tiles])
        images = torch.tensor(blurred, dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1
        assert abs(float(added_blur_sigma(images).median()) - sigma) < 1 / 3


def test_impulse_noise_is_detected_and_inpainted_on_an_image_the_prior_explains(exact_pipeline):
    clean = torch.full((8, 1, 8, 8), PRIOR_MEAN)
    damaged = impulse_noise(clean, 0.1, generator=torch.Generator().manual_seed(7))
    generators = [torch.Generator().manual_seed(i) for i in range(8)]
    out = exact_pipeline(image=_unit(damaged), corruption="salt_and_pepper", generator=generators,
                         restoration_steps=20, output_type="pt").images * 2 - 1
    assert float(psnr(out, clean).mean()) > float(psnr(damaged, clean).mean()) + 3
    untouched = damaged == clean
    assert torch.allclose(out[untouched], clean[untouched], atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(strength=0.3, noise_sigma=0.1), "strength .* cannot be combined with noise_sigma"),
    (dict(corruption="gaussian_noise"), "needs severity"),
    (dict(corruption="contrast"), "needs severity"),
    (dict(blur_sigma=0.0), r"blur_sigma must be a Gaussian blur std in pixels in \(0, 3.0\]"),
    (dict(blur_sigma=4.0), "blur_sigma must be"),
    (dict(blur_sigma=1.0, corruption="gaussian_blur", severity=2), "do not combine it with severity"),
    (dict(blur_sigma=1.0, corruption="jpeg"), "do not combine it with corruption 'jpeg'"),
    (dict(corruption="auto", severity=2), "severity needs a corruption name"),
    (dict(severity=2), "severity needs a corruption name"),
    (dict(noise_sigma=1.5), r"noise_sigma must be a number in \[0, 1\]"),
    (dict(noise_sigma=float("nan")), "noise_sigma"),
    (dict(noise_sigma=0.1, corruption="jpeg"), "noise_sigma describes Gaussian noise"),
    (dict(noise_sigma=0.1, severity=2, corruption="gaussian_noise"), "not both"),
    (dict(mask=np.zeros((8, 8)), corruption="gaussian_blur"), "does not fit"),
    (dict(corruption="fog", severity=1), "unknown corruption 'fog'"),
    (dict(corruption="impulse_noise", severity=6), "severity must be an integer from 1 to 5"),
    (dict(strength=0.0), "strength"),
    (dict(strength=True), "strength"),
])
def test_bad_restoration_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_restoration(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(noise_sigma=0.1), "need an image"),
    (dict(image=torch.full((1, 1, 8, 8), float("nan")), noise_sigma=0.1), "NaN"),
    (dict(image=torch.zeros(0, 1, 8, 8), noise_sigma=0.1), "non-empty"),
    (dict(image=torch.zeros(1, 1, 8, 8), mask=torch.zeros(1, 1, 4, 4)), r"mask must have shape \(1, 1, 8, 8\)"),
    (dict(image=torch.zeros(1, 1, 8, 8), noise_sigma=0.1, restoration_steps=2.5), "restoration_steps"),
    (dict(batch_size=2.5), "batch_size"),
    (dict(batch_size=True), "batch_size"),
])
def test_bad_pipeline_restoration_input_raises_value_error(exact_pipeline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        exact_pipeline(num_inference_steps=2, **kwargs)


def test_gaussian_noise_helper_and_matched_timestep_agree_on_units():
    # sigma 0.1 in [0, 1] units is 0.2 in model units: the matched level must be 0.2, not 0.1.
    t = noise_matched_timestep(RobustDDPMScheduler().alphas_cumprod, 0.1)
    assert abs(float(noise_to_signal(RobustDDPMScheduler().alphas_cumprod)[t]) - 0.2) < 0.005
    noisy = gaussian_noise(torch.zeros(1, 1, 64, 64), 0.1, generator=torch.Generator().manual_seed(0))
    assert abs(float(noisy.std()) - 0.2) < 0.02


def test_a_linear_corruption_above_the_operator_size_is_restored_as_noise_said_and_labelled_so(caplog):
    from conftest import make_tiny_unet

    from diffusers_robust.evaluation.restoration import evaluate_restoration

    pipe = RobustDDPMPipeline(unet=make_tiny_unet(sample_size=72, channels=1), scheduler=RobustDDPMScheduler(100))
    pipe.set_progress_bar_config(disable=True)
    images = torch.rand(2, 1, 72, 72, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with caplog.at_level("WARNING"):
        rows = evaluate_restoration(pipe, images, cases=[("pixelate", 3), ("gaussian_blur", 3)], progress=False)
    assert rows[0]["method"] == "noise" and rows[0]["caveat"] is None  # not labelled "linear" with its caveat
    assert "72x72 pixels exceed the 4096 pixels" in caplog.text
    assert rows[1]["method"] == "linear"  # a Gaussian blur is undone separably at any size


def test_a_named_blur_severity_on_larger_images_is_undone_as_blur_sigma_with_the_tables_std(exact_pipeline):
    """From 16x16 up, `corruption="gaussian_blur", severity=K` is `blur_sigma` with the table's std (on held-out photos it
    beat DDNM, which fell below the input at severity 5); on 8x8 images DDNM stays."""
    from diffusers_robust.data.corruptions import corruption_parameter

    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    named = exact_pipeline(image=images, corruption="gaussian_blur", severity=5, output_type="pt").images
    given = exact_pipeline(image=images, blur_sigma=corruption_parameter("gaussian_blur", 5), output_type="pt").images
    assert torch.equal(named, given)
    small = images[:, :, :8, :8]
    generator = torch.Generator().manual_seed(0)
    assert not torch.equal(exact_pipeline(image=small, corruption="gaussian_blur", severity=5, generator=generator,
                                          output_type="pt").images,
                           exact_pipeline(image=small, blur_sigma=1.0, output_type="pt").images)


def test_a_large_black_hole_in_a_colour_image_is_marked_missing_whole():
    """A prior whose smoothed estimate darkens over a large hole vouches for it (here: one that believes the damaged
    image); on colour images a pixel black in every channel is what masking leaves, so the whole box is marked."""
    clean = torch.full((2, 3, 8, 8), PRIOR_MEAN)
    damaged = clean.clone()
    damaged[:, :, 1:6, 2:7] = -1.0  # a 5x5 black box
    assert not detect_missing_pixels(damaged, damaged, "masking").any()
    missing = missing_pixel_mask(damaged, damaged, "masking")
    assert missing[:, 0, 1:6, 2:7].all() and int(missing.sum()) == 2 * 25
    grey = damaged[:, :1]  # grey images keep the prior's judgement: black is their background
    assert not missing_pixel_mask(grey, grey, "masking").any()


def test_from_16x16_up_missing_pixels_are_filled_by_biharmonic_inpainting_and_known_ones_kept(exact_pipeline):
    """Smooth images with half their pixels lost: the fill recovers them (RePaint, sampling them from a prior, cannot
    know a smooth image's values; on held-out photos the fill won by far: README, "Photos")."""
    rows = torch.linspace(-0.5, 0.5, 16).view(1, 1, 16, 1)
    clean = (rows + rows.transpose(-1, -2)).expand(2, 1, 16, 16).clone() * 0.8
    missing = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    damaged = torch.where(missing, torch.full_like(clean, -1.0), clean)
    out = exact_pipeline(image=_unit(damaged), mask=missing.float(), output_type="pt").images * 2 - 1
    kept = ~missing.expand_as(out)
    assert torch.allclose(out[kept], clean[kept], atol=1e-6)
    assert float(psnr(out, clean).min()) > 30 and float(psnr(damaged, clean).max()) < 15


def test_a_model_trained_on_noisy_data_tops_lighter_noise_up_to_its_trusted_level():
    """Below `sampling_stop_sigma` the model was never trained: fresh noise brings the input up to that level (seeded by
    the generator), and the average of the draws is about the posterior mean there; at or above it nothing is added."""
    stop = 0.1  # [0, 1] units
    pipe = RobustDDPMPipeline(unet=ExactGaussianDenoiser(), scheduler=RobustDDPMScheduler(sampling_stop_sigma=stop))
    observed = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))

    def restore(sigma: float, seed: int) -> torch.Tensor:
        return pipe(image=observed, noise_sigma=sigma, generator=torch.Generator().manual_seed(seed), output_type="pt").images

    assert torch.equal(restore(0.03, 0), restore(0.03, 0)) and not torch.equal(restore(0.03, 0), restore(0.03, 1))
    alphas = pipe.scheduler.alphas_cumprod
    levels = noise_to_signal(alphas)
    level = float(levels[int((levels >= 2 * stop).nonzero()[0])])  # model units
    expected = PRIOR_MEAN + PRIOR_STD**2 / (PRIOR_STD**2 + level**2) * (observed * 2 - 1 - PRIOR_MEAN)
    top_up = (level**2 - 0.06**2) ** 0.5
    gain = PRIOR_STD**2 / (PRIOR_STD**2 + level**2)
    error = (restore(0.03, 0) * 2 - 1 - expected).abs()
    assert float(error.max()) < 4 * gain * top_up / 2 and float(error.mean()) < gain * top_up / 2  # 4 draws averaged
    assert torch.equal(restore(0.15, 0), restore(0.15, 1))  # at or above the trusted level: no fresh noise


def test_the_dihedral_average_keeps_an_equivariant_denoiser_and_makes_any_denoiser_equivariant():
    from diffusers_robust.pipelines.restoration import dihedral_average

    sample = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))  # not square
    t = torch.tensor([5, 7])

    def smoothing(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:  # symmetric kernel: equivariant
        return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1) * timesteps.view(-1, 1, 1, 1)

    def shifting(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:  # a shift to the right: not equivariant
        return torch.roll(x, 1, dims=3) * timesteps.view(-1, 1, 1, 1)

    assert torch.allclose(dihedral_average(smoothing)(sample, t), smoothing(sample, t), atol=1e-6)
    averaged = dihedral_average(shifting)
    out = averaged(sample, t)
    assert out.shape == sample.shape and not torch.allclose(out, shifting(sample, t), atol=0.1)
    for turns in (1, 2, 3):
        assert torch.allclose(averaged(torch.rot90(sample, turns, (2, 3)), t), torch.rot90(out, turns, (2, 3)), atol=1e-6)
    assert torch.allclose(averaged(sample.flip(2), t), out.flip(2), atol=1e-6)


def test_reflect_padding_mirrors_the_border_fits_the_unet_multiple_and_crops_back():
    from diffusers_robust.pipelines.restoration import reflect_padded

    seen = []

    def zero_padded_smoothing(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:  # darkens a border
        seen.append(tuple(x.shape[-2:]))
        return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)

    flat = torch.ones(1, 3, 20, 28)
    t = torch.tensor([3])
    assert float(zero_padded_smoothing(flat, t)[..., 0, 0].min()) < 0.5  # unpadded: the corner sees zeros
    out = reflect_padded(zero_padded_smoothing, margin=4, multiple=8)(flat, t)
    assert out.shape == flat.shape and torch.allclose(out, flat)  # mirrored: a flat image stays flat to its corners
    assert seen[-1] == (32, 40)  # 20 + 2 * 4 = 28 -> 32, 28 + 8 = 36 -> 40: multiples of 8
    # The mirror is of the image itself: a ramp continues its values back inward at the border.
    ramp = torch.arange(20.0).view(1, 1, 20, 1).expand(1, 1, 20, 28)
    inner = reflect_padded(lambda x, timesteps: x.roll(1, dims=2), margin=4)(ramp, t)  # each pixel takes the one above
    assert torch.equal(inner[0, 0, 1:, 0], ramp[0, 0, :-1, 0]) and float(inner[0, 0, 0, 0]) == 1.0
    # A small image is mirrored by at most half its shorter side: 8x8 by 4 pixels, not 16.
    small = reflect_padded(zero_padded_smoothing, margin=16, multiple=8)(torch.ones(1, 1, 8, 8), t)
    assert small.shape == (1, 1, 8, 8) and torch.allclose(small, torch.ones_like(small)) and seen[-1] == (16, 16)
    # Too small to mirror the rest up to the multiple (9 + 2 * 4 = 17 -> 24): the edge is repeated instead.
    odd = reflect_padded(zero_padded_smoothing, margin=16, multiple=8)(torch.ones(1, 1, 9, 9), t)
    assert odd.shape == (1, 1, 9, 9) and torch.allclose(odd, torch.ones_like(odd)) and seen[-1] == (24, 24)


def test_a_large_image_is_denoised_block_by_block_each_block_seeing_its_surroundings():
    from diffusers_robust.pipelines.restoration import reflect_padded, tiled

    def local(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:  # sees 2 pixels around each one
        return torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2) * timesteps.view(-1, 1, 1, 1)

    def global_mean(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:  # sees the whole input
        return x - x.mean(dim=(2, 3), keepdim=True)

    sample = torch.randn(3, 2, 20, 27, generator=torch.Generator().manual_seed(0))  # 8 divides neither side
    t = torch.tensor([1.0, 2.0, 3.0])
    # A denoiser that looks no further than the margin gives, block by block, what it gives on the whole image.
    assert torch.allclose(tiled(local, core=8, margin=2)(sample, t), reflect_padded(local, margin=2)(sample, t), atol=1e-6)
    # One that reads the whole input sees each block with its surroundings only: not the whole image's statistics.
    blockwise = tiled(global_mean, core=8, margin=2)(sample, t)
    assert blockwise.shape == sample.shape and not torch.allclose(blockwise, global_mean(sample, t), atol=1e-2)
    block = torch.nn.functional.pad(sample, (2, 2, 2, 2), mode="reflect")[..., :12, :12]
    assert torch.allclose(blockwise[..., :8, :8], global_mean(block, t)[..., 2:10, 2:10], atol=1e-6)
    # An image no larger than the core is one padded pass.
    small = sample[..., :8, :6]
    assert torch.equal(tiled(global_mean, core=8, margin=2)(small, t), reflect_padded(global_mean, margin=2)(small, t))


@pytest.mark.parametrize("options", [dict(noise_sigma=0.1), dict(corruption="auto"), dict(blur_sigma=1.0),
                                     dict(corruption="impulse_noise"), dict(strength=0.2, num_inference_steps=4)])
def test_a_photo_of_a_size_the_unet_does_not_divide_is_restored_whole(options):
    """A real UNet that downsamples by 4 takes a 19x26 photo: each method returns it at its own size (the UNet sees it
    mirrored out to a multiple of 4), and inpainting keeps every pixel it did not find missing."""
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, norm_num_groups=4)
    pipe = RobustDDPMPipeline(unet=unet.eval(), scheduler=RobustDDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    assert pipe.size_multiple == 4
    image = torch.rand(2, 3, 19, 26, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    image[:, :, 5, 7] = 1.0  # one salt pixel each
    output = pipe(image=image, generator=torch.Generator().manual_seed(1), output_type="pt", **options)
    assert output.images.shape == image.shape and torch.isfinite(output.images).all()
    if options.get("corruption") == "impulse_noise":
        kept = (output.images - image).abs().amax(dim=1) < 1e-6
        assert kept.float().mean() > 0.9


def test_from_16x16_up_restoration_averages_the_eight_views_and_below_it_takes_one():
    """With a real, untrained (so not equivariant) UNet, restoring a turned photo-sized image gives the restoration
    turned; at 8x8 (the digits) it does not: one pass, as the digits' figures were measured."""
    from conftest import make_tiny_unet

    for size, equivariant in ((16, True), (8, False)):
        pipe = RobustDDPMPipeline(unet=make_tiny_unet(sample_size=size, channels=3, seed=1), scheduler=RobustDDPMScheduler())
        pipe.set_progress_bar_config(disable=True)
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2))

        turned = pipe(image=torch.rot90(image, 1, (2, 3)), noise_sigma=0.1, output_type="pt").images
        restored = pipe(image=image, noise_sigma=0.1, output_type="pt").images
        assert torch.allclose(turned, torch.rot90(restored, 1, (2, 3)), atol=1e-5) == equivariant


def test_sure_shrinkage_finds_the_wiener_share_from_the_noisy_images_alone_and_skips_clipped_values():
    from diffusers_robust.pipelines.restoration import sure_shrinkage

    generator = torch.Generator().manual_seed(0)
    signal, sigma = 0.15, 0.05  # model units: clean values N(0, 0.15^2); noise std 0.05 in [0, 1] units is 0.1
    clean = signal * torch.randn(4, 1, 64, 64, generator=generator)
    noisy = clean + 2 * sigma * torch.randn(clean.shape, generator=generator)
    assert float(noisy.abs().max()) < 1  # nothing clipped
    # Estimating every value as the mean, 0, the best share of it is the Wiener filter's: 0.01 / (0.0225 + 0.01).
    shrunk = sure_shrinkage(torch.zeros_like, noisy, torch.full((4,), sigma))
    share = 1 - (shrunk / noisy).flatten(1).median(1).values
    assert torch.allclose(share, torch.full((4,), 0.01 / 0.0325), atol=0.02)
    assert float((shrunk - clean).pow(2).mean()) < 0.99 * float((noisy - clean).pow(2).mean())
    # Told there is no noise, it keeps the input (and divides by no zero).
    assert torch.equal(sure_shrinkage(torch.zeros_like, noisy, torch.zeros(4)), noisy)
    # An estimate far worse than the noise is not trusted: the images come back as they were.
    wrong = sure_shrinkage(lambda images: images + 0.5, noisy, torch.full((4,), sigma))
    assert torch.allclose(wrong, noisy, atol=1e-3)
    # Values clipped at black or white by storage do not count: the share is that of the values inside.
    clipped = torch.cat([noisy, torch.full_like(noisy, -1.0)], dim=-1)
    halves = sure_shrinkage(lambda images: torch.where(images > -1, 0.0, images), clipped, torch.full((4,), sigma))
    assert torch.allclose(halves[..., :64], shrunk, atol=1e-4) and torch.equal(halves[..., 64:], clipped[..., 64:])


def test_a_clean_image_predictor_wrong_at_low_noise_does_not_make_a_lightly_noisy_image_worse():
    from conftest import make_tiny_unet

    from diffusers_robust.pipelines.restoration import denoise_from_timestep, noise_matched_timestep

    pipe = RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=RobustDDPMScheduler(prediction_type="sample"))
    clean = torch.full((4, 1, 8, 8), 0.3)
    clean[..., 2:6, 2:6] = 0.6
    noisy = (clean + 0.03 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    restored = pipe(image=noisy, noise_sigma=0.03, output_type="pt").images
    # The untrained UNet's own estimate is far from the image; shrunk toward the input it costs next to nothing.
    alphas = pipe.scheduler.alphas_cumprod
    start = noise_matched_timestep(alphas, torch.full((4,), 0.03))
    own = denoise_from_timestep(pipe._denoiser(), alphas, alphas[start].view(-1, 1, 1, 1).sqrt() *
                                (noisy * 2 - 1), start)
    clean, noisy, restored = clean * 2 - 1, noisy * 2 - 1, restored * 2 - 1
    assert float(mean_psnr(own, clean)) < float(mean_psnr(noisy, clean)) - 10  # 12.7 dB
    assert float(mean_psnr(restored, clean)) > float(mean_psnr(noisy, clean)) - 0.1  # 31.02 dB against 31.00


def test_clipped_noise_std_is_the_std_that_clipping_to_black_and_white_leaves():
    from diffusers_robust.pipelines.restoration import clipped_noise_std

    noise = torch.randn(400, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for value, sigma in ((0.05, 0.2), (0.5, 0.2), (0.95, 0.1), (0.5, 0.05)):
        clean = torch.full((1, 3, 16, 16), value)
        monte_carlo = float(((clean + sigma * noise).clamp(0, 1) - clean).pow(2).mean().sqrt())
        exact = float(clipped_noise_std(clean * 2 - 1, torch.tensor([sigma], dtype=torch.float64), window=1))
        assert abs(exact - monte_carlo) < 0.01 * sigma
    # Mid-grey keeps its noise; near black, clipping takes a quarter of it (0.145 of 0.2).
    assert abs(float(clipped_noise_std(torch.zeros(1, 3, 8, 8), torch.tensor([0.05]))) - 0.05) < 1e-4
    assert 0.14 < float(clipped_noise_std(torch.full((1, 3, 8, 8), -0.9), torch.tensor([0.2]))) < 0.15


def test_a_dark_photo_is_denoised_at_the_noise_level_clipping_left_in_it():
    from conftest import make_tiny_unet

    pipe = RobustDDPMPipeline(unet=make_tiny_unet(sample_size=16, channels=3), scheduler=RobustDDPMScheduler())
    timesteps = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: timesteps.append(int(args[1].flatten()[0])))
    noise = 0.2 * torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for value in (0.5, 0.05):
        pipe(image=(value + noise).clamp(0, 1), noise_sigma=0.2, output_type="pt")
    handle.remove()
    grey, dark = timesteps[0], timesteps[-1]  # each restoration: 8 views, one timestep
    assert dark < grey and len(set(timesteps[:8])) == len(set(timesteps[8:])) == 1


def test_auto_denoises_a_photo_at_the_noise_level_its_flat_regions_hold():
    from conftest import make_tiny_unet

    from diffusers_robust.data.annotations import estimated_noise_levels
    from diffusers_robust.pipelines.restoration import clipped_noise_std, noise_matched_timestep

    pipe = RobustDDPMPipeline(unet=make_tiny_unet(sample_size=16, channels=3), scheduler=RobustDDPMScheduler())
    dark = (0.06 + 0.2 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    timesteps = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: timesteps.append(int(args[1].flatten()[0])))
    output = pipe(image=dark, corruption="auto", output_type="pt")
    handle.remove()
    found = output.detections[0]
    alphas = pipe.scheduler.alphas_cumprod
    reading = estimated_noise_levels(dark * 2 - 1).double()
    assert found.corruption == "gaussian_noise" and found.noise_sigma >= float(reading) > 0  # it reports the std before clipping
    # Denoised at what the flat regions hold, not at the reported std lowered again by the image's clipping.
    assert timesteps[-1] == int(noise_matched_timestep(alphas, reading)[0])
    twice = clipped_noise_std(dark * 2 - 1, torch.tensor([found.noise_sigma], dtype=torch.float64))
    assert timesteps[-1] != int(noise_matched_timestep(alphas, twice)[0])
