"""The training run in named phases: [`set_up`], [`resume`], [`run_steps`] (with a [`Checkpointer`] and a
[`Validator`]) and [`export`]. `train` calls them in that order; `training/train_robust_ddpm.py` is a thin `main()`."""

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader

from ..data.annotations import lowest_usable_sigma
from ..data.augment import AugmentPipeline
from ..data.datasets import ImageDataset, SkippedRecords, collate_image_batch, load_image_dataset, require_decodable
from ..data.splits import DatasetLike, HeldOutPlan, describe_source, plan_held_out
from ..data.units import to_model_range
from ..evaluation.images import make_grid, stack_images, upscale_for_display
from ..evaluation.losses import validation_losses
from ..evaluation.metrics import dataset_extras
from ..hub import prepare_hub_repo, push_pipeline_to_hub, write_model_card
from ..models import check_activation_memory, export_condition_embedding, export_unet
from ..output_folders import write_marker
from ..pipelines.pipeline_robust_ddpm import RobustDDPMPipeline
from ..pipelines.presets import build_pipeline_from_preset, resolve_preset
from ..schedulers import RobustDDIMScheduler, RobustDDPMScheduler
from ..schedulers.robust_options import ROBUST_OPTION_NAMES
from .checkpoints import (
    Checkpointer,
    NonFiniteLossError,
    TrainingPosition,
    apply_umask,
    checkpoints_dir,
    complete_checkpoints,
    staged_export,
)
from .config import TrainingConfig
from .distributed import parameter_checksum, step_seed
from .monitor import BestCheckpoint, few_images_warning, load_monitor_images, monitor_figures
from .objective import RobustDiffusionObjective
from .progress import StepProgress, quiet_third_party_logs
from .run_guard import (
    StepAbandoned,
    StopSignals,
    TrainingStopped,
    check_resume_config,
    prepare_fresh_output_dir,
    run_fingerprints,
    warn_changed_fingerprints,
)
from .setup import (
    build_dataloader,
    build_ema,
    build_lr_scheduler,
    build_model,
    build_objective,
    build_optimizer,
    build_scheduler,
    check_image_shape,
    fit_unet,
    resolve_image_shape,
    training_length,
)
from .summary import RunSummary

logger = get_logger(__name__, log_level="INFO")


class BadTrainingInput(ValueError):
    """Input refused before the first step (options, preset, data): reported as one line, exit code 2."""


@dataclass
class TrainingRun:
    """Everything [`set_up`] built: the prepared model, optimizer and data, the objective, and the run's length."""

    config: TrainingConfig
    accelerator: Accelerator
    scheduler: RobustDDPMScheduler
    model: torch.nn.Module  # prepared LabelConditionedUNet
    optimizer: torch.optim.Optimizer
    ema: EMAModel | None
    objective: RobustDiffusionObjective
    train_data: ImageDataset
    dataloader: DataLoader
    validation_images: torch.Tensor | None  # (N, C, H, W) in [-1, 1], on the device
    channels: int
    resolution: int
    max_train_steps: int
    num_epochs: int
    batches_per_epoch: int | None  # None for a stream
    effective_batch: int
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # built by `resume` (it depends on the start step)
    annotations: dict | None = None  # the training records' annotation summary (imperfect data), if annotated
    held_out_plan: HeldOutPlan | None = None  # where the held-out images come from
    train_source: Any = None  # config.dataset, or the Datasets object passed in its place
    started: float = field(default_factory=time.perf_counter)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class StepStats:
    """What the step loop measured, for the run summary."""

    lr: dict[int, float] = field(default_factory=dict)
    loss: dict[int, float] = field(default_factory=dict)
    validation: dict[int, dict[str, float]] = field(default_factory=dict)
    monitor: dict[int, dict[str, float]] = field(default_factory=dict)  # the memorisation monitor's figures per validation
    skipped: SkippedRecords = field(default_factory=SkippedRecords)
    images_seen_here: int = 0
    first_step_at: float | None = None  # `time.time()` at the end of this run's first optimizer step
    last_batch: tuple | None = None  # this process's last micro-batch: the objective's inputs, for `outputs_are_finite`


def set_up(config: TrainingConfig, accelerator: Accelerator, dataset: DatasetLike | None = None,
           validation_dataset: DatasetLike | None = None) -> TrainingRun:
    """Check the output folder, build the model, scheduler, objective, data and optimizer, and prepare them. Everything
    is checked before the first step, so bad input loses nothing. `dataset` / `validation_dataset`: Datasets objects
    that replace `config.dataset` / `config.validation_data`."""
    set_seed(config.seed)
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("mixed_precision fp16 needs a GPU (PyTorch has no fp16 autocast for CPU training); use bf16 or no")
    check_output_dir(config, accelerator)
    pipeline = build_pipeline_from_preset(config.pipeline, seed=config.seed)
    scheduler = build_scheduler(pipeline.scheduler, config)
    if config.num_inference_steps > scheduler.config.num_train_timesteps:  # else the first validation would crash
        raise ValueError(f"num_inference_steps {config.num_inference_steps} exceeds the preset's "
                         f"{scheduler.config.num_train_timesteps} training timesteps: pass at most that")
    channels, resolution = resolve_image_shape(pipeline.unet, config)
    check_activation_memory(pipeline.unet.config, config.train_batch_size, resolution, accelerator.device,
                            f"train_batch_size {config.train_batch_size} at resolution {resolution}",
                            advice="lower resolution or train_batch_size (gradient_accumulation_steps keeps the batch)")
    source = config.dataset if dataset is None else dataset
    held_out_plan = plan_held_out(source, config.dataset_split, config.validation_split,
                                  config.validation_data if validation_dataset is None else validation_dataset,
                                  config.validation_share, config.validation_holdout_seed)
    logger.info(held_out_plan.description)
    train_data = load_training_data(config, source, held_out_plan, channels, resolution, accelerator)
    annotations = check_annotated_data(config, train_data, scheduler)
    unet = fit_unet(pipeline.unet, channels, resolution, config.seed, config.dropout)
    unet, scheduler = prepare_missing_pixel_model(config, train_data, unet, scheduler, channels)
    if train_data.masked:
        annotations = {**(annotations or {}), "masked": sum(share < 1 for share in train_data.observed_shares),
                       "observed_share": sum(train_data.observed_shares) / len(train_data.observed_shares)}
    validation_images = load_validation_images(config, held_out_plan, channels, resolution, accelerator.device)
    require_decodable(train_data, f"{describe_source(source)} split '{config.dataset_split}'")
    if config.push_to_hub and accelerator.is_main_process:  # a bad token or endpoint fails now, not after training
        prepare_hub_repo(hub_repo_id(config), config.hub_private_repo)

    objective = build_objective(scheduler, config, train_data.label_dim, masked=unet.config.in_channels == 2 * channels)
    model = build_model(unet, objective, config, accelerator.device)
    optimizer = build_optimizer(model, config, accelerator.device)
    dataloader = build_dataloader(config, train_data, config.seed)
    if train_data.streaming:  # already split by rank; Accelerate must not shard it again
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    batches_per_epoch = None if train_data.streaming else len(dataloader)
    max_train_steps, num_epochs = training_length(config, batches_per_epoch)
    ema = build_ema(accelerator.unwrap_model(model), config, accelerator.device)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    return TrainingRun(config, accelerator, scheduler, model, optimizer, ema, objective, train_data, dataloader,
                       validation_images, channels, resolution, max_train_steps, num_epochs, batches_per_epoch,
                       effective_batch_size(config, train_data, accelerator.num_processes), annotations=annotations,
                       held_out_plan=held_out_plan, train_source=source)


def check_output_dir(config: TrainingConfig, accelerator: Accelerator) -> None:
    """Before anything is built: a resume must find the configuration the checkpoints depend on unchanged (changes of
    the rest are logged); a fresh run needs an empty (or `overwrite_output_dir`) folder. `latest` with no checkpoint
    yet starts a fresh run, as Diffusers' examples do, so one command serves the first run and every restart."""
    if config.resume_from_checkpoint == "latest" and not complete_checkpoints(config.output_dir):
        logger.info(f"resume_from_checkpoint=latest: {config.output_dir} holds no checkpoint yet, so a fresh run starts")
        config.resume_from_checkpoint = None
    if config.resume_from_checkpoint:
        for name, (first, now) in check_resume_config(config.output_dir, config).items():
            logger.info(f"resuming with {name} = {now!r} (the first run had {first!r})")
    elif accelerator.is_main_process:
        prepare_fresh_output_dir(config.output_dir, config.overwrite_output_dir)
    accelerator.wait_for_everyone()


def load_training_data(config: TrainingConfig, source: DatasetLike, held_out_plan: HeldOutPlan, channels: int,
                       resolution: int, accelerator: Accelerator) -> ImageDataset:
    """This rank's training records of `source` as `channels` x `resolution` images, less the held-out ones; a shape
    the preset does not take is refused unless the recipe set it."""
    world_size = accelerator.num_processes
    train_data = load_image_dataset(
        source, config.dataset_split, hold_out=held_out_plan.train_hold_out, streaming=config.streaming,
        image_column=config.image_column,
        channels=channels, resolution=resolution, center_crop=config.center_crop, augment=config.augment,
        seed=config.seed, shuffle_buffer=config.shuffle_buffer, rank=accelerator.process_index, world_size=world_size,
        num_shards=max(8, world_size * max(1, config.dataloader_num_workers)), annotations=config.annotations,
        noise_sigma=config.noise_sigma, annotations_required=config.annotations_required,
    )
    check_image_shape(config, train_data.stored_shapes, channels, resolution)
    return train_data


def load_validation_images(config: TrainingConfig, held_out_plan: HeldOutPlan, channels: int, resolution: int,
                           device: torch.device) -> torch.Tensor | None:
    """The first `validation_images` held-out images, `(N, C, H, W)` in [-1, 1] on `device`; None without a held-out
    source; `ValueError` when it holds no decodable image."""
    if held_out_plan.source is None:
        return None
    held_out = load_image_dataset(held_out_plan.source, held_out_plan.split, hold_out=held_out_plan.hold_out,
                                  image_column=config.image_column, channels=channels, resolution=resolution,
                                  seed=config.seed, annotations="ignore")
    loader = DataLoader(held_out.dataset, batch_size=256, collate_fn=collate_image_batch)
    images = stack_images((batch["pixel_values"] for batch in loader), config.validation_images).to(device)
    if images.shape[0] == 0:
        raise ValueError(f"{describe_source(held_out_plan.source)} split '{held_out_plan.split}' holds no decodable "
                         "image (the held-out images); fix it or set validation_split: null")
    return images


def effective_batch_size(config: TrainingConfig, train_data: ImageDataset, world_size: int) -> int:
    """Images per process per batch: `train_batch_size`, or fewer when the split is smaller than one batch per process
    (logged, since the recipe's LR was tuned for its batch)."""
    if train_data.streaming or len(train_data.dataset) >= config.train_batch_size * world_size:
        return config.train_batch_size
    effective = math.ceil(len(train_data.dataset) / world_size)
    logger.warning(f"train_batch_size {config.train_batch_size} x {world_size} process(es) exceeds the "
                   f"{len(train_data.dataset)} training images: batches hold {effective} images per process")
    return effective


# Options that assume clean training images (or change their noise), refused with noisy or restricted records.
CLEAN_DATA_OPTIONS = {
    "corruption_p": "corrupting an image with known noise breaks its noise model",
    "restoration_training": "it needs clean targets",
    "augment": "resampling augmentations change an image's noise level (flips and quarter turns are allowed)",
    "input_perturbation": "the noisy-data target assumes white noise",
    "offset_noise": "the noisy-data target assumes white noise",
    "pyramid_noise_discount": "the noisy-data target assumes white noise",
}


def check_annotated_data(config: TrainingConfig, train_data: ImageDataset, scheduler: RobustDDPMScheduler) -> dict | None:
    """With noisy or restricted training records: refuse options that contradict them and records no timestep can serve,
    and set the scheduler's `sampling_stop_sigma` to the lowest level the data can teach (noisy-only data). Returns the
    annotation summary (None without annotations)."""
    summary = train_data.annotation_summary(config.noisy_data_max_weight)
    if summary is None or summary.clean == summary.records:
        return summary.to_dict() if summary is not None else None
    for name, why in CLEAN_DATA_OPTIONS.items():
        if name == "augment" and config.augment is not None and AugmentPipeline.from_file(config.augment).permutes_pixels_only:
            continue
        if getattr(config, name) not in (None, False, 0, 0.0):
            raise ValueError(f"{name} is set, but {summary.records - summary.clean} training records are noisy or "
                             f"restricted (annotations): {why}. Turn {name} off, or train without annotations")
    top = float(scheduler.noise_levels()[-1]) / 2
    usable = [lowest_usable_sigma(n, m, config.noisy_data_max_weight)
              for n, m in zip(train_data.annotations["noise_sigma"], train_data.annotations["sigma_min"], strict=True)]
    worst = max(range(len(usable)), key=usable.__getitem__)
    if usable[worst] >= top:
        raise ValueError(f"{train_data.transform.name}[{worst}]: its noise level ({usable[worst]:.3g} usable from) lies above "
                         f"the schedule's top level {top:.3g} ([0, 1] units): no timestep can use it; lower its "
                         "noise_sigma / sigma_min or drop the record")
    stop = max(config.sampling_stop_sigma, summary.lowest_trusted_sigma)
    if stop != scheduler.config.sampling_stop_sigma:
        scheduler.register_to_config(sampling_stop_sigma=stop)
        logger.info(f"noisy-only training data: sampling stops at noise std {stop:.4g} ([0, 1] units), the lowest level "
                    "the data can teach, and returns the clean estimate there")
    levels = LEVEL_SOURCES["auto" if config.annotations == "auto" else "one" if config.noise_sigma is not None else "given"]
    logger.info(f"training records: {summary.clean} clean, {summary.noisy} noisy ({levels}), {summary.restricted} "
                "restricted")
    return {**summary.to_dict(), "levels": levels}


# How the noise levels of noisy training records were obtained: the run summary, the log and the model card say it.
LEVEL_SOURCES = {"auto": "levels estimated per image (annotations: auto)", "one": "one level given for every image",
                 "given": "levels given by the data's annotations"}


def prepare_missing_pixel_model(config: TrainingConfig, train_data: ImageDataset, unet: UNet2DModel,
                                scheduler: RobustDDPMScheduler, channels: int) -> tuple[UNet2DModel, RobustDDPMScheduler]:
    """Records with masks of observed pixels: the UNet must take `(seen pixels, their mask)` (`2C` channels; a preset's
    `C`-channel UNet is rebuilt so from its config, freshly initialised), predict the clean image, and the scheduler
    records the share of pixels to show at sampling (`sampling_observed_share`). Options that contradict masks are
    refused. Returns the UNet and scheduler to train (unchanged without masks)."""
    if not train_data.masked:
        return unet, scheduler
    for name, why in {**CLEAN_DATA_OPTIONS, "augment": "augmentations move pixels but not their masks"}.items():
        if getattr(config, name) not in (None, False, 0, 0.0):
            raise ValueError(f"{name} is set, but the training records carry masks of missing pixels: {why}. Turn "
                             f"{name} off, or train without annotations (annotations: ignore)")
    summary = train_data.annotation_summary(config.noisy_data_max_weight)
    if summary is not None and summary.clean != summary.records:
        raise ValueError("records carry both masks and noise levels (noise_sigma / sigma_min / sigma_max): training on "
                         "missing pixels and on noisy images at once is not supported; annotate one of the two")
    if config.prediction_type not in (None, "sample"):
        raise ValueError(f"missing-pixel training predicts the clean image (prediction_type: sample); got "
                         f"prediction_type: {config.prediction_type}")
    if unet.config.in_channels == channels:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            unet = UNet2DModel.from_config({**unet.config, "in_channels": 2 * channels})
        logger.info(f"masked records: the UNet takes the seen pixels and their mask ({2 * channels} channels)")
    share = sum(train_data.observed_shares) / len(train_data.observed_shares) * (1 - config.further_mask_p)
    scheduler = RobustDDPMScheduler.from_config(scheduler.config, prediction_type="sample", sampling_observed_share=share)
    logger.info(f"masked records: {share:.3f} of the pixels observed on average, after hiding {config.further_mask_p} "
                "further; the model predicts the clean image and samples seeing that share")
    return unet, scheduler


def resume(run: TrainingRun, checkpointer: Checkpointer) -> TrainingPosition:
    """Load the checkpoint the config names (if any) and build the LR schedule from its step; returns the start."""
    config = run.config
    position = TrainingPosition(step=0, epoch=0, batches_consumed=0)
    if config.resume_from_checkpoint:
        path, position = checkpointer.resume(config.resume_from_checkpoint)
        if run.is_main_process:
            warn_changed_fingerprints(path, checkpointer.resumed_metadata.get("fingerprints"), checkpointer.fingerprints)
        if not run.train_data.streaming:
            position.epoch = position.batches_consumed // run.batches_per_epoch
        logger.info(f"resumed from {path} at step {position.step}")
    run.lr_scheduler = build_lr_scheduler(config, run.optimizer, run.max_train_steps, start_step=position.step)
    if run.is_main_process:
        os.makedirs(os.path.join(config.output_dir, "samples"), exist_ok=True)
        if not config.resume_from_checkpoint:  # a resumed run keeps the first run's config (changes are logged)
            with open(os.path.join(config.output_dir, "training_config.yaml"), "w", encoding="utf-8") as handle:
                handle.write(config.to_yaml())
        tracker_config = {k: (str(v) if isinstance(v, list | type(None)) else v) for k, v in config.to_dict().items()}
        run.accelerator.init_trackers("diffusers-robust", config=tracker_config)
    return position


@dataclass
class FinalValidation:
    """The run's last validation: its `step`, the sampling `pipeline` it built from the EMA weights (the export saves
    it: the same weights), and whether its samples and held-out losses were finite (then no probe is needed)."""

    step: int
    pipeline: RobustDDPMPipeline
    outputs_finite: bool


class Validator:
    """Validation of the EMA weights on the main process: held-out losses (clean, corrupted, restoration) and a sample
    grid (`samples/step-<n>.png`, TensorBoard); and the sampling pipeline that export saves."""

    def __init__(self, run: TrainingRun, stats: StepStats):
        self.run, self.stats = run, stats
        config = run.config
        self.corruptions = config.validation_corruptions if config.validation_corruptions is not None else config.corruptions
        self.monitor_images = None  # as many training images as held-out ones: the monitor's training side
        self.best = None  # keep_best: the best validation's pipeline so far
        self.final: FinalValidation | None = None  # the run's last validation, whose pipeline the export saves
        if config.keep_best and run.is_main_process:
            self.best = BestCheckpoint(config.output_dir, config.resume_from_checkpoint is not None)
        if run.validation_images is not None and run.is_main_process:
            self.monitor_images = load_monitor_images(config, run.train_source, run.held_out_plan, run.channels,
                                                      run.resolution, run.validation_images.shape[0], run.accelerator.device)

    def sampling_pipeline(self) -> RobustDDPMPipeline:
        """The current weights as a pipeline: plain UNet, DDIM sampler, and (restoration training) the label embedding."""
        run = self.run
        unwrapped = run.accelerator.unwrap_model(run.model)
        unet = export_unet(unwrapped).to(run.accelerator.device).eval()
        embedding = None
        if run.config.restoration_training:  # kept so the pipeline can ask for restoration with the training labels
            embedding = export_condition_embedding(unwrapped, run.objective.label_names).to(run.accelerator.device).eval()
        return RobustDDPMPipeline(unet=unet, scheduler=RobustDDIMScheduler.from_config(run.scheduler.config),
                                  condition_embedding=embedding)

    def __call__(self, step: int, final: bool = False) -> dict[str, float]:
        """Validate the EMA weights at `step`; `final`: the run's last validation, whose pipeline (and whether its
        outputs were finite) `self.final` keeps for the export."""
        run, config = self.run, self.run.config
        losses = {}
        if run.ema is not None:
            run.ema.store(run.model.parameters())
            run.ema.copy_to(run.model.parameters())
        if run.is_main_process:
            unwrapped = run.accelerator.unwrap_model(run.model).eval()
            if run.validation_images is not None:
                device = run.accelerator.device
                losses = validation_losses(
                    run.objective.full_view(unwrapped), run.scheduler, run.validation_images, self.corruptions,
                    config.validation_severities,
                    labels_for=lambda name, severity, batch: run.objective.restoration_labels(name, severity, batch, device),
                )
            sampler = self.sampling_pipeline()
            sampler.set_progress_bar_config(disable=True)
            samples = sampler(batch_size=config.num_grid_images, generator=torch.Generator().manual_seed(config.seed),
                              num_inference_steps=config.num_inference_steps, output_type="np").images
            make_grid(samples, gap=2).save(os.path.join(config.output_dir, "samples", f"step-{step}.png"))
            if final:
                finite = bool(np.isfinite(samples).all()) and all(math.isfinite(value) for value in losses.values())
                self.final = FinalValidation(step, sampler, finite)
            run.accelerator.log({f"validation/{k}": v for k, v in losses.items()}, step=step)
            for tracker in run.accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_images("samples", upscale_for_display(samples), step, dataformats="NHWC")
            self.stats.validation[step] = losses
            if losses:
                shown = ", ".join(f"{name} {value:.4f}" for name, value in losses.items())
                logger.info(f"validation at step {step} ({run.validation_images.shape[0]} held-out images): {shown}")
                self.monitor(step, unwrapped, losses["clean"], to_model_range(torch.from_numpy(samples).permute(0, 3, 1, 2)))
                self.keep_if_best(step, losses["clean"], sampler)
            unwrapped.train()
        if run.ema is not None:
            run.ema.restore(run.model.parameters())
        run.accelerator.wait_for_everyone()
        return losses

    def monitor(self, step: int, unwrapped: torch.nn.Module, held_out_loss: float, samples: torch.Tensor) -> None:
        """The memorisation monitor (`training.monitor.monitor_figures`): logged as a line and to the trackers, kept for
        `metrics.json`. `samples`: the grid `(S, C, H, W)` in `[-1, 1]`."""
        if self.monitor_images is None or self.monitor_images.shape[0] == 0:
            return
        run = self.run
        figures = monitor_figures(run.objective.full_view(unwrapped), run.scheduler, run.validation_images,
                                  self.monitor_images, held_out_loss, samples)
        self.stats.monitor[step] = figures
        run.accelerator.log({f"monitor/{k}": v for k, v in figures.items()}, step=step)
        logger.info(f"monitor at step {step}: generalisation gap {figures['generalisation_gap']:+.4f} (held-out clean "
                    f"loss minus the same on {self.monitor_images.shape[0]} training images, {figures['train_loss']:.4f}); "
                    f"{figures['memorisation_share']:.0%} of {samples.shape[0]} grid samples nearer a training image than "
                    f"95% of held-out images are (about 5% without copying), median distance "
                    f"{figures['memorisation_distance_ratio']:.2f}x the held-out images' own")

    def keep_if_best(self, step: int, clean_loss: float, sampler: RobustDDPMPipeline) -> None:
        """`keep_best`: save the current (EMA) weights as `output_dir/best` when `clean_loss` is the lowest so far."""
        pipeline = RobustDDPMPipeline(unet=sampler.unet, scheduler=self.run.scheduler,
                                      condition_embedding=sampler.condition_embedding)
        if self.best is not None and self.best.offer(step, clean_loss, pipeline):
            logger.info(f"best so far: step {step} (held-out clean loss {clean_loss:.4f}), saved to "
                        f"{self.best.folder}")


def run_steps(
    run: TrainingRun, start: TrainingPosition, checkpointer: Checkpointer, validate: Validator, stats: StepStats,
    signals: StopSignals | None = None,
) -> TrainingPosition:
    """The step loop, from `start` to `max_train_steps`: one objective call, backward and optimizer step per micro-batch,
    LR and EMA per optimizer step, periodic checkpoints and validation. Returns where it ended. A stop request drops the
    step in progress and saves the last completed one (`stop_at_last_completed_step`)."""
    config, accelerator = run.config, run.accelerator
    step, epoch, batches_consumed = start.step, start.epoch, start.batches_consumed
    batches_to_skip = 0 if run.train_data.streaming else batches_consumed - epoch * run.batches_per_epoch
    progress = StepProgress(run.max_train_steps, step, enabled=accelerator.is_local_main_process)
    parameters = list(run.model.parameters())  # one list for clipping and EMA, not a module walk per step
    run.model.train()
    loop_started, last_validation = time.perf_counter(), -1
    checkpointer.mark_completed(start)
    try:
        while step < run.max_train_steps and epoch < run.num_epochs:
            run.train_data.set_epoch(epoch)
            batches = run.dataloader
            if not run.train_data.streaming:
                run.dataloader.set_epoch(epoch)
                if batches_to_skip:  # skipped by the sampler: the records are never read or decoded
                    batches = accelerator.skip_first_batches(run.dataloader, batches_to_skip)
                    batches_to_skip = 0
            for batch in batches:
                gathered_loss = train_micro_batch(run, batch, batches_consumed, step, parameters, stats, checkpointer,
                                                  signals)
                batches_consumed += 1
                if not accelerator.sync_gradients:
                    continue
                stats.lr[step + 1] = run.lr_scheduler.get_last_lr()[0]
                run.lr_scheduler.step()
                if run.ema is not None:
                    run.ema.step(parameters)
                step += 1
                checkpointer.mark_completed(checkpointer.position(step, epoch, batches_consumed))
                log_step(run, stats, step, gathered_loss.mean().item(), loop_started, progress)
                if step == run.max_train_steps:  # no next loss will vouch for these weights: a probe does
                    require_finite_outputs(run, stats.last_batch, f"at step {step}", checkpointer.resume_hint)
                    checkpointer.save(checkpointer.position(step, epoch, batches_consumed), in_background=True)
                elif step % config.checkpointing_steps == 0:  # written once the next loss, on these weights, is finite
                    checkpointer.defer(checkpointer.position(step, epoch, batches_consumed))
                if step % config.validation_steps == 0 or step == run.max_train_steps:
                    validate(step, final=step == run.max_train_steps)
                    last_validation = step
                if step >= run.max_train_steps:
                    break
            epoch += 1
    except StepAbandoned as abandoned:
        progress.close()
        stop_at_last_completed_step(run, checkpointer, stats, signals, abandoned.vouched)
    progress.close()
    end = checkpointer.position(step, epoch, batches_consumed)
    if checkpointer.last_saved_step != step:
        if stats.last_batch is not None:
            require_finite_outputs(run, stats.last_batch, f"at step {step}", checkpointer.resume_hint)
        checkpointer.save(end, in_background=True)
    if last_validation != step:
        validate(step, final=True)
    return end


def train_micro_batch(run: TrainingRun, batch: dict, batches_consumed: int, step: int, parameters: list,
                      stats: StepStats, checkpointer: Checkpointer, signals: StopSignals | None) -> torch.Tensor:
    """One micro-batch: the objective's loss on it (noise and dropout seeded by rank and position), backward, clipping
    and the optimizer step (Accelerate applies them once per accumulation window). A batch whose records were all bad
    trains a zero-weight dummy so ranks stay in step. One collective carries every rank's loss and whether it was asked
    to stop. Returns the gathered losses `(world_size,)`; `NonFiniteLossError` on a non-finite loss (nothing is saved:
    the weights have diverged); `StepAbandoned` before the optimizer step when a stop was requested: on any rank, seen
    in that collective, or in a single process at once (the forward and backward passes change no saved state)."""
    config, accelerator = run.config, run.accelerator
    alone = signals is not None and accelerator.num_processes == 1
    stats.skipped.update(batch)
    rank = accelerator.process_index
    generator = torch.Generator().manual_seed(step_seed(config.seed, rank, batches_consumed))
    torch.manual_seed(step_seed(config.seed + 1, rank, batches_consumed))  # dropout
    images = batch["pixel_values"].to(accelerator.device, non_blocking=True)
    labels = batch["augment_labels"].to(accelerator.device, non_blocking=True)
    valid = images.shape[0] > 0
    if valid:
        extras = (batch["noise_sigmas"], batch["sigma_max"], batch["observed"].to(accelerator.device, non_blocking=True))
    else:
        images = torch.zeros(1, run.channels, run.resolution, run.resolution, device=accelerator.device)
        labels = torch.zeros(1, labels.shape[1], device=accelerator.device)
        extras = (None, None, None)
    stats.last_batch = (images, labels, *extras)
    with accelerator.accumulate(run.model):
        with _abandoning(signals, alone):
            loss = run.objective(run.model, images, labels, generator, *extras).loss.mean() * float(valid)
            stop_here = float(signals is not None and signals.requested is not None)
            gathered = accelerator.gather(torch.stack([loss.detach().float(), loss.new_tensor(stop_here)]).reshape(1, 2))
            if not torch.isfinite(gathered[:, 0]).all():
                raise NonFiniteLossError(f"the training loss became {gathered[:, 0].tolist()} at step {step + 1}. "
                                         f"{checkpointer.resume_hint()}")
        if gathered[:, 1].any():  # every rank sees it here: all save the last completed step together
            raise StepAbandoned(vouched=True)
        checkpointer.confirm()  # the deferred checkpoint's weights just gave a finite loss
        try:
            with _abandoning(signals, alone, early_save=lambda: save_early(checkpointer)):
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
        except StepAbandoned:
            raise StepAbandoned(vouched=True) from None  # this micro-batch's finite loss was on the current weights
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    stats.images_seen_here += int(valid) * batch["pixel_values"].shape[0]
    return gathered[:, 0]


# Images of the last batch whose loss vouches for the weights a stop saves (a full batch can take longer than a launcher
# waits between its SIGTERM and its SIGKILL).
STOP_PROBE_IMAGES = 8


def first_images(batch: tuple, count: int) -> tuple:
    """The first `count` images of a `StepStats.last_batch` tuple, with their per-image extras."""
    size = batch[0].shape[0]
    return tuple(item[:count] if isinstance(item, torch.Tensor) and item.ndim and item.shape[0] == size else item
                 for item in batch)


def _abandoning(signals: StopSignals | None, enabled: bool, early_save=None):
    return signals.abandoning(enabled, early_save) if signals is not None else contextlib.nullcontext()


def save_early(checkpointer: Checkpointer) -> None:
    """On the signal watcher thread, during a backward pass (which changes no saved state, and whose loss was finite on
    these weights): save the last completed step now, before a launcher's kill can come."""
    if checkpointer.completed_step and checkpointer.completed_step != checkpointer.last_saved_step:
        saved = checkpointer.save_completed()
        logger.warning(f"saved {saved} (step {checkpointer.completed_step}, the last completed) while the step in "
                       "progress finishes; that step is dropped")


def stop_at_last_completed_step(run: TrainingRun, checkpointer: Checkpointer, stats: StepStats,
                                signals: StopSignals | None, vouched: bool) -> None:
    """After a stop request dropped the step in progress: save the last completed step (unless it is saved already or
    no step was made), with a probe of its weights' loss first unless a finite loss on them was computed (`vouched`);
    then raise `TrainingStopped`."""
    completed = checkpointer.completed_step
    if not completed:
        where = "no step was completed, nothing to save"
    elif completed == checkpointer.last_saved_step:
        where = f"saved {os.path.join(checkpoints_dir(run.config.output_dir), f'checkpoint-{completed}')}"
    else:
        if not vouched and stats.last_batch is not None:  # a few images: the probe must fit in a launcher's grace
            require_finite_outputs(run, first_images(stats.last_batch, STOP_PROBE_IMAGES), f"at step {completed}",
                                   checkpointer.resume_hint)
        where = f"saved {checkpointer.save_completed()}"
    stop_with_checkpoint(where, completed or 0, signals)


def log_step(run: TrainingRun, stats: StepStats, step: int, mean_loss: float, loop_started: float,
             progress: StepProgress) -> None:
    """Record optimizer step `step`'s mean loss (over ranks) and log it with the LR, throughput (images/s over all
    ranks since the loop started) and skipped records."""
    stats.first_step_at = stats.first_step_at or time.time()
    stats.loss[step] = mean_loss
    throughput = stats.images_seen_here * run.accelerator.num_processes / (time.perf_counter() - loop_started)
    run.accelerator.log({"train/loss": mean_loss, "train/lr": stats.lr[step], "train/images_per_second": throughput,
                         "train/skipped_records": stats.skipped.count}, step=step)
    progress.update(step, mean_loss, throughput)


def stop_with_checkpoint(saved: str, step: int, signals: StopSignals | None) -> None:
    """Raise `TrainingStopped` after the stopping save (`saved`: "saved <folder>" or why nothing was): with this rank's
    signal and exit code, or SIGTERM's when another rank was signalled."""
    here = signals is not None and signals.requested is not None
    name, code = (signals.requested, signals.exit_code) if here else ("SIGTERM", 128 + signal.SIGTERM)
    raise TrainingStopped(f"stopped by {name} at step {step}; {saved}. Resume with --resume_from_checkpoint latest", code)


# Images of the last batch on which `outputs_are_finite` probes the weights: broken weights (NaN, Inf, blown up) give a
# non-finite loss on any image, and the probe runs at the end of every run (before the final checkpoint). On the
# CIFAR-10 preset, batch 16, one thread, the whole batch cost 1.5 s per probe; 2 images 0.22 s.
FINITE_PROBE_IMAGES = 1


def outputs_are_finite(run: TrainingRun, batch: tuple) -> bool:
    """Whether the current weights give a finite loss on the first `FINITE_PROBE_IMAGES` images of `batch`
    (`StepStats.last_batch`), with noise from a fixed seed, on every rank (a collective: all ranks call it)."""
    model = run.accelerator.unwrap_model(run.model)
    probe = tuple(part[:FINITE_PROBE_IMAGES] if torch.is_tensor(part) else part for part in batch)
    with torch.no_grad():
        loss = run.objective(model, probe[0], probe[1], torch.Generator().manual_seed(0), *probe[2:]).loss
    finite = torch.tensor([float(torch.isfinite(loss).all())], device=run.accelerator.device)
    return bool(run.accelerator.gather(finite).all())


def require_finite_outputs(run: TrainingRun, batch: tuple, where: str, resume_hint) -> None:
    """`NonFiniteLossError` unless the weights' loss on `batch` is finite on every rank: the last and the stopping
    save have no next step whose loss would vouch for them."""
    if not outputs_are_finite(run, batch):
        raise NonFiniteLossError(f"the weights give a non-finite loss {where}; not saving them. {resume_hint()}")


def seconds_since_process_start(moment: float | None) -> float | None:
    """Seconds from this process's start (imports included) to `moment` (`time.time()`); None if not known."""
    if moment is None:
        return None
    import psutil

    return moment - psutil.Process().create_time()


def hub_repo_id(config: TrainingConfig) -> str:
    """`hub_model_id`, or the output folder's name."""
    return config.hub_model_id or os.path.basename(os.path.normpath(config.output_dir))


def export(run: TrainingRun, end: TrainingPosition, stats: StepStats, validate: Validator,
           signals: StopSignals | None = None) -> RunSummary | None:
    """Save the EMA weights as a pipeline, then (main process) the final grid, the held-out report, `metrics.json`,
    the model card, and the Hub upload. Returns the run summary on the main process.

    The export is staged in `output_dir/.export.tmp` and swapped in when complete, so a full disk, a crash or a stop
    request leaves the previous export whole; weights whose samples or held-out losses at the run's last validation
    (`Validator.final`, whose pipeline it saves) were not finite are not exported."""
    config, accelerator = run.config, run.accelerator
    # Cross-rank facts for the record: what each rank trained on and whether the weights agree.
    per_rank = accelerator.gather(torch.tensor([stats.images_seen_here, float(stats.skipped.count)],
                                               device=accelerator.device).reshape(1, 2))
    checksums = None
    if accelerator.num_processes > 1:
        local = parameter_checksum(accelerator.unwrap_model(run.model))
        checksums = accelerator.gather(torch.tensor([local], dtype=torch.float64, device=accelerator.device)).tolist()
    summary = None
    if accelerator.is_main_process:
        if not validate.final.outputs_finite:  # the run's last validation, on the weights exported here
            raise NonFiniteLossError(f"the {'EMA ' if run.ema is not None else ''}weights gave non-finite samples or "
                                     "held-out losses at the last validation; nothing was exported")
        saved = f"checkpoint-{end.step} is saved"
        with _interrupting(signals, f"during the export ({saved}; the previous export is unchanged): run again with "
                                    "--resume_from_checkpoint latest to export"):
            with staged_export(config.output_dir) as folder:
                summary = write_export(run, end, stats, validate, folder, [int(v) for v in per_rank[:, 0].tolist()],
                                       checksums)
        logger.info(f"wrote the pipeline, samples, metrics.json and README.md to {config.output_dir}")
        if config.push_to_hub:
            repo_id = hub_repo_id(config)
            with _interrupting(signals, f"during the Hub upload ({saved}, the pipeline is exported): upload it with "
                                        f"diffusers-robust push {config.output_dir} --hub_model_id {repo_id}"):
                push_pipeline_to_hub(config.output_dir, repo_id, private=config.hub_private_repo)
            logger.info(f"pushed the pipeline to {repo_id}")
    accelerator.wait_for_everyone()
    return summary


def _interrupting(signals: StopSignals | None, where: str):
    return signals.interrupting(where) if signals is not None else contextlib.nullcontext()


def write_export(run: TrainingRun, end: TrainingPosition, stats: StepStats, validate: Validator, folder: str,
                 images_seen_per_rank: list[int], checksums: list | None) -> RunSummary:
    """Main process: write the pipeline, `samples/final.png`, the held-out report, `metrics.json` and the model card
    into `folder`; returns the run summary."""
    config = run.config
    sampler = validate.final.pipeline  # the last validation's, on the same weights
    sampler.set_progress_bar_config(disable=True)
    RobustDDPMPipeline(unet=sampler.unet, scheduler=run.scheduler, condition_embedding=sampler.condition_embedding
                       ).save_pretrained(folder, safe_serialization=True)
    apply_umask(folder)
    # The last validation sampled this grid from the same EMA weights and seed: reuse it.
    os.makedirs(os.path.join(folder, "samples"))
    shutil.copyfile(os.path.join(config.output_dir, "samples", f"step-{end.step}.png"),
                    os.path.join(folder, "samples", "final.png"))
    summary = RunSummary(
        global_step=end.step,
        images_seen=sum(images_seen_per_rank),
        images_seen_per_rank=images_seen_per_rank,
        num_processes=run.accelerator.num_processes,
        train_batch_size_effective=run.effective_batch,
        mixed_precision=run.accelerator.mixed_precision,
        resolution=run.resolution,
        skipped_records=stats.skipped.count,
        skipped_record_ids=stats.skipped.ids,
        records_decoded_this_run=run.train_data.transform.records_decoded if config.dataloader_num_workers == 0 else None,
        parameter_checksums_per_rank=checksums,
        lr_history=stats.lr,
        loss_history=stats.loss,
        validation_losses=stats.validation.get(end.step) or {},
        validation_history=stats.validation,
        monitor_history=stats.monitor or None,
        best=validate.best.record if validate.best is not None else None,
        validation_images=0 if run.validation_images is None else int(run.validation_images.shape[0]),
        scheduler_robust_options={k: run.scheduler.config[k] for k in ("prediction_type", *ROBUST_OPTION_NAMES)},
        training_wall_time_seconds=time.perf_counter() - run.started,
        seconds_to_first_step=seconds_since_process_start(stats.first_step_at),
        annotations=run.annotations,
        held_out={**run.held_out_plan.summary(), "images": int(run.validation_images.shape[0])}
        if run.validation_images is not None else None,
    )
    extras = dataset_extras(config.dataset)
    if config.quality_samples > 0 and extras is not None:  # the config refuses quality_samples without extras
        samples = sampler(batch_size=config.quality_samples, generator=torch.Generator().manual_seed(config.seed + 1),
                          num_inference_steps=config.num_inference_steps, output_type="np").images
        summary.sample_quality = {"samples": config.quality_samples, "scorer": extras.scorer,
                                  **extras.sample_quality(samples, extras.classifier())}
    repo_id = hub_repo_id(config)
    if config.report and run.validation_images is not None:  # the held-out report of `diffusers-robust evaluate`
        from ..evaluation.defaults import restoration_cases
        from ..evaluation.report import evaluate_pipeline, write_report

        plan = run.held_out_plan
        report = evaluate_pipeline(sampler, plan.source, plan.split, config.dataset_split, config.report_images,
                                   config.report_samples, config.num_inference_steps, hold_out=plan.hold_out,
                                   cases=restoration_cases(config.report_full), train_dataset=run.train_source)
        write_report(report, os.path.join(folder, "evaluation"), title=f"Evaluation of {repo_id}")
        write_marker(os.path.join(folder, "evaluation"), "train")  # `evaluate --overwrite` may replace it
        summary.report = {key: value for key, value in report.items() if not key.startswith("_")}
    summary.save(folder)
    write_model_card(folder, repo_id, config.to_dict(), summary, config.license)
    return summary


def train(config: TrainingConfig, accelerator: Accelerator, signals: StopSignals | None = None,
          dataset: DatasetLike | None = None, validation_dataset: DatasetLike | None = None) -> RunSummary | None:
    """One training run: set up, resume, the step loop, export. Returns the run summary on the main process.
    `dataset` / `validation_dataset`: Datasets objects in place of `config.dataset` / `config.validation_data`."""
    try:
        run = set_up(config, accelerator, dataset, validation_dataset)
        if config.keep_best and run.validation_images is None:
            raise ValueError("keep_best chooses by the held-out loss, and this run holds no images out: set "
                             "validation_split, validation_data or validation_share")
        stats = StepStats()
        validate = Validator(run, stats)  # loads the monitor's training images; keep_best checks output_dir/best
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise BadTrainingInput(str(error)) from error
    stream_loader = run.dataloader if run.train_data.streaming else None
    annotations = config.annotations if config.annotations not in ("auto", "ignore") else None
    fingerprints = run_fingerprints(resolve_preset(config.pipeline), {
        "dataset": config.dataset, "validation_data": config.validation_data, "annotations": annotations})
    checkpointer = Checkpointer(accelerator, run.model, config.output_dir, config.checkpoints_total_limit, stream_loader,
                                fingerprints)
    images_per_step = run.effective_batch * accelerator.num_processes * config.gradient_accumulation_steps
    warning = few_images_warning(run.train_data, run.max_train_steps, images_per_step, run.validation_images is not None)
    if warning:
        logger.warning(warning)
    start = resume(run, checkpointer)
    try:
        end = run_steps(run, start, checkpointer, validate, stats, signals)
        return export(run, end, stats, validate, signals)
    finally:
        checkpointer.wait()  # the last checkpoint, completed while the run validated and exported, is in place



def main(argv: list[str] | None = None) -> None:
    """`accelerate launch training/train_robust_ddpm.py [--config recipe.yaml] [--option value ...]`; a bad recipe or
    option is one line on stderr and exit code 2."""
    from .config import parse_training_config

    try:
        config = parse_training_config(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}".splitlines()[0], file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    run_training(config)


def acquire_output_lock(lock, output_dir: str) -> None:
    """Take the output folder's lock; a folder that cannot hold one (read-only, `/dev/null`, a `.lock` that is a folder
    or a dangling link) is `BadTrainingInput` naming it, before anything else is written."""
    try:
        lock.acquire()
    except OSError as error:
        what = error.strerror or type(error).__name__
        raise BadTrainingInput(f"cannot write the output_dir {output_dir} (its lock file {lock.path}: {what}); "
                               "name a folder this process can write") from None


def run_training(config: TrainingConfig, dataset: DatasetLike | None = None,
                 validation_dataset: DatasetLike | None = None) -> None:
    """Run `config` in this process (one of several under `accelerate launch`): hold the output folder's lock, handle
    SIGTERM / SIGINT (exit 128 + signal after a checkpoint), train, and shut the process group down cleanly.

    `dataset` / `validation_dataset`: a `datasets.Dataset`, `DatasetDict` or `IterableDataset` to train on (and to hold
    out) in place of `config.dataset` / `config.validation_data`; the config records their fingerprints."""
    import logging
    import traceback

    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    from .distributed import set_thread_count, shutdown_distributed, warn_if_launcher_dropped_processes
    from .run_guard import OutputDirBusy, OutputDirLock

    if dataset is not None or validation_dataset is not None:  # what the saved config and a resume check compare
        config = dataclasses.replace(config, dataset=describe_source(dataset) or config.dataset,
                                     validation_data=describe_source(validation_dataset) or config.validation_data)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.logger == "none" else config.logger,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    quiet_third_party_logs()
    set_thread_count(config.num_threads, accelerator.num_processes if accelerator.device.type == "cpu" else 1)
    warn_if_launcher_dropped_processes(accelerator.num_processes, accelerator.device.type)
    signals = StopSignals().install()
    created = not os.path.exists(config.output_dir)  # removed again if the run stops before its first step
    lock = OutputDirLock(config.output_dir)
    try:
        if accelerator.is_main_process:
            acquire_output_lock(lock, config.output_dir)  # one writer per output_dir
        train(config, accelerator, signals, dataset, validation_dataset)
    except TrainingStopped as stopped:
        traceback.clear_frames(stopped.__traceback__)
        logger.error(str(stopped))
        raise SystemExit(stopped.exit_code) from None
    except OutputDirBusy as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except NonFiniteLossError as error:  # the run diverged: one line naming the checkpoint to resume from
        traceback.clear_frames(error.__traceback__)
        print(f"error: {error}".splitlines()[0], file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except BadTrainingInput as error:  # one line and exit code 2, like the CLI; DIFFUSERS_ROBUST_DEBUG=1 shows the trace
        if os.environ.get("DIFFUSERS_ROBUST_DEBUG"):
            raise
        traceback.clear_frames(error.__traceback__)
        print(f"error: {error}".splitlines()[0], file=sys.stderr, flush=True)
        if created and accelerator.is_main_process:  # nothing was trained: leave no empty output folder behind
            lock.release()
            shutil.rmtree(config.output_dir, ignore_errors=True)
        raise SystemExit(2) from None
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)  # the failed run's locals (its DDP model) go before the group
        raise
    finally:
        lock.release()
        signals.uninstall()
        shutdown_distributed(accelerator)
