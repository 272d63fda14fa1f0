"""Time to a good model: our main-job recipe against the Diffusers example's, same UNet, same digits, same run.

Usage: python benchmarks/bench_time_to_quality.py [--recipe training/configs/digits.yaml] [--eval-every-images 16000]
           [--arms peer ours] [--output runs/time_to_quality.json]

The peer is Diffusers' `examples/unconditional_image_generation/train_unconditional.py` (v0.42.1) with its defaults:
batch 16, AdamW (lr 1e-4, betas 0.95/0.999, weight decay 1e-6, eps 1e-8), cosine schedule with 500 warm-up steps over
its default 100 epochs, gradient clipping at 1.0, EMA (max decay 0.9999, inv_gamma 1, power 3/4), plain epsilon MSE
with `DDPMScheduler.add_noise`. The example script is not on PyPI, so its inner loop is written out here, line for line.
Ours is the recipe (`--recipe`) through the training loop's own factories (`diffusers_robust/training/setup.py`: scheduler,
objective, model, fused AdamW, LR schedule, foreach EMA), clipping at `max_grad_norm`.

Each arm runs in its own process with one thread, both at once, on the `ddpm-digits` preset UNet initialised with the same
seed. Every `--eval-every-images` training images, the arm's EMA weights generate 256 samples (DDIM, 50 steps, fixed
seeds) that the digits classifier (fitted on the train split) scores; the timer stops during evaluation. An arm stops
when it first has >= 80% confident samples with all 10 classes, or at the end of its schedule. Printed: images and
training seconds to that point per arm, and the ratio. The `peer-lr` arm (the example's loop with our learning rate
and batch) tells whether the recipe or the code makes the difference.
"""

import argparse
import json
import multiprocessing
import os
import platform
import time

RECIPE = os.path.join(os.path.dirname(__file__), "..", "training", "configs", "digits.yaml")
PRESET = os.path.join(os.path.dirname(__file__), "..", "pipelines", "ddpm-digits")


# The example's defaults (`peer-lr` takes our learning rate, warm-up and batch instead).
PEER = {"batch": 16, "lr": 1e-4, "warmup": 500, "epochs": 100, "betas": (0.95, 0.999), "weight_decay": 1e-6}


def build_arm(arm: str, recipe, data):
    """The arm's training parts on the `ddpm-digits` UNet (seed 0): `(model, step, batch, total_steps, ema, scheduler)`,
    `step(clean, step_index) -> loss` making one optimizer update. Ours: the recipe through the training loop's
    factories; the peers: the example's loop with `PEER` (or, `peer-lr`, our learning rate, warm-up and batch)."""
    import math

    import torch
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from diffusers_robust import build_pipeline_from_preset
    from diffusers_robust.models import LabelConditionedUNet
    from diffusers_robust.training.setup import (
        build_ema,
        build_lr_scheduler,
        build_model,
        build_objective,
        build_optimizer,
        build_scheduler,
    )

    pipeline = build_pipeline_from_preset(PRESET, seed=0)
    scheduler = build_scheduler(pipeline.scheduler, recipe)
    if arm == "ours":
        objective = build_objective(scheduler, recipe, data.label_dim)
        model = build_model(pipeline.unet, objective, recipe, torch.device("cpu"))
        optimizer = build_optimizer(model, recipe, torch.device("cpu"))
        batch, total_steps, clip = recipe.train_batch_size, recipe.max_train_steps, recipe.max_grad_norm
        lr_scheduler = build_lr_scheduler(recipe, optimizer, total_steps)
        ema = build_ema(model, recipe, torch.device("cpu"))

        def loss_of(clean, step_index):
            return objective(model, clean, None, torch.Generator().manual_seed(step_index)).loss.mean()
    else:
        batch, lr, warmup = PEER["batch"], PEER["lr"], PEER["warmup"]
        if arm == "peer-lr":
            batch, lr, warmup = recipe.train_batch_size, recipe.learning_rate, recipe.lr_warmup_steps
        total_steps, clip = math.ceil(len(data.dataset) / batch) * PEER["epochs"], 1.0
        model = LabelConditionedUNet(pipeline.unet, 0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=PEER["betas"], weight_decay=PEER["weight_decay"],
                                      eps=1e-8)
        lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
        ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)

        def loss_of(clean, step_index):  # the example's step
            noise = torch.randn(clean.shape)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],)).long()
            return F.mse_loss(model(scheduler.add_noise(clean, noise, timesteps), timesteps).float(), noise.float())

    def step(clean, step_index):
        loss = loss_of(clean, step_index)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())

    return model, step, batch, total_steps, ema, scheduler


def sample_quality(model, ema, scheduler, classifier, samples: int) -> dict:
    """The EMA weights' digits quality: `samples` DDIM-50 samples from fixed seeds, scored by `classifier`."""
    import torch

    from diffusers_robust import RobustDDIMScheduler, RobustDDPMPipeline
    from diffusers_robust.evaluation.digits import digits_quality
    from diffusers_robust.models import export_unet

    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    sampler = RobustDDPMPipeline(unet=export_unet(model).eval(), scheduler=RobustDDIMScheduler.from_config(scheduler.config))
    sampler.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(10_000 + i) for i in range(samples)]
    images = sampler(batch_size=samples, generator=generators, num_inference_steps=50, output_type="np").images
    ema.restore(model.parameters())
    model.train()
    return digits_quality(images, classifier=classifier)


def run_arm(arm: str, recipe_path: str, eval_every: int, samples: int, threshold: float, max_images: int | None,
            queue) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import math

    import torch
    from torch.utils.data import DataLoader

    from diffusers_robust.data.datasets import collate_image_batch, load_image_dataset
    from diffusers_robust.evaluation.digits import digits_classifier
    from diffusers_robust.training.config import TrainingConfig

    torch.set_num_threads(1)
    recipe = TrainingConfig.from_yaml(recipe_path)
    data = load_image_dataset("digits", "train", channels=1, resolution=8, seed=0)
    classifier = digits_classifier()
    model, step, batch, total_steps, ema, scheduler = build_arm(arm, recipe, data)
    loader = DataLoader(data.dataset, batch_size=batch, shuffle=True, collate_fn=collate_image_batch,
                        generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    step_index, images_seen, seconds, next_eval, history, reached = 0, 0, 0.0, eval_every, [], None
    model.train()
    if max_images:
        total_steps = min(total_steps, math.ceil(max_images / batch))  # a shorter run (smoke test); same schedule
    while step_index < total_steps and reached is None:
        for batch_data in loader:
            started = time.perf_counter()
            step(batch_data["pixel_values"], step_index)
            seconds += time.perf_counter() - started
            step_index += 1
            images_seen += batch_data["pixel_values"].shape[0]
            if images_seen >= next_eval or step_index == total_steps:
                next_eval += eval_every
                quality = sample_quality(model, ema, scheduler, classifier, samples)
                entry = {"step": step_index, "images": images_seen, "train_seconds": round(seconds, 2),
                         "confident_fraction": quality["confident_fraction"], "classes_present": quality["classes_present"]}
                history.append(entry)
                print(f"[{arm}] {entry}", flush=True)
                if quality["confident_fraction"] >= threshold and quality["classes_present"] == 10:
                    reached = entry
                    break
            if step_index == total_steps:
                break
    queue.put({"arm": arm, "batch": batch, "learning_rate": recipe.learning_rate if arm != "peer" else PEER["lr"],
               "total_steps": total_steps, "reached": reached, "history": history, "final_step": step_index,
               "train_seconds": round(seconds, 2)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=RECIPE)
    parser.add_argument("--eval-every-images", type=int, default=16_000)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--threshold", type=float, default=0.8, help="share of confident samples (with 10/10 classes)")
    parser.add_argument("--arms", nargs="+", default=["peer", "ours"], choices=["peer", "ours", "peer-lr"])
    parser.add_argument("--max-images", type=int, default=None, help="stop each arm after this many images (smoke test)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=run_arm, args=(arm, args.recipe, args.eval_every_images, args.samples,
                                                        args.threshold, args.max_images, queue)) for arm in args.arms]
    started = time.perf_counter()
    for process in processes:
        process.start()
    results = {result["arm"]: result for result in (queue.get() for _ in processes)}
    for process in processes:
        process.join()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, one thread per arm, arms run at once; "
          f"{time.perf_counter() - started:.0f} s in all")
    print("| arm | batch | LR | images to target | training seconds to target | last check |\n|---|---|---|---|---|---|")
    for arm in args.arms:
        result = results[arm]
        reached, last = result["reached"], result["history"][-1]
        to_images = f"{reached['images']:,}" if reached else f"not reached in {result['final_step']} steps"
        to_seconds = f"{reached['train_seconds']:.0f}" if reached else f"> {result['train_seconds']:.0f}"
        print(f"| {arm} | {result['batch']} | {result['learning_rate']:g} | {to_images} | {to_seconds} | "
              f"{last['confident_fraction']:.1%} confident, {last['classes_present']}/10 classes at {last['images']:,} images |")
    if "peer" in results and "ours" in results and results["ours"]["reached"]:
        ours = results["ours"]["reached"]["train_seconds"]
        peer = results["peer"]["reached"]
        ratio = f"{ours / peer['train_seconds']:.2f}" if peer else f"< {ours / results['peer']['train_seconds']:.2f}"
        print(f"time-to-target ratio (ours / peer): {ratio}")
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
