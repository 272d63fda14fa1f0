"""The memorisation monitor of training runs: the generalisation gap, the memorisation share of the sample grid, and
the warning on few images for many epochs."""

import json

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import run_training_script, tiny_training_args

from diffusers_robust import RobustDDPMScheduler
from diffusers_robust.data.datasets import load_digits_dataset, load_image_dataset
from diffusers_robust.training.monitor import MANY_EPOCHS, few_images_warning, monitor_figures


def digits(split: str, start: int, count: int) -> torch.Tensor:
    records = load_digits_dataset()[split]["image"][start:start + count]
    images = np.stack([np.asarray(image, dtype=np.float32) for image in records])
    return torch.from_numpy(images)[:, None] / 127.5 - 1


def memoriser(train: torch.Tensor, alphas: torch.Tensor):
    """The exact noise predictor of the data set that holds exactly `train`: a model that has memorised it."""

    def predict(sample: torch.Tensor, timesteps: torch.Tensor, labels=None) -> torch.Tensor:
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        scaled = alpha.sqrt()[:, None] * train[None]  # (B, N, C, H, W)
        logits = -((sample[:, None] - scaled) ** 2).flatten(2).sum(-1) / (2 * (1 - alpha.view(-1, 1)))
        clean = (logits.softmax(dim=1)[:, :, None, None, None] * train[None]).sum(1)
        return (sample - alpha.sqrt() * clean) / (1 - alpha).sqrt()

    return predict


def test_the_monitor_reads_a_memorising_model_and_copied_samples():
    scheduler = RobustDDPMScheduler()
    train, held_out, unseen = digits("train", 0, 40), digits("test", 0, 40), digits("test", 40, 16)
    model = memoriser(train, scheduler.alphas_cumprod)
    from diffusers_robust.evaluation.losses import denoising_loss

    held_out_loss = denoising_loss(model, scheduler, held_out)
    copies = train[:16] + 0.01 * torch.randn(train[:16].shape, generator=torch.Generator().manual_seed(0))
    copied = monitor_figures(model, scheduler, held_out, train, held_out_loss, copies)
    # The memoriser denoises its own images better than unseen ones: a clear positive gap.
    assert copied["generalisation_gap"] == pytest.approx(held_out_loss - copied["train_loss"])
    assert copied["generalisation_gap"] > 0.2 * held_out_loss
    assert copied["memorisation_share"] == 1.0 and copied["memorisation_distance_ratio"] < 0.1
    fresh = monitor_figures(model, scheduler, held_out, train, held_out_loss, unseen)
    assert fresh["memorisation_share"] <= 0.2 and fresh["memorisation_distance_ratio"] > 0.7
    # Train and held-out the same images: no gap at all (same timesteps and noise on both sides).
    same = monitor_figures(model, scheduler, train, train, denoising_loss(model, scheduler, train), unseen)
    assert same["generalisation_gap"] == 0.0


def blank_images(count: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"image": [PIL.Image.new("L", (8, 8))] * count},
                                      features=datasets.Features({"image": datasets.Image()}))


def test_few_images_for_many_epochs_are_warned_about_with_the_figures_to_watch():
    few = load_image_dataset(blank_images(150), channels=1, resolution=8)
    steps = int(np.ceil(MANY_EPOCHS * 150 / 64))
    warning = few_images_warning(few, steps, 64, monitored=True)
    assert warning and "150 images" in warning and "generalisation_gap" in warning and "memorisation_share" in warning
    assert few_images_warning(few, steps - 2, 64, monitored=True) is None  # under MANY_EPOCHS
    assert "hold images out" in few_images_warning(few, steps, 64, monitored=False)
    many = load_image_dataset(blank_images(1000), channels=1, resolution=8)
    assert few_images_warning(many, 100 * steps, 64, monitored=True) is None


@pytest.mark.slow
def test_a_run_on_few_images_warns_and_records_the_monitor_at_each_validation(tmp_path, tiny_preset):
    folder = tmp_path / "data"
    for split, count in (("train", 12), ("test", 8)):
        (folder / split).mkdir(parents=True)
        for index, image in enumerate(load_digits_dataset()[split]["image"][:count]):
            image.save(folder / split / f"{index}.png")
    result = run_training_script(tiny_training_args(tiny_preset, tmp_path / "out", dataset=str(folder),
                                                    train_batch_size=12, max_train_steps=500, checkpointing_steps=500,
                                                    validation_steps=250, validation_images=8), check=True)
    assert "training on 12 images for 500 epochs" in result.stderr
    assert "monitor at step 250: generalisation gap" in result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    monitor, validation = metrics["monitor_history"], metrics["validation_history"]
    assert set(monitor) == {"250", "500"}
    for step, figures in monitor.items():
        assert figures["generalisation_gap"] == pytest.approx(validation[step]["clean"] - figures["train_loss"])
        assert 0.0 <= figures["memorisation_share"] <= 1.0 and figures["memorisation_distance_ratio"] > 0
    assert "Memorisation monitor at step 500" in (tmp_path / "out" / "README.md").read_text()


def test_the_best_pipeline_is_replaced_only_by_a_lower_loss_and_a_resumed_run_carries_it_on(tmp_path, tiny_unet):
    from diffusers_robust import RobustDDPMPipeline
    from diffusers_robust.training.monitor import BestCheckpoint

    pipeline = RobustDDPMPipeline(unet=tiny_unet, scheduler=RobustDDPMScheduler(50))
    best = BestCheckpoint(str(tmp_path), resuming=False)
    assert best.offer(100, 0.5, pipeline) and not best.offer(200, 0.6, pipeline)
    assert json.loads((tmp_path / "best" / "best.json").read_text()) == {"step": 100, "clean_loss": 0.5}
    assert best.offer(300, 0.4, pipeline) and best.record == {"step": 300, "clean_loss": 0.4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no staging folder left behind
    loaded = RobustDDPMPipeline.from_pretrained(tmp_path / "best")
    assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), tiny_unet.state_dict().values(),
                                                 strict=True))
    assert BestCheckpoint(str(tmp_path), resuming=True).record == {"step": 300, "clean_loss": 0.4}
    assert BestCheckpoint(str(tmp_path), resuming=False).record is None and not (tmp_path / "best").exists()
    (tmp_path / "best").mkdir()  # a folder of the user's, not a run's best: never deleted
    with pytest.raises(ValueError, match="no best pipeline of a run"):
        BestCheckpoint(str(tmp_path), resuming=False)


@pytest.mark.slow
def test_keep_best_saves_the_validation_with_the_lowest_held_out_loss(tmp_path, tiny_preset):
    result = run_training_script(tiny_training_args(tiny_preset, tmp_path / "out", max_train_steps=9, validation_steps=3,
                                                    keep_best="true"), check=True)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    losses = {int(step): figures["clean"] for step, figures in metrics["validation_history"].items()}
    lowest = min(losses, key=losses.get)
    assert metrics["best"] == {"step": lowest, "clean_loss": losses[lowest]}
    assert json.loads((tmp_path / "out" / "best" / "best.json").read_text()) == metrics["best"]
    assert f"best so far: step {lowest}" in result.stderr
    from diffusers_robust import RobustDDPMPipeline

    RobustDDPMPipeline.from_pretrained(tmp_path / "out" / "best")
    refused = run_training_script(tiny_training_args(tiny_preset, tmp_path / "none", keep_best="true",
                                                     validation_split="null"))
    assert refused.returncode == 2 and "keep_best chooses by the held-out loss" in refused.stderr
    assert not (tmp_path / "none" / "checkpoints").exists()
