"""Time to a good model: our main-job recipe against the Diffusers example's, same UNet, same digits, same run.

Usage: python benchmarks/bench_time_to_quality.py [--recipe training/configs/digits.yaml] [--eval-every-images 16000]
           [--arms peer ours] [--output runs/time_to_quality.json]

The peer is Diffusers' `examples/unconditional_image_generation/train_unconditional.py` (v0.42.1) with its defaults:
batch 16, AdamW (lr 1e-4, betas 0.95/0.999, weight decay 1e-6, eps 1e-8), cosine schedule with 500 warm-up steps over
its default 100 epochs, gradient clipping at 1.0, EMA (max decay 0.9999, inv_gamma 1, power 3/4), plain epsilon MSE
with `DDPMScheduler.add_noise`. The example script is not on PyPI, so its inner loop is written out here, line for line.
Ours is the recipe (`--recipe`) through the training script's own pieces: `RobustDiffusionObjective`, `build_optimizer`
(fused AdamW), `build_lr_scheduler`, a foreach EMA, clipping at `max_grad_norm`.

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


def run_arm(arm: str, recipe_path: str, eval_every: int, samples: int, threshold: float, max_images: int | None,
            queue) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import math

    import torch
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from torch.utils.data import DataLoader

    from diffusers_robust import RobustDDIMScheduler, RobustDDPMPipeline, build_pipeline_from_preset
    from diffusers_robust.data.datasets import collate_image_batch, load_image_dataset
    from diffusers_robust.evaluation.metrics import digits_classifier, digits_quality
    from diffusers_robust.models import LabelConditionedUNet, export_unet
    from diffusers_robust.training.config import TrainingConfig
    from diffusers_robust.training.objective import RobustDiffusionObjective
    from diffusers_robust.training.setup import build_lr_scheduler, build_optimizer, configure_scheduler

    torch.set_num_threads(1)
    recipe = TrainingConfig.from_yaml(recipe_path)
    pipeline = build_pipeline_from_preset(PRESET, seed=0)
    scheduler = configure_scheduler(pipeline.scheduler, recipe)
    model = LabelConditionedUNet(pipeline.unet, 0)
    data = load_image_dataset("digits", "train", channels=1, resolution=8, seed=0)
    classifier = digits_classifier()
    if arm == "ours":
        batch, lr = recipe.train_batch_size, recipe.learning_rate
        steps_per_epoch = math.ceil(len(data.dataset) / batch)
        total_steps = recipe.max_train_steps
        optimizer = build_optimizer(model, recipe, torch.device("cpu"))
        lr_scheduler = build_lr_scheduler(recipe, optimizer, total_steps)
        ema = EMAModel(model.parameters(), decay=recipe.ema_max_decay, use_ema_warmup=True, inv_gamma=recipe.ema_inv_gamma,
                       power=recipe.ema_power, foreach=True)
        objective = RobustDiffusionObjective(scheduler, snr_gamma=recipe.snr_gamma)
        clip = recipe.max_grad_norm
    else:
        peer = PEER
        batch, lr, warmup = peer["batch"], peer["lr"], peer["warmup"]
        if arm == "peer-lr":
            batch, lr, warmup = recipe.train_batch_size, recipe.learning_rate, recipe.lr_warmup_steps
        steps_per_epoch = math.ceil(len(data.dataset) / batch)
        total_steps = steps_per_epoch * peer["epochs"]
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=peer["betas"], weight_decay=peer["weight_decay"],
                                      eps=1e-8)
        lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
        ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
        clip = 1.0
    loader = DataLoader(data.dataset, batch_size=batch, shuffle=True, collate_fn=collate_image_batch,
                        generator=torch.Generator().manual_seed(0))

    def evaluate() -> dict:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
        sampler = RobustDDPMPipeline(unet=export_unet(model).eval(), scheduler=RobustDDIMScheduler.from_config(scheduler.config))
        sampler.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(10_000 + i) for i in range(samples)]
        images = sampler(batch_size=samples, generator=generators, num_inference_steps=50, output_type="np").images
        ema.restore(model.parameters())
        return digits_quality(images, classifier=classifier)

    torch.manual_seed(0)
    step, images_seen, seconds, next_eval, history = 0, 0, 0.0, eval_every, []
    reached = None
    model.train()
    if max_images:
        total_steps = min(total_steps, math.ceil(max_images / batch))  # a shorter run (smoke test); same schedule
    while step < total_steps and reached is None:
        for batch_data in loader:
            started = time.perf_counter()
            clean = batch_data["pixel_values"]
            if arm == "ours":
                generator = torch.Generator().manual_seed(step)
                loss = objective(model, clean, None, generator).loss.mean()
            else:  # the example's step
                noise = torch.randn(clean.shape)
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],)).long()
                loss = F.mse_loss(model(scheduler.add_noise(clean, noise, timesteps), timesteps).float(), noise.float())
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(model.parameters())
            seconds += time.perf_counter() - started
            step += 1
            images_seen += clean.shape[0]
            if images_seen >= next_eval or step == total_steps:
                next_eval += eval_every
                quality = evaluate()
                entry = {"step": step, "images": images_seen, "train_seconds": round(seconds, 2),
                         "confident_fraction": quality["confident_fraction"], "classes_present": quality["classes_present"]}
                history.append(entry)
                print(f"[{arm}] {entry}", flush=True)
                if quality["confident_fraction"] >= threshold and quality["classes_present"] == 10:
                    reached = entry
                    break
            if step == total_steps:
                break
    queue.put({"arm": arm, "batch": batch, "learning_rate": lr, "total_steps": total_steps, "reached": reached,
               "history": history, "final_step": step, "train_seconds": round(seconds, 2)})


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
