"""The training script end to end: outputs, exact resume after SIGKILL, LR schedule, bad input."""

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import SCRIPT, built_once, run_training_script, tiny_training_args, training_env
from safetensors.torch import load_file

from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler
from diffusers_robust.data.datasets import STREAM_MAP_BATCH_SIZE
from diffusers_robust.evaluation.defaults import QUICK_RESTORATION_CASES
from diffusers_robust.evaluation.restoration import case_name
from diffusers_robust.training.checkpoints import complete_checkpoints, resolve_checkpoint

pytestmark = pytest.mark.slow  # every test here reads a real training run (the training script in a fresh process)

EDM = os.path.join(os.path.dirname(SCRIPT), "configs", "augment", "edm.yaml")


run_training = functools.partial(run_training_script, check=True)  # a failed run raises, naming its stderr


def cosine_lr(step: int, base: float, warmup: int, total: int) -> float:
    """Diffusers' cosine schedule with linear warm-up, as the LR used at optimizer step `step` (1-based)."""
    k = step - 1
    if k < warmup:
        return base * k / max(1, warmup)
    progress = (k - warmup) / max(1, total - warmup)
    return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.fixture(scope="module")
def trained(tiny_preset, tmp_path_factory):
    def train(folder):
        args = tiny_training_args(tiny_preset, folder / "tiny-digits", augment=EDM, corruptions=["gaussian_noise",
                                  "salt_and_pepper"], corruption_p=0.5, snr_gamma=5.0, checkpoints_total_limit=1,
                                  input_perturbation=0.1, epsilon_scale_base=1.001, report="true", report_images=12,
                                  report_samples=6, dropout=0.1)
        run_training(args)

    return built_once(tmp_path_factory, "trained-tiny-digits", train) / "tiny-digits", None


def test_output_dir_holds_a_loadable_safetensors_pipeline(trained):
    output_dir, _ = trained
    pipe = RobustDDPMPipeline.from_pretrained(output_dir)
    assert isinstance(pipe.scheduler, RobustDDPMScheduler)
    assert pipe.scheduler.config.input_perturbation == 0.1 and pipe.scheduler.config.epsilon_scale_base == 1.001
    assert pipe.unet.config.class_embed_type is None  # the augment projection is not part of the exported UNet
    assert pipe.unet.config.dropout == 0.1  # the recipe's, not the preset's 0
    weights = sorted(os.listdir(output_dir / "unet"))
    assert weights == ["config.json", "diffusion_pytorch_model.safetensors"]
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1)


def test_output_dir_holds_config_grid_metrics_and_samples(trained):
    output_dir, _ = trained
    with open(output_dir / "training_config.yaml") as handle:
        config = yaml.safe_load(handle)
    assert config["corruptions"] == ["gaussian_noise", "salt_and_pepper"] and config["snr_gamma"] == 5.0
    for name in ("step-3.png", "step-6.png", "final.png"):
        assert (output_dir / "samples" / name).is_file()
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["images_seen"] == 6 * 16
    cases = {f"{name}/s{s}" for name in ("gaussian_noise", "salt_and_pepper") for s in (1, 3, 5)}
    assert set(metrics["validation_losses"]) == {"clean"} | cases | {f"restore/{case}" for case in cases}
    assert metrics["validation_losses"]["gaussian_noise/s5"] != metrics["validation_losses"]["clean"]
    assert all(np.isfinite(v) for v in metrics["validation_losses"].values())


def test_checkpoint_limit_is_honoured_and_only_complete_checkpoints_count(trained):
    output_dir, _ = trained
    assert [os.path.basename(p) for p in complete_checkpoints(str(output_dir))] == ["checkpoint-6"]
    partial = output_dir / "checkpoints" / "checkpoint-9.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half written")
    assert resolve_checkpoint(str(output_dir), "latest").endswith("checkpoint-6")
    partial.rename(output_dir / "checkpoints" / "checkpoint-9")  # no checkpoint.json: still incomplete
    assert resolve_checkpoint(str(output_dir), "latest").endswith("checkpoint-6")


def test_model_card_has_hub_metadata_and_training_facts(trained):
    output_dir, _ = trained
    card = (output_dir / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "diffusers" and metadata["license"] == "apache-2.0"
    assert {"diffusers-robust", "unconditional-image-generation"} <= set(metadata["tags"])
    for fact in ("input_perturbation`: 0.1", "snr_gamma`: 5.0", "gaussian_noise/s5", "samples/final.png",
                 "RobustDDPMPipeline.from_pretrained", "epsilon_scale_base`: 1.001", "evaluation/restoration.png",
                 "| impulse_noise/s3 | inpaint |"):
        assert fact in card


def test_run_ends_with_the_held_out_evaluation_report(trained):
    output_dir, _ = trained
    report = json.loads((output_dir / "evaluation" / "report.json").read_text())
    assert report["num_images"] == 12 and report["split"] == "test" and report["generation"]["samples"] == 6
    # evaluate's quick cases by default (report_full: false), one per method: 8 of the table's 21
    assert [row["case"] for row in report["restoration"]] == [case_name(*case) for case in QUICK_RESTORATION_CASES]
    assert all(np.isfinite(row["psnr"]) and 0 <= row["accuracy"] <= 1 for row in report["restoration"])
    for name in ("report.md", "restoration.png", "samples.png"):
        assert (output_dir / "evaluation" / name).is_file()
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["report"]["restoration"] == report["restoration"]
    share = report["generation"]["memorisation"]["share_nearer_than_held_out"]
    card = " ".join((output_dir / "README.md").read_text().split())
    assert f"Memorisation: {share:.1%} of the samples are nearer a training image than 95% of held-out images" in card


@pytest.fixture(scope="module")
def restoration_trained(tiny_preset, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "tiny-restore"
    args = tiny_training_args(tiny_preset, output_dir, corruptions=["gaussian_noise", "impulse_noise"], corruption_p=0.5,
                              restoration_training="true", restoration_max_timestep=20, snr_gamma=5.0)
    run_training(args)
    return output_dir


def test_restoration_training_saves_the_condition_embedding_and_restores_with_it(restoration_trained):
    pipe = RobustDDPMPipeline.from_pretrained(restoration_trained)
    assert pipe.condition_embedding is not None and pipe.condition_embedding.corruptions == ["gaussian_noise", "impulse_noise"]
    assert float(pipe.condition_embedding.projection.weight.detach().abs().sum()) > 0  # trained, not the zero initialisation
    assert pipe.unet.config.class_embed_type is None  # the UNet stays a plain UNet2DModel
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    learned = pipe(image=image, corruption="impulse_noise", severity=3, output_type="pt", learned_restoration=True,
                   generator=torch.Generator().manual_seed(0)).images
    prior = pipe(image=image, corruption="impulse_noise", severity=3, output_type="pt",  # the default: inpainting
                 generator=torch.Generator().manual_seed(0)).images
    assert learned.shape == prior.shape == (2, 1, 8, 8) and not torch.equal(learned, prior)
    with pytest.raises(ValueError, match=r"learned_restoration needs a corruption this pipeline was trained to undo"):
        pipe(image=image, corruption="gaussian_blur", severity=3, learned_restoration=True)


def test_lr_follows_warmup_and_cosine_per_optimizer_step(trained):
    output_dir, _ = trained
    history = json.loads((output_dir / "metrics.json").read_text())["lr_history"]
    for step in range(1, 7):
        assert history[str(step)] == pytest.approx(cosine_lr(step, 1e-3, 2, 6), abs=1e-12)


def test_help_lists_every_option():
    from diffusers_robust.training.config import TrainingConfig

    result = subprocess.run([sys.executable, SCRIPT, "--help"], env=training_env(), capture_output=True, text=True)
    assert result.returncode == 0
    for name in TrainingConfig.__dataclass_fields__:
        assert f"--{name}" in result.stdout


def _checkpoint_state(folder: str) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    optimizer = torch.load(os.path.join(folder, "optimizer.bin"), weights_only=False)
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            state[f"optimizer.{index}.{key}"] = torch.as_tensor(value)
    ema = torch.load(os.path.join(folder, "custom_checkpoint_0.pkl"), weights_only=False)
    for index, value in enumerate(ema["shadow_params"]):
        state[f"ema.{index}"] = value
    state["ema.optimization_step"] = torch.as_tensor(ema["optimization_step"])
    return state


@pytest.mark.parametrize("streaming", [False, True])
def test_sigkill_then_resume_latest_matches_an_uninterrupted_run_bit_for_bit(tiny_preset, tmp_path, streaming):
    common = dict(max_train_steps=40, checkpointing_steps=10, validation_steps=1000, validation_split="null",
                  augment=EDM, corruptions=["gaussian_noise"], corruption_p=0.5, checkpoints_total_limit=5,
                  streaming=str(streaming).lower(), gradient_accumulation_steps=2, train_batch_size=8)
    reference_dir, interrupted_dir = tmp_path / "reference", tmp_path / "interrupted"
    run_training(tiny_training_args(tiny_preset, reference_dir, **common))

    process = subprocess.Popen([sys.executable, SCRIPT, *tiny_training_args(tiny_preset, interrupted_dir, **common)],
                               env=training_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not complete_checkpoints(str(interrupted_dir)) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = int(os.path.basename(complete_checkpoints(str(interrupted_dir))[-1]).split("-")[1])
    assert killed_at < 40

    run_training(tiny_training_args(tiny_preset, interrupted_dir, **common, resume_from_checkpoint="latest"))
    expected = _checkpoint_state(str(reference_dir / "checkpoints" / "checkpoint-40"))
    actual = _checkpoint_state(str(interrupted_dir / "checkpoints" / "checkpoint-40"))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    reference_metrics = json.loads((reference_dir / "metrics.json").read_text())
    resumed_metrics = json.loads((interrupted_dir / "metrics.json").read_text())
    # Batches consumed before the checkpoint are not decoded again: map-style skips them in the sampler (plus
    # Accelerate's one batch of read-ahead); a stream re-runs at most the `.map` batch it stopped in. Before training,
    # the check that the data holds a decodable image decodes one record (map-style) or one `.map` batch (a stream).
    remaining_records = (40 - killed_at) * 2 * 8
    slack = 2 * STREAM_MAP_BATCH_SIZE if streaming else 8 + 1
    assert remaining_records <= resumed_metrics["records_decoded_this_run"] <= remaining_records + slack
    assert reference_metrics["records_decoded_this_run"] >= 40 * 2 * 8
    final_reference = load_file(str(reference_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    final_resumed = load_file(str(interrupted_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(final_reference[k], final_resumed[k]) for k in final_reference)


def test_bf16_mixed_precision_trains_and_exports_float32_weights(tiny_preset, tmp_path):
    """The CIFAR-10 recipe's `mixed_precision: bf16` path (Accelerate's autocast; on the CPU here): losses stay
    finite, and the exported pipeline holds float32 weights that sample like any other."""
    output_dir = tmp_path / "bf16"
    run_training(tiny_training_args(tiny_preset, output_dir, mixed_precision="bf16", corruptions=["gaussian_noise"],
                                    corruption_p=0.5, snr_gamma=5.0))
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert len(metrics["loss_history"]) == 6 and all(math.isfinite(v) for v in metrics["loss_history"].values())
    assert all(math.isfinite(v) for v in metrics["validation_losses"].values())
    weights = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    images = RobustDDPMPipeline.from_pretrained(output_dir)(
        batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
