"""The library on every device this machine has: each test runs on the CPU and, where present, on CUDA.

On a machine without a GPU (CI) the CUDA cases are reported as skipped, not dropped, so a run on a GPU machine
(`benchmarks/gpu_check.sh`) is the same suite with them switched on. A CPU generator is the training loop's
convention: random draws are made on the CPU and moved, so a seed gives the same corruption on every device.
"""

import pytest
import torch
from conftest import make_tiny_unet, weighted_mse

from diffusers_robust import RobustDDIMScheduler, RobustDDPMPipeline, RobustDDPMScheduler
from diffusers_robust.data.corruptions import CORRUPTIONS, RandomCorruption, apply_corruption
from diffusers_robust.models import LabelConditionedUNet, export_unet
from diffusers_robust.training.objective import min_snr_weights

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
]


def _images(batch: int = 8, channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_gives_the_cpu_result_on_the_device(device, name):
    images = _images()
    reference = apply_corruption(images, name, 3, generator=torch.Generator().manual_seed(1))
    out = apply_corruption(images.to(device), name, 3, generator=torch.Generator().manual_seed(1))
    assert out.device.type == device and out.dtype == images.dtype
    assert torch.allclose(out.cpu(), reference, atol=1e-4), (out.cpu() - reference).abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_random_corruption_reports_and_labels_on_the_device(device):
    corrupt = RandomCorruption(["gaussian_noise", "impulse_noise", "masking"], (1, 5), p=0.7)
    cpu_images, cpu_applied = corrupt(_images(), generator=torch.Generator().manual_seed(2))
    images, applied = corrupt(_images().to(device), generator=torch.Generator().manual_seed(2))
    assert applied == cpu_applied
    assert torch.allclose(images.cpu(), cpu_images, atol=1e-4)
    labels = corrupt.labels(applied, torch.device(device))
    assert labels.device.type == device and labels.shape == (8, corrupt.label_dim)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_noise_is_the_same_on_the_device(device, prediction_type):
    scheduler = RobustDDPMScheduler(input_perturbation=0.1, offset_noise=0.05, pyramid_noise_discount=0.8,
                                    prediction_type=prediction_type)
    clean, timesteps = _images(), torch.arange(0, 1000, 125)
    reference = scheduler.add_training_noise(clean, timesteps, generator=torch.Generator().manual_seed(3))
    out = scheduler.add_training_noise(clean.to(device), timesteps.to(device), generator=torch.Generator().manual_seed(3))
    assert out.noisy_images.device.type == device and out.target.device.type == device
    assert torch.allclose(out.noisy_images.cpu(), reference.noisy_images, atol=1e-5)
    assert torch.allclose(out.target.cpu(), reference.target, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scheduler_class", [RobustDDPMScheduler, RobustDDIMScheduler])
def test_pipeline_generates_and_restores_on_the_device(device, scheduler_class):
    scheduler = scheduler_class(num_train_timesteps=100, epsilon_scale_base=1.001)
    pipe = RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=10, output_type="pt").images
    pipe.to(device)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=10, output_type="pt").images
    assert images.shape == reference.shape == (2, 1, 8, 8)
    assert torch.allclose(images.cpu(), reference, atol=1e-3)
    noisy = apply_corruption(torch.zeros(2, 1, 8, 8), "gaussian_noise", 5, torch.Generator().manual_seed(5))
    restored = pipe(image=((noisy + 1) / 2).to(device), strength=0.3, generator=torch.Generator().manual_seed(6),
                    num_inference_steps=10, output_type="pt").images
    assert restored.shape == (2, 1, 8, 8) and torch.isfinite(restored).all()


@pytest.mark.parametrize("device", DEVICES)
def test_a_bf16_autocast_training_step_on_the_device_is_finite_and_exports_float32(device):
    """One step of the training objective (augment labels, min-SNR weights) under bf16 autocast, as
    `mixed_precision: bf16` runs it; the exported UNet keeps float32 weights."""
    torch.manual_seed(0)
    model = LabelConditionedUNet(make_tiny_unet(), label_dim=4).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = RobustDDPMScheduler(num_train_timesteps=100, input_perturbation=0.1)
    generator = torch.Generator().manual_seed(7)
    clean = torch.zeros(4, 1, 8, 8, device=device)
    timesteps = torch.randint(0, 100, (4,), generator=generator).to(device)
    noised = scheduler.add_training_noise(clean, timesteps, generator=generator)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        prediction = model(noised.noisy_images, timesteps, torch.rand(4, 4, device=device))
    weights = min_snr_weights(scheduler.alphas_cumprod, timesteps, 5.0)
    loss = weighted_mse(prediction.float(), noised.target, weights)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert {p.dtype for p in export_unet(model).parameters()} == {torch.float32}
