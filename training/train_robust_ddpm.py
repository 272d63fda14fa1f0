#!/usr/bin/env python
"""Train a robust unconditional DDPM with Accelerate.

    accelerate launch training/train_robust_ddpm.py --config training/configs/digits.yaml [--option value ...]

Every option is listed by `--help` and documented in the README. The loop is thin: the pieces it calls live
in `diffusers_robust` and are tested there.
"""

import json
import logging
import math
import os
import shutil
import signal
import time
import traceback

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from tqdm.auto import tqdm

from diffusers_robust import RobustDDIMScheduler, RobustDDPMPipeline, build_pipeline_from_preset
from diffusers_robust.checkpoints import (
    apply_umask,
    begin_checkpoint,
    complete_checkpoints,
    explain_full_disk,
    finish_checkpoint,
    read_checkpoint_metadata,
    resolve_checkpoint,
    temporary_checkpoint_path,
)
from diffusers_robust.corruptions import RandomCorruption, canonical_name
from diffusers_robust.data import SkippedRecords, collate_image_batch, load_image_dataset, require_decodable
from diffusers_robust.evaluation import digits_quality, make_grid, stack_images, validation_losses
from diffusers_robust.hub import prepare_hub_repo, push_pipeline_to_hub, write_model_card
from diffusers_robust.losses import min_snr_weights, weighted_mse
from diffusers_robust.models import AugmentConditionedUNet, export_condition_embedding, export_unet
from diffusers_robust.report import evaluate_pipeline, write_report
from diffusers_robust.run_guard import OutputDirLock, StopSignals, check_resume_config, prepare_fresh_output_dir
from diffusers_robust.trainer import (
    ROBUST_SCHEDULER_OPTIONS,
    configure_scheduler,
    load_stream_position,
    parameter_checksum,
    resolve_image_shape,
    save_stream_position,
    shutdown_distributed,
    step_seed,
    training_length,
)
from diffusers_robust.training_config import TrainingConfig, parse_training_config

logger = get_logger(__name__, log_level="INFO")


class NonFiniteLossError(RuntimeError):
    pass


class TrainingStopped(RuntimeError):
    """SIGTERM / SIGINT: the run stopped at a step boundary after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def resume_hint(config: TrainingConfig) -> str:
    """What to do after a diverged run: name the newest checkpoint saved while the loss was finite."""
    saved = complete_checkpoints(config.output_dir)
    if not saved:
        return "No checkpoint was saved before it: lower learning_rate or set max_grad_norm and start again."
    return (f"The last checkpoint, {saved[-1]}, was saved while the loss was finite: lower learning_rate or set "
            f"max_grad_norm and resume with --resume_from_checkpoint {saved[-1]}.")


def build_dataloader(config: TrainingConfig, loaded, shuffle_seed: int):
    """Map-style: a shuffled DataLoader that Accelerate shards and can skip without decoding.
    Stream: a StatefulDataLoader over this rank's split, whose position is checkpointed."""
    if loaded.streaming:
        return StatefulDataLoader(loaded.dataset, batch_size=config.train_batch_size, collate_fn=collate_image_batch,
                                  num_workers=config.dataloader_num_workers)
    generator = torch.Generator().manual_seed(shuffle_seed)
    return DataLoader(loaded.dataset, batch_size=config.train_batch_size, shuffle=True, generator=generator,
                      collate_fn=collate_image_batch, num_workers=config.dataloader_num_workers)


def main(argv: list[str] | None = None) -> None:
    config = parse_training_config(argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.logger == "none" else config.logger,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    signals = StopSignals().install()
    lock = OutputDirLock(config.output_dir)
    try:
        if accelerator.is_main_process:
            lock.acquire()  # one writer per output_dir
        train(config, accelerator, signals)
    except TrainingStopped as stopped:
        traceback.clear_frames(stopped.__traceback__)
        logger.error(str(stopped))
        raise SystemExit(stopped.exit_code) from None
    except BaseException as error:
        traceback.clear_frames(error.__traceback__)  # the failed run's locals (its DDP model) go before the group
        raise
    finally:
        lock.release()
        signals.uninstall()
        shutdown_distributed(accelerator)


def train(config: TrainingConfig, accelerator: Accelerator, signals: StopSignals | None = None) -> None:
    started = time.perf_counter()
    set_seed(config.seed)
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("mixed_precision fp16 needs a GPU (PyTorch has no fp16 autocast for CPU training); use bf16 or no")
    if config.resume_from_checkpoint:  # what the checkpoint depends on must not change; the rest is logged
        for name, (first, now) in check_resume_config(config.output_dir, config).items():
            logger.info(f"resuming with {name} = {now!r} (the first run had {first!r})")
    elif accelerator.is_main_process:
        prepare_fresh_output_dir(config.output_dir, config.overwrite_output_dir)
    accelerator.wait_for_everyone()

    # Model, scheduler, data: everything is checked before the first step, so bad input loses nothing.
    pipeline = build_pipeline_from_preset(config.pipeline, seed=config.seed)
    scheduler = configure_scheduler(pipeline.scheduler, config)
    channels, resolution = resolve_image_shape(pipeline.unet, config)
    pipeline.unet.register_to_config(sample_size=resolution)  # the exported pipeline samples at the training size
    train_data = load_image_dataset(
        config.dataset, config.dataset_split, streaming=config.streaming, image_column=config.image_column,
        channels=channels, resolution=resolution, center_crop=config.center_crop, augment=config.augment,
        seed=config.seed, shuffle_buffer=config.shuffle_buffer, rank=rank, world_size=world_size,
        num_shards=max(8, world_size * max(1, config.dataloader_num_workers)),
    )
    validation_images = None
    if config.validation_split is not None:
        held_out = load_image_dataset(config.dataset, config.validation_split, image_column=config.image_column,
                                      channels=channels, resolution=resolution, seed=config.seed)
        loader = DataLoader(held_out.dataset, batch_size=256, collate_fn=collate_image_batch)
        validation_images = stack_images((b["pixel_values"] for b in loader), config.validation_images).to(accelerator.device)
        if validation_images.shape[0] == 0:
            raise ValueError(f"{config.dataset} split '{config.validation_split}' holds no decodable image; fix it or set "
                             "validation_split: null")
    require_decodable(train_data, f"{config.dataset} split '{config.dataset_split}'")
    if config.push_to_hub and accelerator.is_main_process:  # a bad token or endpoint fails now, not after training
        prepare_hub_repo(config.hub_model_id or os.path.basename(os.path.normpath(config.output_dir)), config.hub_private_repo)
    corrupt = None
    if config.corruptions:
        corrupt = RandomCorruption(config.corruptions, config.corruption_severity, config.corruption_p)
    validation_corruptions = config.validation_corruptions if config.validation_corruptions is not None else config.corruptions

    # Conditioning vector: augment labels, then corruption labels; zeros at sampling time (non-leaking).
    augment_dim = train_data.label_dim if config.augment_conditioning else 0
    corruption_dim = corrupt.label_dim if corrupt is not None and config.corruption_conditioning else 0
    model = AugmentConditionedUNet(pipeline.unet, augment_dim + corruption_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    train_dataloader = build_dataloader(config, train_data, config.seed)
    if train_data.streaming:  # already split by rank; Accelerate must not shard it again
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    batches_per_epoch = None if train_data.streaming else len(train_dataloader)
    effective_batch = config.train_batch_size
    if not train_data.streaming and len(train_data.dataset) < config.train_batch_size * world_size:
        effective_batch = math.ceil(len(train_data.dataset) / world_size)
        logger.warning(f"train_batch_size {config.train_batch_size} x {world_size} process(es) exceeds the "
                       f"{len(train_data.dataset)} training images: batches hold {effective_batch} images per process")
    max_train_steps, num_epochs = training_length(config, batches_per_epoch)
    # Stepped once per optimizer step by this loop (not prepared), so its schedule is right for any process count.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=max_train_steps)
    accelerator.register_for_checkpointing(lr_scheduler)
    ema = None
    if config.use_ema:
        ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=config.ema_max_decay, use_ema_warmup=True,
                       inv_gamma=config.ema_inv_gamma, power=config.ema_power)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    global_step, first_epoch, batches_to_skip, batches_consumed = 0, 0, 0, 0
    if config.resume_from_checkpoint:
        path = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
        accelerator.load_state(path)
        metadata = read_checkpoint_metadata(path)
        if lr_scheduler.base_lrs[0] != config.learning_rate:  # the checkpoint restored the old peak LR
            logger.warning(f"learning_rate {config.learning_rate} replaces the checkpoint's {lr_scheduler.base_lrs[0]}")
            lr_scheduler.base_lrs = [config.learning_rate] * len(lr_scheduler.base_lrs)
            for group, lr_lambda in zip(optimizer.param_groups, lr_scheduler.lr_lambdas, strict=True):
                group["lr"] = config.learning_rate * lr_lambda(lr_scheduler.last_epoch)
        global_step, batches_consumed = metadata["step"], metadata["batches_consumed"]
        if train_data.streaming:
            load_stream_position(train_dataloader, path, rank)
            first_epoch = metadata["epoch"]
        else:
            first_epoch, batches_to_skip = divmod(batches_consumed, batches_per_epoch)
        logger.info(f"resumed from {path} at step {global_step}")

    if accelerator.is_main_process:
        os.makedirs(os.path.join(config.output_dir, "samples"), exist_ok=True)
        if not config.resume_from_checkpoint:  # a resumed run keeps the first run's config (changes are logged)
            with open(os.path.join(config.output_dir, "training_config.yaml"), "w", encoding="utf-8") as handle:
                handle.write(config.to_yaml())
        tracker_config = {k: (str(v) if isinstance(v, list | type(None)) else v) for k, v in config.to_dict().items()}
        accelerator.init_trackers("diffusers-robust", config=tracker_config)

    history = {"lr": {}, "loss": {}, "validation": {}}
    skipped = SkippedRecords()
    images_seen_here = 0

    def stream_state() -> dict | None:
        return train_dataloader.state_dict() if train_data.streaming else None

    def save_checkpoint(step: int, epoch: int, batches_consumed: int, stream: dict | None, micro_steps: int | None = None) -> str:
        """Save the state after optimizer step `step` (the weights and optimizer are still those of `step`). Saved a
        micro-batch later, Accelerate's micro-step counter (`micro_steps`, which sets the accumulation boundaries of a
        resumed run) is put back to its value at `step` for the save."""
        if micro_steps is not None:
            current, accelerator.step = accelerator.step, micro_steps
            try:
                return save_checkpoint(step, epoch, batches_consumed, stream)
            finally:
                accelerator.step = current
        if not all(torch.isfinite(p).all() for p in model.parameters()):  # never let diverged weights displace good ones
            raise NonFiniteLossError(f"the weights are no longer finite at step {step}; not saving them. "
                                     f"{resume_hint(config)}")
        folder = None
        if accelerator.is_main_process:
            folder = begin_checkpoint(config.output_dir, step, config.checkpoints_total_limit)
        accelerator.wait_for_everyone()
        folder = folder or temporary_checkpoint_path(config.output_dir, step)
        with explain_full_disk(folder, f"checkpoint-{step}"):
            accelerator.save_state(folder)  # every rank: FSDP / DeepSpeed shard their state here
            if stream is not None:
                save_stream_position(stream, folder, rank)
        accelerator.wait_for_everyone()
        final = os.path.join(config.output_dir, "checkpoints", f"checkpoint-{step}")
        if accelerator.is_main_process:
            with explain_full_disk(folder, f"checkpoint-{step}"):
                final = finish_checkpoint(config.output_dir, step, {"epoch": epoch, "batches_consumed": batches_consumed},
                                          config.checkpoints_total_limit)
            logger.info(f"saved checkpoint {final}")
        accelerator.wait_for_everyone()
        return final

    def restoration_labels(corruption: str, severity: int, batch: int) -> torch.Tensor | None:
        """The conditioning that asks a restoration-trained model to undo `corruption`; None otherwise."""
        if not config.restoration_training or canonical_name(corruption) not in corrupt.corruptions:
            return None
        augment = torch.zeros(batch, augment_dim, device=accelerator.device)
        return torch.cat([augment, corrupt.labels([(canonical_name(corruption), severity)] * batch, accelerator.device)], 1)

    def sampling_pipeline() -> RobustDDPMPipeline:
        unwrapped = accelerator.unwrap_model(model)
        unet = export_unet(unwrapped).to(accelerator.device).eval()
        embedding = None
        if config.restoration_training:  # kept so the pipeline can ask for restoration with the training labels
            names = [f"augment/{i}" for i in range(augment_dim)] + [f"corruption/{name}" for name in corrupt.corruptions]
            embedding = export_condition_embedding(unwrapped, names).to(accelerator.device).eval()
        return RobustDDPMPipeline(unet=unet, scheduler=RobustDDIMScheduler.from_config(scheduler.config),
                                  condition_embedding=embedding)

    def validate() -> dict[str, float]:
        """Loss clean and corrupted, and a sample grid, from the EMA weights (main process)."""
        losses = {}
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model).eval()
            if validation_images is not None:
                losses = validation_losses(unwrapped, scheduler, validation_images, validation_corruptions,
                                           config.validation_severities, labels_for=restoration_labels)
            sampler = sampling_pipeline()
            sampler.set_progress_bar_config(disable=True)
            samples = sampler(batch_size=config.num_grid_images, generator=torch.Generator().manual_seed(config.seed),
                              num_inference_steps=config.num_inference_steps, output_type="np").images
            grid = make_grid(samples)
            grid.save(os.path.join(config.output_dir, "samples", f"step-{global_step}.png"))
            accelerator.log({f"validation/{k}": v for k, v in losses.items()}, step=global_step)
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_images("samples", samples, global_step, dataformats="NHWC")
            history["validation"][global_step] = losses
            unwrapped.train()
        if ema is not None:
            ema.restore(model.parameters())
        accelerator.wait_for_everyone()
        return losses

    progress = tqdm(total=max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="steps")
    model.train()
    loop_started, last_checkpoint, last_validation = time.perf_counter(), -1, -1
    pending_checkpoint = None  # (step, epoch, batches consumed, stream position) waiting for a finite next loss
    epoch = first_epoch
    while global_step < max_train_steps and epoch < num_epochs:
        train_data.set_epoch(epoch)
        batches = train_dataloader
        if not train_data.streaming:
            train_dataloader.set_epoch(epoch)
            if batches_to_skip:  # skipped by the sampler: the records are never read or decoded
                batches = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
                batches_to_skip = 0
        for batch in batches:
            skipped.update(batch)
            generator = torch.Generator().manual_seed(step_seed(config.seed, rank, batches_consumed))
            torch.manual_seed(step_seed(config.seed + 1, rank, batches_consumed))  # dropout
            clean = batch["pixel_values"].to(accelerator.device)
            labels = batch["augment_labels"].to(accelerator.device)
            valid = clean.shape[0] > 0
            if not valid:  # every record of this batch was bad: keep ranks in step with a zero-weight dummy
                clean = torch.zeros(1, channels, resolution, resolution, device=accelerator.device)
                labels = torch.zeros(1, labels.shape[1], device=accelerator.device)
            with accelerator.accumulate(model):
                conditioning = [labels[:, :augment_dim]]
                corrupted = clean
                if corrupt is not None:
                    corrupted, applied = corrupt(clean, generator=generator)
                    if corruption_dim:
                        conditioning.append(corrupt.labels(applied, accelerator.device))
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), generator=generator)
                timesteps = timesteps.to(accelerator.device)
                if config.restoration_training and config.restoration_max_timestep and corrupt is not None:
                    # corrupted images train where restoration runs: t rescaled into [0, restoration_max_timestep)
                    hit = torch.tensor([a is not None for a in applied], device=timesteps.device)
                    low = timesteps * config.restoration_max_timestep // scheduler.config.num_train_timesteps
                    timesteps = torch.where(hit, low, timesteps)
                if config.restoration_training:  # x_t from the corrupted image, the target from the clean one
                    noised = scheduler.add_training_noise(clean, timesteps, generator=generator, corrupted_images=corrupted)
                else:
                    noised = scheduler.add_training_noise(corrupted, timesteps, generator=generator)
                conditioning = torch.cat(conditioning, dim=1) if augment_dim + corruption_dim else None
                prediction = model(noised.noisy_images, timesteps, conditioning)
                weights = None
                if config.snr_gamma is not None:
                    weights = min_snr_weights(scheduler.alphas_cumprod, timesteps, config.snr_gamma,
                                              scheduler.config.prediction_type)
                loss = weighted_mse(prediction, noised.target, weights) * float(valid)
                # One collective per micro-batch carries each rank's loss and whether it was asked to stop.
                stop_here = float(signals is not None and signals.requested is not None)
                gathered = accelerator.gather(torch.stack([loss.detach().float(), loss.new_tensor(stop_here)]).reshape(1, 2))
                gathered_loss, stop_requested = gathered[:, 0], bool(gathered[:, 1].any())
                if not torch.isfinite(gathered_loss).all():  # nothing is saved: these weights have diverged
                    raise NonFiniteLossError(f"the training loss became {gathered_loss.tolist()} at step {global_step + 1}. "
                                             f"{resume_hint(config)}")
                if pending_checkpoint is not None:  # its weights just gave a finite loss: a checkpoint worth keeping
                    save_checkpoint(*pending_checkpoint)
                    last_checkpoint, pending_checkpoint = pending_checkpoint[0], None
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            batches_consumed += 1
            images_seen_here += int(valid) * batch["pixel_values"].shape[0]
            if not accelerator.sync_gradients:
                continue

            history["lr"][global_step + 1] = lr_scheduler.get_last_lr()[0]
            lr_scheduler.step()
            if ema is not None:
                ema.step(model.parameters())
            global_step += 1
            mean_loss = gathered_loss.mean().item()
            history["loss"][global_step] = mean_loss
            throughput = images_seen_here * world_size / (time.perf_counter() - loop_started)
            accelerator.log({"train/loss": mean_loss, "train/lr": history["lr"][global_step],
                             "train/images_per_second": throughput, "train/skipped_records": skipped.count}, step=global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{throughput:.0f}")
            if stop_requested:  # no next step will come: save now
                saved = save_checkpoint(global_step, epoch, batches_consumed, stream_state())
                name = signals.requested or "SIGTERM"  # another rank was signalled
                raise TrainingStopped(f"stopped by {name} at step {global_step}; saved {saved}. Resume with "
                                      "--resume_from_checkpoint latest", 128 + int(signal.Signals[name]))
            if global_step == max_train_steps:
                save_checkpoint(global_step, epoch, batches_consumed, stream_state())
                last_checkpoint = global_step
            elif global_step % config.checkpointing_steps == 0:
                # Written once the next step's loss, computed on these weights, is finite (see above).
                pending_checkpoint = (global_step, epoch, batches_consumed, stream_state(), accelerator.step)
            if global_step % config.validation_steps == 0 or global_step == max_train_steps:
                validate()
                last_validation = global_step
            if global_step >= max_train_steps:
                break
        epoch += 1
    progress.close()
    if last_checkpoint != global_step:
        save_checkpoint(global_step, epoch, batches_consumed, stream_state())
    final_losses = history["validation"].get(global_step) if last_validation == global_step else validate()

    # Cross-rank facts for the record: what each rank trained on and whether the weights agree.
    per_rank = accelerator.gather(torch.tensor([images_seen_here, float(skipped.count)], device=accelerator.device).reshape(1, 2))
    checksums = accelerator.gather(torch.tensor([parameter_checksum(accelerator.unwrap_model(model))],
                                                dtype=torch.float64, device=accelerator.device))
    if ema is not None:
        ema.copy_to(model.parameters())
    if accelerator.is_main_process:
        sampler = sampling_pipeline()
        RobustDDPMPipeline(unet=sampler.unet, scheduler=scheduler, condition_embedding=sampler.condition_embedding
                           ).save_pretrained(config.output_dir, safe_serialization=True)
        for component in ("unet", "condition_embedding"):
            if os.path.isdir(os.path.join(config.output_dir, component)):
                apply_umask(os.path.join(config.output_dir, component))
        metrics = {
            "global_step": global_step,
            "images_seen": int(per_rank[:, 0].sum().item()),
            "images_seen_per_rank": [int(v) for v in per_rank[:, 0].tolist()],
            "num_processes": world_size,
            "train_batch_size_effective": effective_batch,
            "mixed_precision": accelerator.mixed_precision,
            "resolution": resolution,
            "skipped_records": skipped.count,
            "skipped_record_ids": skipped.ids,
            "records_decoded_this_run": train_data.transform.records_decoded if config.dataloader_num_workers == 0 else None,
            "parameter_checksums_per_rank": checksums.tolist(),
            "lr_history": history["lr"],
            "loss_history": history["loss"],
            "validation_losses": final_losses or {},
            "validation_history": history["validation"],
            "validation_images": 0 if validation_images is None else int(validation_images.shape[0]),
            "scheduler_robust_options": {k: scheduler.config[k] for k in ROBUST_SCHEDULER_OPTIONS},
            "training_wall_time_seconds": time.perf_counter() - started,
        }
        repo_id = config.hub_model_id or os.path.basename(os.path.normpath(config.output_dir))
        sampler.set_progress_bar_config(disable=True)
        # The last validation sampled this grid from the same EMA weights and seed: reuse it.
        samples_dir = os.path.join(config.output_dir, "samples")
        shutil.copyfile(os.path.join(samples_dir, f"step-{global_step}.png"), os.path.join(samples_dir, "final.png"))
        if config.quality_samples > 0:
            samples = sampler(batch_size=config.quality_samples, generator=torch.Generator().manual_seed(config.seed + 1),
                              num_inference_steps=config.num_inference_steps, output_type="np").images
            metrics["digits_quality"] = {"samples": config.quality_samples, **digits_quality(samples)}
        if config.report and validation_images is not None:  # the held-out report of `diffusers-robust evaluate`
            report = evaluate_pipeline(sampler, config.dataset, config.validation_split, config.dataset_split,
                                       config.report_images, config.report_samples, config.num_inference_steps)
            write_report(report, os.path.join(config.output_dir, "evaluation"), title=f"Evaluation of {repo_id}")
            metrics["report"] = {key: value for key, value in report.items() if not key.startswith("_")}
        with open(os.path.join(config.output_dir, "metrics.json"), "w", encoding="utf-8") as handle:
            json.dump(metrics, handle, indent=2)
        write_model_card(config.output_dir, repo_id, config.to_dict(), metrics, config.license)
        logger.info(f"wrote the pipeline, samples, metrics.json and README.md to {config.output_dir}")
        if config.push_to_hub:
            push_pipeline_to_hub(config.output_dir, repo_id, private=config.hub_private_repo)
            logger.info(f"pushed the pipeline to {repo_id}")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
