"""Contract tests for RobustDDPMPipeline: equivalence with Diffusers, round trips, restoration, bad input."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import built_once, make_tiny_unet
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from diffusers_robust import RobustDDIMScheduler, RobustDDPMPipeline, RobustDDPMScheduler

pytestmark = pytest.mark.newest_stack  # the pipeline's contract with Diffusers' own pipelines


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_images_equal_ddpm_pipeline_exactly_with_robust_options_off(tiny_unet):
    ours = RobustDDPMPipeline(unet=tiny_unet, scheduler=RobustDDPMScheduler())
    theirs = DDPMPipeline(unet=tiny_unet, scheduler=DDPMScheduler())
    a = ours(batch_size=3, generator=_generator(), num_inference_steps=20, output_type="np").images
    b = theirs(batch_size=3, generator=_generator(), num_inference_steps=20, output_type="np").images
    assert a.shape == (3, 8, 8, 1)
    assert np.array_equal(a, b)


def test_ddim_scheduler_swapped_in_with_from_config_equals_ddim_pipeline(tiny_unet):
    ours = RobustDDPMPipeline(unet=tiny_unet, scheduler=RobustDDPMScheduler())
    ours.scheduler = RobustDDIMScheduler.from_config(ours.scheduler.config)
    theirs = DDIMPipeline(unet=tiny_unet, scheduler=DDIMScheduler.from_config(DDPMScheduler().config))
    a = ours(batch_size=2, generator=_generator(1), num_inference_steps=10, output_type="np").images
    b = theirs(batch_size=2, generator=_generator(1), num_inference_steps=10, output_type="np", eta=0.0).images
    assert np.array_equal(a, b)


def test_epsilon_scaling_changes_the_images(tiny_unet):
    plain = RobustDDPMPipeline(unet=tiny_unet, scheduler=RobustDDPMScheduler())
    scaled = RobustDDPMPipeline(unet=tiny_unet, scheduler=RobustDDPMScheduler(epsilon_scale_base=1.05))
    a = plain(generator=_generator(), num_inference_steps=10, output_type="np").images
    b = scaled(generator=_generator(), num_inference_steps=10, output_type="np").images
    assert np.abs(a - b).max() > 1e-3


def test_save_pretrained_then_from_pretrained_reproduces_identical_images(tmp_path, tiny_unet):
    scheduler = RobustDDPMScheduler(input_perturbation=0.1, epsilon_scale_base=1.01, epsilon_scale_slope=1e-5)
    pipe = RobustDDPMPipeline(unet=tiny_unet, scheduler=scheduler)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = RobustDDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, RobustDDPMScheduler)
    assert loaded.scheduler.config.epsilon_scale_slope == 1e-5
    a = pipe(batch_size=2, generator=_generator(5), num_inference_steps=15, output_type="np").images
    b = loaded(batch_size=2, generator=_generator(5), num_inference_steps=15, output_type="np").images
    assert np.array_equal(a, b)


def test_one_image_equals_the_same_item_of_a_batch_with_per_sample_generators(tiny_unet):
    pipe = RobustDDPMPipeline(unet=tiny_unet, scheduler=RobustDDPMScheduler())
    batch = pipe(batch_size=3, generator=[_generator(s) for s in (10, 11, 12)], num_inference_steps=10,
                 output_type="np").images
    single = pipe(batch_size=1, generator=[_generator(11)], num_inference_steps=10, output_type="np").images
    np.testing.assert_allclose(single[0], batch[1], atol=1e-5)
    assert np.abs(batch[0] - batch[1]).max() > 1e-2


def test_dict_and_tuple_outputs_hold_the_same_images(tiny_unet):
    pipe = RobustDDPMPipeline(unet=tiny_unet, scheduler=RobustDDPMScheduler())
    as_dict = pipe(generator=_generator(), num_inference_steps=5, output_type="np").images
    as_tuple = pipe(generator=_generator(), num_inference_steps=5, output_type="np", return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert np.array_equal(as_dict, as_tuple[0])


def test_output_types(tiny_unet):
    pipe = RobustDDPMPipeline(unet=tiny_unet, scheduler=RobustDDPMScheduler())
    pil = pipe(batch_size=2, generator=_generator(), num_inference_steps=3).images
    pt = pipe(batch_size=2, generator=_generator(), num_inference_steps=3, output_type="pt").images
    assert len(pil) == 2 and pil[0].size == (8, 8) and pil[0].mode == "L"
    assert pt.shape == (2, 1, 8, 8) and 0 <= pt.min() and pt.max() <= 1


@pytest.fixture(scope="module")
def overfit_pipeline(tmp_path_factory):
    """A tiny UNet trained to denoise one fixed image: restoration should pull inputs towards it (trained once per
    session, saved, and loaded by each worker)."""
    folder = built_once(tmp_path_factory, "overfit-pipeline", lambda folder: _overfit(folder))
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1.0
    return RobustDDPMPipeline.from_pretrained(folder), target * 2 - 1


def _overfit(folder) -> None:
    torch.manual_seed(0)
    unet = make_tiny_unet(seed=0).train()
    scheduler = RobustDDPMScheduler()
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1.0
    target = target * 2 - 1
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    generator = _generator(0)
    for _ in range(300):
        x0 = target.repeat(32, 1, 1, 1)
        t = torch.randint(0, 1000, (32,), generator=generator)
        batch = scheduler.add_training_noise(x0, t, generator)
        loss = torch.nn.functional.mse_loss(unet(batch.noisy_images, t).sample, batch.target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    RobustDDPMPipeline(unet=unet.eval(), scheduler=RobustDDIMScheduler.from_config(scheduler.config)).save_pretrained(folder)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def test_restoration_removes_noise_from_a_corrupted_image(overfit_pipeline):
    pipe, target = overfit_pipeline
    clean = ((target + 1) / 2)[0].permute(1, 2, 0).numpy()  # (H, W, C) in [0, 1]
    noisy = np.clip(clean + 0.25 * np.random.default_rng(0).standard_normal(clean.shape), 0, 1).astype(np.float32)
    restored = pipe(image=noisy[None], strength=0.5, num_inference_steps=50, generator=_generator(),
                    output_type="np").images[0]
    assert _psnr(restored, clean) > _psnr(noisy, clean) + 6


def test_restoration_runs_strength_share_of_steps_from_t_near_strength_times_T(overfit_pipeline):
    pipe, _ = overfit_pipeline
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(int(args[1])))
    try:
        pipe(image=np.full((8, 8, 1), 0.5, np.float32), strength=0.3, num_inference_steps=50, generator=_generator())
    finally:
        hook.remove()
    assert len(seen) == 15
    assert abs(seen[0] - 0.3 * 1000) <= 20


def test_restoration_with_small_strength_stays_close_to_the_input(overfit_pipeline):
    pipe, _ = overfit_pipeline
    image = np.random.default_rng(1).uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
    out = pipe(image=image, strength=0.02, num_inference_steps=50, generator=_generator(), output_type="np").images
    assert _psnr(out, image) > 25


def test_restoration_accepts_pil_numpy_and_tensor_alike(overfit_pipeline):
    pipe, _ = overfit_pipeline
    array = np.random.default_rng(2).integers(0, 256, (8, 8), dtype=np.uint8)
    inputs = [
        PIL.Image.fromarray(array),
        array[..., None],
        torch.from_numpy(array.astype(np.float32) / 255)[None, None],
    ]
    outs = [pipe(image=x, strength=0.2, num_inference_steps=20, generator=_generator(), output_type="np").images
            for x in inputs]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
    np.testing.assert_allclose(outs[0], outs[2], atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch_size"),
    (dict(image=np.zeros((8, 8, 1), np.float32), strength=0.0), "strength"),
    (dict(image=np.zeros((8, 8, 1), np.float32), strength=1.5), "strength"),
    (dict(image=torch.zeros(1, 3, 8, 8)), "3 channels but the UNet takes 1"),
    (dict(image=torch.zeros(1, 1, 1, 12)),  # the tiny UNet downsamples once
     r"\(1, 12\) pixels but the UNet takes \(8, 8\), or any size whose sides are at least 2 pixels"),
    (dict(image=torch.full((1, 1, 8, 8), -1.0)), r"\[0, 1\]"),
    (dict(batch_size=2, generator=[torch.Generator()]), "1 generators for a batch of 2"),
    (dict(output_type="latent"), "output_type"),
    (dict(generator=0), "generator must be a torch.Generator"),
    (dict(num_inference_steps=float("nan")), "num_inference_steps"),
    (dict(num_inference_steps=2.5), "num_inference_steps"),
    (dict(image=torch.zeros(1, 1, 8, 8, dtype=torch.complex64)), "real values"),
])
def test_bad_input_raises_value_error_naming_the_problem(tiny_unet, kwargs, message):
    pipe = RobustDDPMPipeline(unet=tiny_unet, scheduler=RobustDDPMScheduler())
    with pytest.raises(ValueError, match=message):
        pipe(**{"num_inference_steps": 2, **kwargs})
