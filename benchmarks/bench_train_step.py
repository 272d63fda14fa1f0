"""Training-step throughput: our robust step versus the Diffusers example's loop, same UNet, data and run.

Usage: python benchmarks/bench_train_step.py [--preset pipelines/ddpm-digits] [--recipe RECIPE.yaml] [--dataset DATA]
           [--batch-size 64] [--steps 30] [--threads 1] [--device cuda] [--mixed-precision bf16] [--peak-tflops 989]
           [--channels-last] [--compile] [--profile]

The reference is the inner loop of Diffusers' `examples/unconditional_image_generation/train_unconditional.py`
(random noise and timesteps, `add_noise`, UNet forward, MSE, backward, clip, AdamW, LR scheduler, EMA). Ours is the
training loop's step, its parts built by the same factories (`diffusers_robust/training/setup.py`) from a recipe:
`--recipe`, else `ROBUST_STEP` (a RandomCorruption with p = 0.5 and corruption labels, input perturbation, augment-label
conditioning, min-SNR weights; fused AdamW and a foreach EMA as every recipe has). `tests/test_benchmarks.py` checks
that this step and the training script's give the same weights. The two alternate
in blocks of steps so machine noise hits both; images/s and the ratio are printed.
Batches are decoded before a block's timer starts (the data pipeline has its own benchmark); moving them to the
device is timed. The model FLOPs of one step (forward and backward, counted by `torch.utils.flop_counter`) give
the achieved TFLOP/s and, with `--peak-tflops` (the device's dense peak at the chosen precision), its share.
"""

import argparse
import dataclasses
import os
import platform
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from diffusers_robust import build_pipeline_from_preset
from diffusers_robust.data.datasets import collate_image_batch, load_image_dataset
from diffusers_robust.models import LabelConditionedUNet, image_size
from diffusers_robust.training.config import TrainingConfig
from diffusers_robust.training.setup import (
    build_ema,
    build_lr_scheduler,
    build_model,
    build_objective,
    build_optimizer,
    build_scheduler,
)

AUGMENT = os.path.join(os.path.dirname(__file__), "..", "training", "configs", "augment", "edm.yaml")
# Our step's recipe unless --recipe names one: every robust training option the step can pay for.
ROBUST_STEP = {"input_perturbation": 0.1, "snr_gamma": 5.0, "corruptions": ["gaussian_noise", "impulse_noise"],
               "corruption_p": 0.5, "corruption_severity": [1, 3], "augment": AUGMENT, "learning_rate": 1e-4,
               "lr_scheduler": "cosine", "lr_warmup_steps": 10, "max_train_steps": 10_000}
# Phases of `--profile` that hold the UNet's forward: the objective's time includes it and is reported without it.
OBJECTIVE, UNET_FORWARD = "objective", "UNet forward"


def batches(preset_unet, batch_size: int, config: TrainingConfig, dataset: str | None = None):
    """Endless shuffled batches of `dataset` (default: the recipe's own dataset when it names a file or folder, else all
    the digits) at the preset's shape, with the recipe's augmentation and annotations."""
    size = image_size(preset_unet.config.sample_size)[0]
    source = dataset or (config.dataset if config.dataset != "digits" else None)
    loaded = load_image_dataset(source or "digits", split="all" if source is None else config.dataset_split,
                                image_column=config.image_column, channels=preset_unet.config.in_channels,
                                resolution=size, augment=config.augment, annotations=config.annotations)
    while True:
        yield from DataLoader(loaded.dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                              collate_fn=collate_image_batch)


def make_trainer(preset: str, config: TrainingConfig, label_dim: int, device: torch.device,
                 amp_dtype: torch.dtype | None = None, compile_model: bool = False,
                 phases: dict[str, float] | None = None):
    """Our training step, `step(batch, generator)`, and its model: the parts built by the training loop's own factories
    from `config` (scheduler, objective, model, fused AdamW, LR schedule, foreach EMA), then the loop's order of
    objective, backward, clipping at `max_grad_norm`, optimizer, LR and EMA steps. With `phases`, each part's seconds
    are added to it (the device synchronised around each), and the UNet's forward inside the objective under
    `UNET_FORWARD` (on a CPU, where nothing runs ahead of Python)."""
    pipeline = build_pipeline_from_preset(preset, seed=config.seed)
    scheduler = build_scheduler(pipeline.scheduler, config)
    objective = build_objective(scheduler, config, label_dim)
    model = build_model(pipeline.unet, objective, config, device)
    optimizer = build_optimizer(model, config, device)
    lr_scheduler = build_lr_scheduler(config, optimizer, config.max_train_steps)
    ema = build_ema(model, config, device)
    forward = torch.compile(model) if compile_model else model
    parameters = list(model.parameters())
    if phases is not None and not compile_model:  # the UNet's forward, timed inside the objective
        started = []
        model.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
        model.register_forward_hook(lambda *_: phases.__setitem__(
            UNET_FORWARD, phases.get(UNET_FORWARD, 0.0) + time.perf_counter() - started.pop()))

    def step(batch, generator):
        with timed(phases, "batch to device", device):
            images = batch["pixel_values"].to(device, non_blocking=True)
            labels = batch["augment_labels"].to(device, non_blocking=True)
            extras = (batch["noise_sigmas"], batch["sigma_max"], batch["observed"].to(device, non_blocking=True))
        with timed(phases, OBJECTIVE, device):
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext():
                loss = objective(forward, images, labels, generator, *extras).loss.mean()
        with timed(phases, "backward", device):
            loss.backward()
        with timed(phases, "gradient clipping", device):
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        with timed(phases, "optimizer step, zero_grad", device):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with timed(phases, "LR schedule", device):
            lr_scheduler.step()
        with timed(phases, "EMA", device):
            if ema is not None:
                ema.step(parameters)

    return step, model


@contextmanager
def timed(phases: dict[str, float] | None, name: str, device: torch.device):
    """Adds the wall seconds of the block to `phases[name]` (the device synchronised on both sides); nothing when
    `phases` is None."""
    if phases is None:
        yield
        return
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    phases[name] = phases.get(name, 0.0) + time.perf_counter() - start


def make_example_trainer(preset: str, device: torch.device, amp_dtype: torch.dtype | None):
    """The inner loop of Diffusers' `train_unconditional.py`: random noise and timesteps, `add_noise`, UNet forward, MSE,
    backward, clipping at 1.0, PyTorch's default AdamW, cosine LR, EMA."""
    pipeline = build_pipeline_from_preset(preset, seed=0)
    scheduler = pipeline.scheduler
    model = LabelConditionedUNet(pipeline.unet, 0).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=10, num_training_steps=10_000)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, power=0.75)
    ema.to(device)

    def step(batch, generator):
        clean = batch["pixel_values"].to(device, non_blocking=True)
        noise = torch.randn(clean.shape, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=device)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext():
            prediction = model(scheduler.add_noise(clean, noise, t), t)
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())

    return step, model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(step, batch, generator) -> int:
    """Floating-point operations of one training step (matrix products and convolutions, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        step(batch, generator)
    return counter.get_total_flops()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pipelines/ddpm-digits")
    parser.add_argument("--recipe", default=None, help="our step's training recipe (YAML); default: every robust option")
    parser.add_argument("--dataset", default=None,
                        help="images of both loops (default: the recipe's dataset when it names files, else the digits)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per trainer")
    parser.add_argument("--block", type=int, default=5, help="steps per alternation block")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: PyTorch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no", help="autocast of the forward pass")
    parser.add_argument("--peer-mixed-precision", choices=["no", "bf16"], default=None,
                        help="the example loop's precision, if not --mixed-precision (its default is fp32: no)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (our loop)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (our loop)")
    parser.add_argument("--profile", action="store_true",
                        help="then time each part of our step over --steps more steps (device synchronised per part)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak at this precision, for the share of peak (H200 bf16: 989)")
    return parser.parse_args()


def alternate(trainers: dict, data, generator: torch.Generator, steps: int, block: int, device: torch.device):
    """Seconds each trainer took for `steps` steps (rounded up to whole blocks), the trainers taking turns in blocks of
    `block` steps; batches are drawn before a block's timer starts. Returns `(elapsed, steps done)`."""
    elapsed = dict.fromkeys(trainers, 0.0)
    done = 0
    while done < steps:
        for name, step in trainers.items():
            batches_of_block = [next(data) for _ in range(block)]
            synchronize(device)
            start = time.perf_counter()
            for batch in batches_of_block:
                step(batch, generator)
            synchronize(device)
            elapsed[name] += time.perf_counter() - start
        done += block
    return elapsed, done


def print_profile(phases: dict[str, float], steps: int, example_seconds: float) -> None:
    """The parts of our step in ms per step and share, the objective without the UNet's forward, beside the example
    loop's whole step."""
    if UNET_FORWARD in phases:
        phases = {**phases, OBJECTIVE: phases[OBJECTIVE] - phases[UNET_FORWARD]}
        phases = {(f"{OBJECTIVE} without the UNet forward" if k == OBJECTIVE else k): v for k, v in phases.items()}
    total = sum(phases.values())
    print("| part of our step | ms per step | share |\n|---|---|---|")
    for name, seconds in sorted(phases.items(), key=lambda item: -item[1]):
        print(f"| {name} | {1000 * seconds / steps:.2f} | {seconds / total:.1%} |")
    print(f"| whole step (sum) | {1000 * total / steps:.2f} | 100% |")
    print(f"| the example loop's whole step (same run, unsynchronised) | {1000 * example_seconds / steps:.2f} | - |")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else None
    torch.manual_seed(0)
    config = TrainingConfig.from_yaml(args.recipe) if args.recipe else TrainingConfig(**ROBUST_STEP)
    config = dataclasses.replace(config, channels_last=args.channels_last or config.channels_last)
    unet = build_pipeline_from_preset(args.preset).unet
    data = batches(unet, args.batch_size, config, args.dataset)
    label_dim = next(data)["augment_labels"].shape[1]
    peer_precision = args.peer_mixed_precision or args.mixed_precision
    peer_dtype = torch.bfloat16 if peer_precision == "bf16" else None
    trainers = {"diffusers example": make_example_trainer(args.preset, device, peer_dtype)[0],
                "diffusers-robust": make_trainer(args.preset, config, label_dim, device, amp_dtype, args.compile)[0]}
    generator = torch.Generator().manual_seed(0)
    for step in trainers.values():  # warm-up
        step(next(data), generator)
    flops = {name: step_flops(step, next(data), generator) for name, step in trainers.items()}
    elapsed, done = alternate(trainers, data, generator, args.steps, args.block, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"device: {device_name}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"preset {args.preset}, recipe {args.recipe or 'ROBUST_STEP'}, batch {args.batch_size}, mixed precision "
          f"{args.mixed_precision} (example: {peer_precision}), channels_last {config.channels_last}, compile "
          f"{args.compile}, {done} steps each")
    print("| loop | images/s | GFLOP per step | TFLOP/s | share of peak |\n|---|---|---|---|---|")
    rates = {name: done * args.batch_size / seconds for name, seconds in elapsed.items()}
    for name, rate in rates.items():
        tflops = flops[name] * done / elapsed[name] / 1e12
        share = f"{tflops / args.peak_tflops:.1%}" if args.peak_tflops else "-"
        print(f"| {name} | {rate:,.1f} | {flops[name] / 1e9:,.1f} | {tflops:,.2f} | {share} |")
    print(f"ratio (diffusers-robust / diffusers example): {rates['diffusers-robust'] / rates['diffusers example']:.3f}")
    if args.profile:
        phases: dict[str, float] = {}
        profiled = make_trainer(args.preset, config, label_dim, device, amp_dtype, args.compile, phases)[0]
        profiled(next(data), generator)  # warm-up, not counted
        phases.clear()
        trainers = {"diffusers example": trainers["diffusers example"], "profiled": profiled}
        elapsed, done = alternate(trainers, data, generator, args.steps, args.block, device)
        print_profile(phases, done, elapsed["diffusers example"])


if __name__ == "__main__":
    main()
