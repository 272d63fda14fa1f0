"""The damage detector behind `corruption="auto"` and `diffusers-robust restore` with no option."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest
import torch
from conftest import REPO_ROOT, make_tiny_unet, training_env
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler
from diffusers_robust.data.corruptions import apply_corruption
from diffusers_robust.data.datasets import load_digits_dataset
from diffusers_robust.data.photos import photo_tiles
from diffusers_robust.pipelines.detection import Detection, detect_corruption, noise_level


@pytest.fixture(scope="module")
def digit() -> torch.Tensor:
    """One held-out digit `(1, 1, 8, 8)` in `[-1, 1]`."""
    image = np.asarray(load_digits_dataset()["test"][3]["image"], dtype=np.float32)
    return torch.from_numpy(image)[None, None] / 127.5 - 1


def exact_prior(image: torch.Tensor, alphas: torch.Tensor):
    """The exact denoiser of a data distribution that holds `image` alone: its posterior mean is `image` at every level,
    so the detector's decisions can be checked without a trained model."""

    def denoiser(sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alpha = alphas[timesteps].view(-1, 1, 1, 1).to(sample.dtype)
        return (sample - alpha.sqrt() * image) / (1 - alpha).sqrt()

    return denoiser


@pytest.mark.parametrize("damage, expected", [
    ("clean", Detection(None)),
    ("impulse", Detection("impulse_noise")),
    ("hole", Detection("masking")),
    ("noise", "gaussian_noise"),
    ("blur", Detection("gaussian_blur", 3)),
])
def test_each_kind_of_damage_is_told_apart_under_an_exact_prior(digit, damage, expected):
    alphas = RobustDDPMScheduler().alphas_cumprod
    image = digit.clone()
    if damage == "impulse":
        image[0, 0, 0, 0] = 1.0  # a white pixel in the black background
    elif damage == "hole":
        image[0, 0, 3:5, 3:5] = -1.0  # black where the digit's stroke is bright
    elif damage == "noise":
        image = (image + 2 * 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    elif damage == "blur":
        image = apply_corruption(image, "gaussian_blur", 3)
    found = detect_corruption(exact_prior(digit, alphas), alphas, image)[0]
    if expected == "gaussian_noise":
        # Within a factor 1.5 of the true 0.1 (it reads 0.13: under an exact prior, which removes all the noise, the
        # NOISE_RATIO set on trained priors overestimates by about 30%); 0.05 or 0.2 fail.
        assert found.corruption == "gaussian_noise" and 0.1 / 1.5 <= found.noise_sigma <= 0.15 and found.method == "noise"
    else:
        assert found == expected
    assert found.to_dict()["method"] == found.method


def test_noise_level_grows_with_the_noise(digit):
    alphas = RobustDDPMScheduler().alphas_cumprod
    generator = torch.Generator().manual_seed(1)
    noisy = torch.cat([digit + 2 * sigma * torch.randn(digit.shape, generator=generator) for sigma in (0.0, 0.05, 0.2)])
    levels = noise_level(exact_prior(digit, alphas), alphas, noisy.clamp(-1, 1))
    assert levels[0] == 0 and 0 < levels[1] < levels[2]


def test_blur_on_larger_images_reads_clean_not_a_severity_of_the_digits_table():
    """72x72 held-out photos, clean and blurred by 1 and 2 px (PIL, 8-bit): the digits' blur rule once called them all
    severity 5; the evidence is weak on photos, so each is kept as it is. Under noise they read noisy."""
    tiles = photo_tiles(72, "test")[0][:3]
    alphas = RobustDDPMScheduler().alphas_cumprod
    noise = np.random.default_rng(0).standard_normal(tiles.shape)
    for radius in (0, 1, 2):
        blurred = np.stack([np.asarray(PIL.Image.fromarray(tile).filter(PIL.ImageFilter.GaussianBlur(radius))) for tile in tiles])
        for std, expected in ((0.0, None), (0.05, "gaussian_noise")):
            damaged = torch.tensor(np.round(np.clip(blurred / 255 + std * noise, 0, 1) * 255) / 255, dtype=torch.float32)
            for clean, image in zip(torch.tensor(tiles / 127.5 - 1, dtype=torch.float32), damaged * 2 - 1, strict=True):
                prior = exact_prior(clean.permute(2, 0, 1)[None], alphas)
                found = detect_corruption(prior, alphas, image.permute(2, 0, 1)[None])[0]
                assert found.corruption == expected, (radius, std, found)


class ExactPointDenoiser(ModelMixin, ConfigMixin):
    """The exact noise predictor of a data set that holds one image: the prior `exact_prior` as a UNet."""

    @register_to_config
    def __init__(self, image: list, sample_size: int = 8, in_channels: int = 1):
        super().__init__()
        self.register_buffer("clean", torch.tensor(image, dtype=torch.float32))
        self.alphas_cumprod = RobustDDPMScheduler().alphas_cumprod

    def forward(self, sample: torch.Tensor, timestep) -> UNet2DOutput:
        t = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0])
        return UNet2DOutput(sample=exact_prior(self.clean, self.alphas_cumprod)(sample, t))


def test_auto_restoration_restores_each_kind_it_finds_and_keeps_images_it_finds_clean(digit):
    """Every branch of `corruption="auto"` under a prior that knows the answer: the clean image is kept exactly, and the
    noisy, salted and blurred ones each come back much closer to the digit than they went in."""
    pipe = RobustDDPMPipeline(unet=ExactPointDenoiser(digit[0].tolist()), scheduler=RobustDDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    salted = digit.clone()
    salted[0, 0, 0, 0] = 1.0
    noisy = (digit + 0.2 * torch.randn(digit.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    images = torch.cat([digit, noisy, salted, apply_corruption(digit, "gaussian_blur", 3)]) / 2 + 0.5
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    output = pipe(image=images, corruption="auto", output_type="pt", generator=generators)
    assert [found.corruption for found in output.detections] == [None, "gaussian_noise", "impulse_noise", "gaussian_blur"]
    assert output.detections == pipe.detect_corruption(images)
    assert torch.equal(output.images[0], images[0])
    errors_in = (images - (digit / 2 + 0.5)).pow(2).flatten(1).mean(1)
    errors_out = (output.images - (digit / 2 + 0.5)).pow(2).flatten(1).mean(1)
    assert (errors_out[1:] < errors_in[1:] / 10).all(), (errors_in, errors_out)
    assert pipe(image=images, noise_sigma=0.1, output_type="np").detections is None


@pytest.mark.slow
def test_restore_with_no_option_detects_per_image_and_writes_its_choices(tmp_path, digit):
    folder = tmp_path / "pipe"
    RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=RobustDDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    (tmp_path / "inputs").mkdir()
    for index in range(3):
        pixels = ((digit[0, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
        PIL.Image.fromarray(np.roll(pixels, index, axis=1)).save(tmp_path / "inputs" / f"{index}.png")
    result = subprocess.run([sys.executable, "-m", "diffusers_robust", "restore", str(folder), str(tmp_path / "inputs"),
                             "--output_dir", str(tmp_path / "out"), "--restoration_steps", "2"], cwd=tmp_path,
                            env=training_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "restoration.json").read_text())
    assert record["detected"] is True and sorted(record["images"]) == ["0.png", "1.png", "2.png"]
    for name, choice in record["images"].items():
        assert set(choice) == {"corruption", "severity", "noise_sigma", "method"}
        assert f"{name}: " in result.stderr and (tmp_path / "out" / name).is_file()


def test_detection_on_images_unlike_the_calibration_digits_warns_at_run_time(caplog):
    pipe = RobustDDPMPipeline(unet=make_tiny_unet(channels=3, sample_size=16),
                              scheduler=RobustDDPMScheduler(num_train_timesteps=100))
    photos = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    with caplog.at_level("WARNING"):
        pipe.detect_corruption(photos)
    assert "thresholds were set on 8x8 grey digits and 32x32 RGB photos; these are 3x16x16 images" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # corruption="auto" says it too
        pipe(image=photos, corruption="auto", output_type="np")
    assert "these are 3x16x16 images" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        RobustDDPMPipeline(unet=make_tiny_unet(), scheduler=RobustDDPMScheduler(num_train_timesteps=100)).detect_corruption(
            np.zeros((1, 8, 8, 1), dtype=np.float32))
    assert "thresholds were set" not in caplog.text


def _photo_damage(tiles: np.ndarray, damage: str) -> np.ndarray:
    """8-bit damaged copies `(N, 32, 32, 3)` in `[0, 1]` of held-out photo tiles."""
    rng = np.random.default_rng(0)
    unit = tiles / 255
    if damage.startswith("gaussian"):
        unit = unit + float(damage.split()[1]) * rng.standard_normal(unit.shape)
    elif damage == "salt-and-pepper":
        hit = rng.random(unit.shape[:3]) < 0.05
        unit = np.where(hit[..., None], (rng.random(unit.shape[:3]) < 0.5)[..., None].astype(float), unit)
    elif damage == "missing":
        unit = np.where((rng.random(unit.shape[:3]) < 0.5)[..., None], 0.0, unit)
    return np.round(np.clip(unit, 0, 1) * 255) / 255


@pytest.mark.parametrize("damage, corruption, misread, levels", [
    ("clean", None, 1, None),
    ("gaussian 0.05", "gaussian_noise", 0, (0.03, 0.065)),  # per image: clipping and texture move a 32x32 reading
    ("gaussian 0.1", "gaussian_noise", 0, (0.06, 0.12)),
    ("salt-and-pepper", "impulse_noise", 0, None),
    ("missing", "masking", 0, None),
])
def test_photos_are_judged_by_the_photo_calibration(damage, corruption, misread, levels):
    """Held-out 32x32 photos stored as 8-bit, with the exact prior of each photo: Gaussian noise is not read as
    salt-and-pepper or holes (its values clipped at black and white disagree with the prior too), and its level is read
    from the flat regions. (Noise of std 0.2 needs a trained prior, whose estimate follows the noise; an exact one
    knows the clean photo: README, "Restoring photos", measures it.)"""
    from diffusers_robust.data.photos import photo_tiles

    tiles, _ = photo_tiles(32, "test")
    tiles = tiles[::16]
    alphas = RobustDDPMScheduler().alphas_cumprod
    damaged = torch.tensor(_photo_damage(tiles, damage), dtype=torch.float32).permute(0, 3, 1, 2) * 2 - 1
    clean = torch.tensor(tiles / 255, dtype=torch.float32).permute(0, 3, 1, 2) * 2 - 1
    found = [detect_corruption(exact_prior(clean[i:i + 1], alphas), alphas, damaged[i:i + 1])[0] for i in range(len(tiles))]
    assert sum(d.corruption != corruption for d in found) <= misread, [d.corruption for d in found]
    if levels is not None:
        assert all(levels[0] <= d.noise_sigma <= levels[1] for d in found), sorted(round(d.noise_sigma, 3) for d in found)
        true_std = float(damage.split()[1])
        assert np.median([d.noise_sigma for d in found]) == pytest.approx(true_std, rel=0.2)


def test_the_digits_detector_constants_are_what_their_recorded_calibration_picks():
    """`benchmarks/calibrate_detector.py` re-measures NOISE_RATIO, BLUR_HIGH_FREQUENCY and SEVERITY_TEST_CUTOFF on the
    digits' train split with a trained clean prior and records the figures; this fails when the code and the record
    part: a constant changed without re-measuring, or figures that no longer support it."""
    from test_benchmarks import load_benchmark

    from diffusers_robust.pipelines import detection

    calibrate = load_benchmark("calibrate_detector")
    with open(os.path.join(REPO_ROOT, "benchmarks", "detector_calibration.json")) as handle:
        recorded = json.load(handle)
    assert recorded["split"] == "train" and recorded["images"] >= 300
    assert recorded["constants"] == {"NOISE_RATIO": detection.NOISE_RATIO, "NOISE_LEVELS": list(detection.NOISE_LEVELS),
                                     "BLUR_HIGH_FREQUENCY": detection.BLUR_HIGH_FREQUENCY,
                                     "SEVERITY_TEST_CUTOFF": detection.SEVERITY_TEST_CUTOFF}
    clean_peak, own_least, own_most = calibrate.noise_ratio_bounds(recorded)
    assert clean_peak + 0.1 < detection.NOISE_RATIO and own_least <= detection.NOISE_RATIO <= own_most
    fewest = min(calibrate.worst_blur_error(recorded, t) for t in np.arange(0.2, 0.6, 0.01))
    assert calibrate.worst_blur_error(recorded, detection.BLUR_HIGH_FREQUENCY) <= fewest + 0.01
    assert detection.SEVERITY_TEST_CUTOFF == calibrate.severity_cutoff(recorded)
