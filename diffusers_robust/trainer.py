"""Helpers of the training loop in `training/train_robust_ddpm.py`: each small, pure where possible, tested."""

import gc
import math
import os
import warnings

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import UNet2DModel

from .schedulers import RobustDDPMScheduler
from .training_config import TrainingConfig

ROBUST_SCHEDULER_OPTIONS = (
    "prediction_type", "input_perturbation", "offset_noise", "pyramid_noise_discount", "epsilon_scale_base",
    "epsilon_scale_slope",
)


def configure_scheduler(scheduler, config: TrainingConfig) -> RobustDDPMScheduler:
    """The preset's scheduler as a [`RobustDDPMScheduler`] with the config's robust options applied."""
    overrides = {name: getattr(config, name) for name in ROBUST_SCHEDULER_OPTIONS if getattr(config, name) is not None}
    return RobustDDPMScheduler.from_config(scheduler.config, **overrides)


def resolve_image_shape(unet: UNet2DModel, config: TrainingConfig) -> tuple[int, int]:
    """`(channels, resolution)` for training, checked against the UNet; raises `ValueError` naming the conflict."""
    channels = config.channels if config.channels is not None else unet.config.in_channels
    if channels != unet.config.in_channels:
        raise ValueError(
            f"the data has {channels} channels (channels={config.channels}) but the preset {config.pipeline} "
            f"UNet takes {unet.config.in_channels}"
        )
    size = unet.config.sample_size
    resolution = config.resolution if config.resolution is not None else (size if isinstance(size, int) else size[0])
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    if resolution % factor != 0:
        raise ValueError(
            f"resolution {resolution} cannot be downsampled by the UNet of {config.pipeline}: it halves the image "
            f"{len(unet.config.block_out_channels) - 1} times, so the resolution must be a multiple of {factor}"
        )
    return channels, resolution


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """A seed for one micro-batch, from the run seed, the rank and the micro-batch counter.

    Drawing every random number of a step from a fresh generator seeded this way makes a resumed run
    draw exactly what the uninterrupted run drew, with no generator state to save."""
    return int(np.random.SeedSequence([seed, rank, micro_step]).generate_state(1)[0])


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


def parameter_checksum(model: torch.nn.Module) -> float:
    """A position-weighted sum of all parameters: equal on two ranks only if their weights are equal. One parameter at
    a time, so it needs memory for the largest parameter in float64, not a float64 copy of the whole model."""
    count = sum(p.numel() for p in model.parameters())
    total, offset = 0.0, 0
    for parameter in model.parameters():
        flat = parameter.detach().flatten().double().cpu()
        weights = 1.0 + torch.arange(offset, offset + flat.numel(), dtype=torch.float64) / max(count - 1, 1)
        total += float((flat * weights).sum())
        offset += flat.numel()
    return total


def save_stream_position(state: dict, folder: str, rank: int) -> None:
    """Save a `StatefulDataLoader`'s position (its `state_dict()`, a stream) for this rank."""
    torch.save(state, os.path.join(folder, f"stream_position_rank{rank}.pt"))


def load_stream_position(dataloader, folder: str, rank: int) -> None:
    path = os.path.join(folder, f"stream_position_rank{rank}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} holds no stream position for rank {rank}: was it saved with another world size?")
    dataloader.load_state_dict(torch.load(path, weights_only=False))


def shutdown_distributed(accelerator: Accelerator) -> int:
    """End training (trackers, process group) so that the gloo group's destructor never runs with the GIL held.

    DDP's Reducer and c10d's native registry drop their reference to the process group with the GIL held. If theirs
    is the last one while a gloo worker thread is still freeing a finished collective whose tensors need the GIL, the
    group's destructor waits for that thread forever: a rare hang at the exit of multi-process CPU runs (seen in CI,
    stack `~Reducer -> ~ProcessGroupGloo -> thread::join`). So the prepared objects are released first and the last
    reference is a Python one, whose release drops the GIL before the join.

    Call it after dropping your own references to the prepared model. Returns how many `DistributedDataParallel`
    wrappers were still alive (0 unless a reference was kept somewhere; a warning is logged then).
    """
    accelerator.free_memory()  # forgets the prepared model, optimizer and dataloaders; runs gc
    ddp = torch.nn.parallel.DistributedDataParallel
    survivors = sum(issubclass(type(obj), ddp) for obj in gc.get_objects())  # type(): no __class__ lookups
    if survivors:
        warnings.warn(f"{survivors} DistributedDataParallel model(s) still referenced at shutdown; the process "
                      "group is released with them, which can hang at exit", RuntimeWarning, stacklevel=2)
    group = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
    accelerator.end_training()  # destroys the process group; `group` keeps it alive until the line below
    del group
    return survivors
