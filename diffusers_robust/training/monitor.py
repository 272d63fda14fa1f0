"""The memorisation monitor of a training run: at each validation, the denoising loss on training images beside the
held-out one (the generalisation gap) and how near the sample grid comes to the training images; and a warning when a
run starts on few images for many epochs."""

import json
import math
import os
import shutil

import torch
from torch.utils.data import DataLoader

from ..data.datasets import ImageDataset, collate_image_batch, load_image_dataset
from ..data.splits import HeldOutPlan
from ..evaluation.images import stack_images
from ..evaluation.losses import Denoiser, denoising_loss
from ..evaluation.metrics import Memorisation, Reference
from ..pipelines.pipeline_robust_ddpm import RobustDDPMPipeline
from .checkpoints import explain_full_disk, sync_directory, sync_tree
from .config import TrainingConfig

# `keep_best`: the folder of the best validation's pipeline in output_dir, and the record of which validation it was.
BEST_FOLDER, BEST_RECORD = "best", "best.json"
# A run on fewer training images than this, for at least `MANY_EPOCHS` passes over them, is warned about at its start.
# A plain DDPM on 150 digits (benchmarks/small_data.py, seed 0) put 0% / 5% / 12% / 36% / 85% of its grid samples nearer
# a training image than 95% of held-out digits come at 213 / 427 / 640 / 853 / 1706 epochs; on the 1,497 digits, 171
# epochs read 2% (unseen digits: 5%).
FEW_IMAGES = 1000
MANY_EPOCHS = 500


def load_monitor_images(config: TrainingConfig, source, held_out_plan: HeldOutPlan, channels: int, resolution: int,
                        count: int, device: torch.device) -> torch.Tensor:
    """The first `count` training records (never held-out ones), unaugmented, `(N, C, H, W)` in `[-1, 1]` on `device`:
    the training side of the generalisation gap."""
    train = load_image_dataset(source, config.dataset_split, hold_out=held_out_plan.train_hold_out,
                               image_column=config.image_column, channels=channels, resolution=resolution,
                               seed=config.seed, annotations="ignore", streaming=config.streaming)
    loader = DataLoader(train.dataset, batch_size=256, collate_fn=collate_image_batch)
    return stack_images((batch["pixel_values"] for batch in loader), count).to(device)


def monitor_figures(model: Denoiser, scheduler, held_out: torch.Tensor, train: torch.Tensor, held_out_loss: float,
                    samples: torch.Tensor) -> dict[str, float]:
    """
    The monitor's figures at one validation.

    Args:
        model: the denoiser as `validation_losses` takes it.
        held_out (`torch.Tensor` of shape `(N, C, H, W)`), train (`(M, C, H, W)`): images in `[-1, 1]`.
        held_out_loss (`float`): the held-out clean denoising loss at the evaluation seed.
        samples (`torch.Tensor` of shape `(S, C, H, W)`): the validation grid's samples in `[-1, 1]`.

    Returns:
        `train_loss` (the same loss, same timesteps and noise, on the training images), `generalisation_gap`
        (held-out minus train: near 0 while the model generalises, growing as it memorises), `memorisation_share` (share of
        samples nearer a training image than 95% of held-out images are: about 5% for a model that does not copy, 1 for
        copies) and `memorisation_distance_ratio` (median sample-to-train distance over the held-out images' own).
    """
    train_loss = denoising_loss(model, scheduler, train)
    figures = Memorisation().compute(samples.cpu().float(), Reference(images=held_out.cpu().float(),
                                                                      train_images=train.cpu().float()))["memorisation"]
    return {"train_loss": train_loss, "generalisation_gap": held_out_loss - train_loss,
            "memorisation_share": figures["share_nearer_than_held_out"],
            "memorisation_distance_ratio": figures["distance_ratio_to_held_out"]}


def few_images_warning(train_data: ImageDataset, max_train_steps: int, images_per_step: int,
                       monitored: bool) -> str | None:
    """A warning naming the figures to watch when the run passes `MANY_EPOCHS` times over fewer than `FEW_IMAGES`
    images; None otherwise (and for a stream, whose length is unknown)."""
    if train_data.streaming or len(train_data.dataset) >= FEW_IMAGES:
        return None
    records = len(train_data.dataset)
    epochs = max_train_steps * images_per_step / max(records, 1)
    if epochs < MANY_EPOCHS:
        return None
    watch = ("watch the validation lines' generalisation_gap and memorisation_share (metrics.json: monitor_history)"
             if monitored else "hold images out (validation_split or validation_share) to monitor it")
    return (f"training on {records} images for {math.floor(epochs)} epochs ({max_train_steps} steps of {images_per_step} "
            f"images): a DDPM can memorise a data set this small; {watch}")


class BestCheckpoint:
    """`keep_best`: the pipeline of the validation with the lowest held-out clean loss so far, in `output_dir/best`
    with `best.json` (`step`, `clean_loss`). Each new best is written beside it and swapped in by renames, so a crash
    leaves the previous one whole. A resumed run carries on from the recorded best; a fresh one removes an earlier
    run's."""

    def __init__(self, output_dir: str, resuming: bool):
        self.folder = os.path.join(output_dir, BEST_FOLDER)
        self.record: dict | None = None
        record = os.path.join(self.folder, BEST_RECORD)
        if resuming and os.path.isfile(record):
            with open(record, encoding="utf-8") as handle:
                self.record = json.load(handle)
        elif os.path.isfile(record):
            shutil.rmtree(self.folder)
        elif os.path.lexists(self.folder):
            raise ValueError(f"{self.folder} exists and is no best pipeline of a run (no {BEST_RECORD}): move it, or "
                             "set keep_best: false")

    def offer(self, step: int, clean_loss: float, pipeline: RobustDDPMPipeline) -> bool:
        """Save `pipeline` as the best when `clean_loss` is below the best so far; returns whether it was."""
        if self.record is not None and clean_loss >= self.record["clean_loss"]:
            return False
        parent = os.path.dirname(self.folder)  # hidden names beside best/, as the export stages in .export.tmp
        staging, replaced = os.path.join(parent, f".{BEST_FOLDER}.tmp"), os.path.join(parent, f".{BEST_FOLDER}.replaced")
        shutil.rmtree(staging, ignore_errors=True)
        with explain_full_disk(staging, "the best pipeline"):
            pipeline.save_pretrained(staging, safe_serialization=True)
            with open(os.path.join(staging, BEST_RECORD), "w", encoding="utf-8") as handle:
                json.dump({"step": step, "clean_loss": clean_loss}, handle)
            sync_tree(staging)
        shutil.rmtree(replaced, ignore_errors=True)
        if os.path.lexists(self.folder):
            os.replace(self.folder, replaced)
        os.replace(staging, self.folder)
        sync_directory(os.path.dirname(self.folder))
        shutil.rmtree(replaced, ignore_errors=True)
        self.record = {"step": step, "clean_loss": clean_loss}
        return True
