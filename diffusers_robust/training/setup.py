"""The parts of a training run, each built from the recipe by one factory: `build_scheduler`, `build_objective`,
`build_model`, `build_optimizer`, `build_ema`, `build_lr_scheduler`, `build_dataloader`; and the image shape and run
length. The training loop's `set_up` and every benchmark build their parts with these calls, so a benchmark times what
training runs (`tests/test_benchmarks.py` checks one step of each gives the same weights)."""

import logging
import math

import torch
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader

from ..data.corruptions import RandomCorruption
from ..data.datasets import ImageDataset, collate_image_batch
from ..models import LabelConditionedUNet, image_size
from ..schedulers import RobustDDPMScheduler
from ..schedulers.robust_options import ROBUST_OPTIONS
from .config import TrainingConfig
from .objective import RobustDiffusionObjective

logger = logging.getLogger(__name__)


def build_scheduler(scheduler, config: TrainingConfig) -> RobustDDPMScheduler:
    """The preset's noise schedule as a [`RobustDDPMScheduler`] with the recipe's robust options (a preset holds the
    architecture and schedule; the recipe decides every robust option) and, when set, its `prediction_type`."""
    overrides = {option.name: getattr(config, option.name) for option in ROBUST_OPTIONS}
    for name, value in overrides.items():
        preset_value = scheduler.config.get(name)
        if preset_value is not None and preset_value != value:
            logger.info(f"{name} = {value} from the recipe replaces the preset scheduler's {preset_value}")
    if config.prediction_type is not None:
        overrides["prediction_type"] = config.prediction_type
    return RobustDDPMScheduler.from_config(scheduler.config, **overrides)


def build_objective(scheduler: RobustDDPMScheduler, config: TrainingConfig, augment_dim: int = 0,
                    masked: bool = False) -> RobustDiffusionObjective:
    """The training loss of the recipe: its corruptions (when listed), min-SNR weights, restoration and noisy-data
    options. `augment_dim`: the augment-label width the data gives (0 without augment conditioning); `masked`: the
    UNet takes `(seen pixels, mask)`, so `further_mask_p` applies."""
    corruption = None
    if config.corruptions:
        corruption = RandomCorruption(config.corruptions, config.corruption_severity, config.corruption_p)
    return RobustDiffusionObjective(
        scheduler, snr_gamma=config.snr_gamma, corruption=corruption,
        augment_dim=augment_dim if config.augment_conditioning else 0,
        condition_on_corruption=config.corruption_conditioning, restoration_training=config.restoration_training,
        restoration_max_timestep=config.restoration_max_timestep, max_weight=config.noisy_data_max_weight,
        further_mask_p=config.further_mask_p if masked else None,
    )


def build_model(unet: UNet2DModel, objective: RobustDiffusionObjective, config: TrainingConfig,
                device: torch.device) -> LabelConditionedUNet:
    """The UNet the step trains: `unet` with the objective's label vector (augment, then corruption labels) added to
    its time embedding (all zeros at sampling: non-leaking), on `device`, channels_last if the recipe asks."""
    model = LabelConditionedUNet(unet, objective.label_dim).to(device)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def build_ema(model: torch.nn.Module, config: TrainingConfig, device: torch.device) -> EMAModel | None:
    """The exponential moving average of `model`'s weights (Diffusers' `EMAModel` with warm-up, foreach updates), on
    `device`; None when the recipe sets `use_ema: false`. `model`: the unwrapped module."""
    if not config.use_ema:
        return None
    ema = EMAModel(model.parameters(), decay=config.ema_max_decay, use_ema_warmup=True, inv_gamma=config.ema_inv_gamma,
                   power=config.ema_power, foreach=True)
    ema.to(device)
    return ema


def resolve_image_shape(unet: UNet2DModel, config: TrainingConfig) -> tuple[int, int]:
    """`(channels, resolution)` for training: the recipe's, else the preset UNet's (a UNet taking twice the channels it
    outputs, a missing-pixel model, trains on images of its output's channels); `ValueError` for a resolution the UNet
    cannot halve as often as it downsamples."""
    takes = unet.config.out_channels if unet.config.in_channels == 2 * unet.config.out_channels else unet.config.in_channels
    channels = config.channels if config.channels is not None else takes
    resolution = config.resolution if config.resolution is not None else image_size(unet.config.sample_size)[0]
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    if resolution % factor != 0:
        raise ValueError(
            f"resolution {resolution} cannot be downsampled by the UNet of {config.pipeline}: it halves the image "
            f"{len(unet.config.block_out_channels) - 1} times, so the resolution must be a multiple of {factor}"
        )
    return channels, resolution


def fit_unet(unet: UNet2DModel, channels: int, resolution: int, seed: int, dropout: float | None = None) -> UNet2DModel:
    """The preset's UNet for images of `channels` and `resolution`: `sample_size` set (the UNet is convolutional, so
    its weights do not change), and rebuilt from its config with `channels` in and out when they differ, or with
    `dropout` when given and not the preset's (freshly initialised from `seed`, as every preset is: dropout has no
    weights, so the same seed gives the same initial weights)."""
    unet.register_to_config(sample_size=resolution)  # the exported pipeline samples at the training size
    takes = unet.config.out_channels if unet.config.in_channels == 2 * unet.config.out_channels else unet.config.in_channels
    changes = {}
    if channels != takes:
        logger.info(f"the preset's UNet takes {takes} channel(s): built for {channels} from its config")
        changes.update(in_channels=channels, out_channels=channels)
    if dropout is not None and dropout != unet.config.dropout:
        changes["dropout"] = dropout
    if not changes:
        return unet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel.from_config({**unet.config, **changes})


def check_image_shape(config: TrainingConfig, shapes: dict | None, channels: int, resolution: int) -> None:
    """Refuse to convert the colour or size of the training images silently. `shapes` maps each stored
    `(channels, height, width)` to `(records, first record)` (`data.datasets.stored_shapes`; None when unknown). Unless
    the recipe sets `channels` / `resolution`: a grey/colour mix, images of several sizes, or images unlike what the
    preset takes are one `ValueError` naming every mismatch, examples, and the flag that decides."""
    if not shapes:
        return
    problems = []
    kinds = {c: sum(n for (k, _, _), (n, _) in shapes.items() if k == c) for c, _, _ in shapes}
    example = {c: next(first for (k, _, _), (_, first) in shapes.items() if k == c) for c in kinds}
    if config.channels is None and len(kinds) > 1:
        problems.append(f"they mix {kinds[1]} grey and {kinds[3]} colour images (e.g. {example[1]} and {example[3]}): "
                        "pass --channels 3 (colour) or --channels 1 (grey) to convert them all")
    elif config.channels is None and next(iter(kinds)) != channels:
        found = next(iter(kinds))
        problems.append(f"they have {found} channel(s) but the preset {config.pipeline} takes {channels}: pass "
                        f"--channels {found} (the UNet is built for them) or --channels {channels} to convert them")
    sizes = {}
    for (_, height, width), (count, first) in shapes.items():
        total, name = sizes.get((width, height), (0, first))
        sizes[(width, height)] = (total + count, name)
    if config.resolution is None and len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}: {n} (e.g. {first})" for (w, h), (n, first) in
                           sorted(sizes.items(), key=lambda item: -item[1][0])[:4])
        problems.append(f"they come in {len(sizes)} sizes ({listed}): pass --resolution N to resize and crop them all")
    elif config.resolution is None and min(next(iter(sizes))) != resolution:
        width, height = next(iter(sizes))
        problems.append(f"they are {width}x{height} pixels but the preset {config.pipeline} takes "
                        f"{resolution}x{resolution}: pass --resolution {min(height, width)} (the UNet is built for it) or "
                        f"--resolution {resolution} to resize them")
    if problems:
        raise ValueError(f"the images of {config.dataset}: " + "; ".join(problems))


def training_length(config: TrainingConfig, batches_per_epoch: int | None) -> tuple[int, int]:
    """`(max_train_steps, num_epochs)` in optimizer steps, for `batches_per_epoch` batches per process.

    Steps count optimizer updates, so they do not change with the number of processes; a stream has no
    length and needs `max_train_steps`."""
    if batches_per_epoch is None:
        if config.max_train_steps is None:
            raise ValueError("a streamed dataset has no length: set max_train_steps")
        return config.max_train_steps, 1_000_000
    if batches_per_epoch == 0:
        raise ValueError("the training split is smaller than one batch per process")
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_epochs * steps_per_epoch
    return max_steps, math.ceil(max_steps / steps_per_epoch)


def build_dataloader(config: TrainingConfig, loaded: ImageDataset, shuffle_seed: int):
    """Map-style: a shuffled `DataLoader` that Accelerate shards and can skip without decoding.
    Stream: a `StatefulDataLoader` over this rank's split, whose position is checkpointed."""
    pinned = torch.cuda.is_available()
    workers = {"num_workers": config.dataloader_num_workers, "pin_memory": pinned}
    if config.dataloader_num_workers > 0:
        # Not persistent: each epoch's workers copy the transform after `set_epoch`. Persistent workers keep the copy of
        # the first epoch, so every later epoch would repeat its augmentations (and a stream its shuffle order).
        workers.update(prefetch_factor=4)
    if loaded.streaming:
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(loaded.dataset, batch_size=config.train_batch_size, collate_fn=collate_image_batch,
                                  **workers)
    generator = torch.Generator().manual_seed(shuffle_seed)
    return DataLoader(loaded.dataset, batch_size=config.train_batch_size, shuffle=True, generator=generator,
                      collate_fn=collate_image_batch, **workers)


def build_optimizer(model: torch.nn.Module, config: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the recipe's hyper-parameters; its fused kernel where PyTorch has one for `device` (CUDA, CPU)."""
    fused = device.type in ("cuda", "cpu") and config.fused_optimizer
    return torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                             weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, fused=fused or None)


def build_lr_scheduler(config: TrainingConfig, optimizer: torch.optim.Optimizer, max_train_steps: int, start_step: int = 0):
    """The learning-rate schedule, a pure function of the optimizer step: at `start_step` (a resumed run) it gives the
    LR of that step for the recipe's `learning_rate`, so nothing of it is checkpointed and a new peak LR just works.
    Stepped once per optimizer step by the loop (not prepared), so it is right for any process count."""
    if start_step > 0:
        for group in optimizer.param_groups:  # PyTorch's contract for a schedule that starts mid-way
            group["initial_lr"] = config.learning_rate
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=max_train_steps, last_epoch=start_step - 1)
