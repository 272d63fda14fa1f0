"""Contract and formula tests for RobustDDPMScheduler and RobustDDIMScheduler."""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)

from diffusers_robust import RobustDDIMScheduler, RobustDDPMScheduler

pytestmark = pytest.mark.newest_stack  # the schedulers' contract with their Diffusers parents

PAIRS = [(RobustDDPMScheduler, DDPMScheduler), (RobustDDIMScheduler, DDIMScheduler)]
ROBUST_CONFIG = dict(
    input_perturbation=0.15, offset_noise=0.05, pyramid_noise_discount=0.4, epsilon_scale_base=1.01,
    epsilon_scale_slope=1e-5,
)


def _clean_images(batch=4, seed=0):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("robust_class,parent_class", PAIRS)
def test_config_round_trip_keeps_every_robust_option(tmp_path, robust_class, parent_class):
    scheduler = robust_class(**ROBUST_CONFIG, beta_schedule="squaredcos_cap_v2")
    scheduler.save_pretrained(tmp_path)
    loaded = robust_class.from_pretrained(tmp_path)
    for key, value in ROBUST_CONFIG.items():
        assert loaded.config[key] == value
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)


@pytest.mark.parametrize("robust_class,parent_class", PAIRS)
def test_step_outputs_identical_after_save_and_load(tmp_path, robust_class, parent_class):
    scheduler = robust_class(**ROBUST_CONFIG)
    scheduler.save_pretrained(tmp_path)
    loaded = robust_class.from_pretrained(tmp_path)
    for s in (scheduler, loaded):
        s.set_timesteps(10)
    sample, output = _clean_images(seed=1), _clean_images(seed=2)
    t = scheduler.timesteps[3]
    a = scheduler.step(output, t, sample, generator=torch.Generator().manual_seed(0)).prev_sample
    b = loaded.step(output, t, sample, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.equal(a, b)


@pytest.mark.parametrize("robust_class,parent_class", PAIRS)
def test_step_matches_parent_bit_for_bit_when_robust_options_are_off(robust_class, parent_class):
    robust, parent = robust_class(), parent_class()
    robust.set_timesteps(25)
    parent.set_timesteps(25)
    sample = _clean_images(seed=3)
    for t in robust.timesteps:
        model_output = torch.tanh(sample * 0.5 + t / 1000)
        ours = robust.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t))).prev_sample
        theirs = parent.step(model_output, t, sample, generator=torch.Generator().manual_seed(int(t))).prev_sample
        assert torch.equal(ours, theirs)
        sample = ours


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("robust_class,parent_class", PAIRS)
def test_training_noise_matches_parent_recipe_bit_for_bit_when_off(robust_class, parent_class, prediction_type):
    robust = robust_class(prediction_type=prediction_type)
    parent = parent_class(prediction_type=prediction_type)
    x0, t = _clean_images(), torch.tensor([0, 250, 600, 999])
    out = robust.add_training_noise(x0, t, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out.noisy_images, parent.add_noise(x0, noise, t))
    expected_target = {"epsilon": noise, "v_prediction": parent.get_velocity(x0, noise, t), "sample": x0}
    assert torch.equal(out.target, expected_target[prediction_type])


@pytest.mark.parametrize("source,target", [
    (RobustDDPMScheduler, DDIMScheduler), (RobustDDPMScheduler, EulerDiscreteScheduler),
    (RobustDDPMScheduler, DPMSolverMultistepScheduler), (DDPMScheduler, RobustDDIMScheduler),
    (RobustDDIMScheduler, RobustDDPMScheduler), (DDIMScheduler, RobustDDPMScheduler),
])
def test_swapping_to_and_from_diffusers_schedulers_keeps_the_noise_schedule(source, target):
    first = source(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500)
    swapped = target.from_config(first.config)
    assert swapped.config.num_train_timesteps == 500
    assert torch.allclose(swapped.alphas_cumprod, first.alphas_cumprod)
    back = source.from_config(swapped.config)
    assert torch.allclose(back.alphas_cumprod, first.alphas_cumprod)


def test_robust_options_survive_a_swap_between_robust_schedulers():
    ddim = RobustDDIMScheduler.from_config(RobustDDPMScheduler(**ROBUST_CONFIG).config)
    for key, value in ROBUST_CONFIG.items():
        assert ddim.config[key] == value


def test_compatibles_list_both_robust_schedulers():
    names = {c.__name__ for c in RobustDDPMScheduler().compatibles}
    assert {"RobustDDIMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"} <= names


@pytest.mark.parametrize("gamma", [0.1, 0.3])
def test_input_perturbation_noise_std_is_sqrt_one_plus_gamma_squared(gamma):
    scheduler = RobustDDPMScheduler(input_perturbation=gamma)
    x0 = torch.zeros(64, 3, 32, 32)
    t = torch.full((64,), scheduler.config.num_train_timesteps - 1)
    out = scheduler.add_training_noise(x0, t, generator=torch.Generator().manual_seed(0))
    # With x0 = 0, x_t = sqrt(1 - a_t) * (eps + gamma * xi).
    scale = (1 - scheduler.alphas_cumprod[-1]).sqrt()
    measured = (out.noisy_images / scale).std().item()
    assert measured == pytest.approx(math.sqrt(1 + gamma**2), rel=5e-3)
    assert out.target.std().item() == pytest.approx(1.0, rel=5e-3)  # target keeps eps alone
    assert not torch.allclose(out.noisy_images / scale, out.target)


def test_offset_noise_adds_per_channel_constant_with_given_std():
    offset = 0.5
    scheduler = RobustDDPMScheduler(offset_noise=offset)
    x0 = torch.zeros(4096, 3, 8, 8)
    out = scheduler.add_training_noise(x0, torch.zeros(4096, dtype=torch.long), torch.Generator().manual_seed(0))
    channel_means = out.noise.mean(dim=(2, 3))  # mean of 64 white pixels has std 1/8
    assert channel_means.std().item() == pytest.approx(math.sqrt(offset**2 + 1 / 64), rel=0.03)
    assert out.noise.std().item() == pytest.approx(math.sqrt(1 + offset**2), rel=0.02)


def test_pyramid_noise_has_unit_std_and_spatial_correlation():
    scheduler = RobustDDPMScheduler(pyramid_noise_discount=0.8)
    x0 = torch.zeros(256, 1, 32, 32)
    noise = scheduler.add_training_noise(x0, torch.zeros(256, dtype=torch.long), torch.Generator().manual_seed(0)).noise
    assert noise.std(dim=(1, 2, 3)).mean().item() == pytest.approx(1.0, abs=1e-3)
    neighbour_corr = torch.corrcoef(torch.stack([noise[..., :-1].flatten(), noise[..., 1:].flatten()]))[0, 1]
    white = torch.randn(256, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    white_corr = torch.corrcoef(torch.stack([white[..., :-1].flatten(), white[..., 1:].flatten()]))[0, 1]
    assert neighbour_corr > 0.3 and abs(white_corr) < 0.02


@pytest.mark.parametrize("robust_class", [RobustDDPMScheduler, RobustDDIMScheduler])
def test_epsilon_scaling_divides_predicted_noise_by_kt_plus_b(robust_class):
    base, slope = 1.02, 2e-5
    scaled, plain = robust_class(epsilon_scale_base=base, epsilon_scale_slope=slope), robust_class()
    scaled.set_timesteps(10)
    plain.set_timesteps(10)
    sample, eps = _clean_images(seed=4), _clean_images(seed=5)
    t = int(scaled.timesteps[2])
    assert scaled.epsilon_scale(t) == pytest.approx(slope * t + base)
    ours = scaled.step(eps, t, sample, generator=torch.Generator().manual_seed(0)).prev_sample
    reference = plain.step(eps / (slope * t + base), t, sample, generator=torch.Generator().manual_seed(0)).prev_sample
    unscaled = plain.step(eps, t, sample, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.equal(ours, reference)
    assert not torch.allclose(ours, unscaled)


def test_same_generator_seed_gives_same_training_noise_and_different_seed_differs():
    scheduler = RobustDDPMScheduler(**ROBUST_CONFIG)
    x0, t = _clean_images(), torch.tensor([1, 2, 3, 4])
    a = scheduler.add_training_noise(x0, t, torch.Generator().manual_seed(3))
    b = scheduler.add_training_noise(x0, t, torch.Generator().manual_seed(3))
    c = scheduler.add_training_noise(x0, t, torch.Generator().manual_seed(4))
    assert torch.equal(a.noisy_images, b.noisy_images) and torch.equal(a.target, b.target)
    assert not torch.equal(a.noisy_images, c.noisy_images)


@pytest.mark.parametrize("kwargs,message", [
    (dict(input_perturbation=-0.1), "input_perturbation"),
    (dict(offset_noise=-1.0), "offset_noise"),
    (dict(pyramid_noise_discount=1.0), "pyramid_noise_discount"),
    (dict(epsilon_scale_base=0.0), "epsilon_scale_base"),
    (dict(epsilon_scale_base=1.01, prediction_type="v_prediction"), "prediction_type='epsilon'"),
])
def test_bad_robust_options_raise_naming_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RobustDDPMScheduler(**kwargs)


def test_add_training_noise_rejects_wrong_shapes():
    scheduler = RobustDDPMScheduler()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        scheduler.add_training_noise(torch.zeros(3, 8, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="timesteps"):
        scheduler.add_training_noise(torch.zeros(2, 3, 8, 8), torch.tensor([1, 2, 3]))
