#!/usr/bin/env python
"""The main job's recipe at its own budget: one option changed at a time, each variant scored on the train split only.

    python benchmarks/recipe_sweep.py --output_dir runs/sweep --jobs 2

Every variant trains the noisy-data objective on the main job's data (`noisy90` of `benchmarks/imperfect_data.py`: the
digits' train split, 90% under Gaussian noise of std 0.2, 10% clean) with `training/configs/imperfect-digits.yaml` and
the options below changed, for `--max_train_steps` (the job's 1200), training seed 0 unless a variant says otherwise,
one thread per process. Its 512 samples (drawn as `diffusers-robust evaluate` draws them: DDIM 50 steps, one
generator per sample from seed 1234; until the weight-cap sweep of 2026-12-04, one generator for the batch) are scored
against 300 images of the *clean train split* (a fixed draw), never the held-out digits, which the main job's table
scores and which therefore choose nothing: coverage, precision, recall and Fréchet distance in the digits classifier's
feature space, the confident share, background noise
(`evaluation.digits.clean_sample_figures`). Finished variants (their `figures.json` exists) are not run again.
The batch-size variants (`EQUAL_TIME_BATCHES`) change the batch, and the steps and warm-up with it, so that training
takes the job's wall time. The model-size variants (`UNET_WIDTHS`) train the digits preset with other UNet widths at
the job's steps (their training time, in the table's last column, says what they cost). Since 2026-12-04 the job
predicts the clean image with min-SNR-5 weights and caps the noisy-data weight at 2; the variants measured before
(`benchmarks/RESULTS.md`) changed the job of then: `epsilon prediction, plain MSE` (with cap 4) is the first, `weight
cap 4` the second.
"""

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from imperfect_data import NUM_SAMPLES, draw_samples, prepare_data, reference_digits
from robustness_ablation import run  # one thread per process, offline, output to a log; raises naming the log

VARIANTS: dict[str, list[str]] = {
    "job": [],
    "job, training seed 1": ["--seed", "1"],  # run-to-run noise: how far apart two seeds of one recipe land
    "learning rate 2e-3": ["--learning_rate", "0.002"],
    "learning rate 5e-4": ["--learning_rate", "0.0005"],
    "warm-up 100 steps": ["--lr_warmup_steps", "100"],
    "EMA max decay 0.999": ["--ema_max_decay", "0.999"],
    "EMA warm-up power 2/3": ["--ema_power", "0.6667"],
    "no EMA": ["--use_ema", "false"],
    "weight cap 4": ["--noisy_data_max_weight", "4"],  # the job until the weight-cap sweep (2026-12-04)
    "weight cap 4, training seed 1": ["--noisy_data_max_weight", "4", "--seed", "1"],
    "weight cap 2": ["--noisy_data_max_weight", "2"],  # the job now
    "weight cap 2, training seed 1": ["--noisy_data_max_weight", "2", "--seed", "1"],
    "weight cap 1.5": ["--noisy_data_max_weight", "1.5"],
    "weight cap 1.5, training seed 1": ["--noisy_data_max_weight", "1.5", "--seed", "1"],
    "weight cap 1.25": ["--noisy_data_max_weight", "1.25"],
    "weight cap 1.25, training seed 1": ["--noisy_data_max_weight", "1.25", "--seed", "1"],
    "weight cap 8": ["--noisy_data_max_weight", "8"],
    "learning rate 2e-3, training seed 1": ["--learning_rate", "0.002", "--seed", "1"],
    "learning rate 3e-3": ["--learning_rate", "0.003"],
    "dropout 0.1": ["--dropout", "0.1"],
    # the prediction target and its weighting; the first is the job until 2026-12-04 (cap 4 then), which the variants
    # above changed in the sweeps of that morning
    "epsilon prediction, plain MSE": ["--prediction_type", "epsilon", "--snr_gamma", "null", "--noisy_data_max_weight", "4"],
    "epsilon prediction, min-SNR-5": ["--prediction_type", "epsilon"],
    "v-prediction, plain MSE": ["--prediction_type", "v_prediction", "--snr_gamma", "null"],
    "x0 prediction, plain MSE": ["--snr_gamma", "null"],
    "x0 prediction, min-SNR-20": ["--snr_gamma", "20"],
    "bf16 autocast": ["--mixed_precision", "bf16"],
}
# Model size: the digits preset with its UNet's widths changed, written into the output folder (`preset_folder`).
UNET_WIDTHS: dict[str, list[int]] = {"UNet 1.5x as wide (48, 96, 96)": [48, 96, 96],
                                     "UNet half as wide (16, 32, 32)": [16, 32, 32]}
# Batch size against steps at the job's wall time: (batch, share of the job's steps and warm-up). A step of batch 128
# costs 1.68x one of 64, batch 32 0.635x (`python benchmarks/bench_train_step.py --recipe
# training/configs/imperfect-digits.yaml --threads 1 --batch-size B`, 2026-12-04: 734 / 618 / 486 images/s).
EQUAL_TIME_BATCHES: dict[str, tuple[int, float]] = {"batch 128, 0.59x the steps (equal time)": (128, 0.594),
                                                    "batch 32, 1.57x the steps (equal time)": (32, 1.574)}
JOB_WARMUP_STEPS = 300
REFERENCE_IMAGES, REFERENCE_SEED = 300, 0


def variant_options(variant: str, steps: int) -> list[str]:
    """The command-line options of a variant at a budget of `steps` job steps (its own steps last, so they win)."""
    if variant in UNET_WIDTHS:
        return []  # `train_and_score` passes the variant's preset
    if variant in EQUAL_TIME_BATCHES:
        batch, share = EQUAL_TIME_BATCHES[variant]
        return ["--train_batch_size", str(batch), "--max_train_steps", str(max(1, round(steps * share))),
                "--lr_warmup_steps", str(round(JOB_WARMUP_STEPS * share))]
    return VARIANTS[variant]


def folder_name(variant: str) -> str:
    return variant.replace(",", "").replace(" ", "-").replace("/", "-")


def preset_folder(root: str, variant: str) -> str:
    """The digits preset with the UNet widths of `variant` (`UNET_WIDTHS`), as a preset folder under `root`."""
    import shutil

    folder = os.path.join(root, "presets", folder_name(variant))
    if not os.path.isdir(folder):
        shutil.copytree(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipelines",
                                     "ddpm-digits"), folder)
        config_path = os.path.join(folder, "unet", "config.json")
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        config["block_out_channels"] = UNET_WIDTHS[variant]
        config["norm_num_groups"] = min(config["norm_num_groups"], min(UNET_WIDTHS[variant]))
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
    return folder


def train_and_score(root: str, variant: str, data: str, steps: int, num_samples: int) -> None:
    folder = os.path.join(root, folder_name(variant))
    if os.path.isfile(os.path.join(folder, "figures.json")):
        return
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        run([sys.executable, "training/train_robust_ddpm.py", "--config", "training/configs/imperfect-digits.yaml",
             "--dataset", data, "--seed", "0", "--max_train_steps", str(steps), "--checkpointing_steps", str(steps),
             "--validation_steps", str(steps), "--logger", "none", "--num_threads", "1", "--output_dir", folder,
             "--overwrite_output_dir", *variant_options(variant, steps),
             *(["--pipeline", preset_folder(root, variant)] if variant in UNET_WIDTHS else [])],
            os.path.join(root, f"{folder_name(variant)}.log"))
    run([sys.executable, __file__, "--score", folder, "--num_samples", str(num_samples)],
        os.path.join(root, f"{folder_name(variant)}.score.log"))
    print(f"done: {variant}", flush=True)


def score(folder: str, num_samples: int) -> dict:
    """The figures of one trained variant against the train-split reference, written to `folder/figures.json`."""
    import torch

    from diffusers_robust.data.units import to_unit_range
    from diffusers_robust.evaluation.digits import clean_sample_figures, digits_classifier, digits_quality

    _, samples = draw_samples(folder, num_samples)
    train, _ = reference_digits()
    reference = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(REFERENCE_SEED))[:REFERENCE_IMAGES]]
    classifier = digits_classifier()
    figures = clean_sample_figures(samples, train, reference, classifier)
    figures["confident_fraction"] = digits_quality(to_unit_range(samples).permute(0, 2, 3, 1).numpy(),
                                                   classifier=classifier)["confident_fraction"]
    with open(os.path.join(folder, "figures.json"), "w", encoding="utf-8") as handle:
        json.dump(figures, handle, indent=2)
    return figures


def table(root: str, variants: list[str]) -> str:
    lines = ["| variant | coverage | precision | recall | confident | Fréchet | background noise | training s |",
             "|---|---|---|---|---|---|---|---|"]
    for variant in variants:
        with open(os.path.join(root, folder_name(variant), "figures.json"), encoding="utf-8") as handle:
            f = json.load(handle)
        with open(os.path.join(root, folder_name(variant), "metrics.json"), encoding="utf-8") as handle:
            seconds = json.load(handle)["training_wall_time_seconds"]
        lines.append(f"| {variant} | {f['coverage']:.1%} | {f['precision']:.1%} | {f['recall']:.1%} | "
                     f"{f['confident_fraction']:.1%} | {f['frechet_classifier']:.2f} | {f['background_noise']:.3f} | "
                     f"{seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/sweep")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once (one thread each)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS) + list(EQUAL_TIME_BATCHES) + list(UNET_WIDTHS),
                        choices=list(VARIANTS) + list(EQUAL_TIME_BATCHES) + list(UNET_WIDTHS))
    parser.add_argument("--max_train_steps", type=int, default=1200, help="optimizer steps of every variant")
    parser.add_argument("--num_samples", type=int, default=NUM_SAMPLES, help="samples scored per variant")
    parser.add_argument("--score", default=None, help=argparse.SUPPRESS)  # internal: score one trained folder
    args = parser.parse_args()
    if args.score:
        print(json.dumps(score(args.score, args.num_samples)))
        return
    os.makedirs(args.output_dir, exist_ok=True)
    data = prepare_data(args.output_dir, ["noisy90"])["noisy90"]["float"]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(train_and_score, args.output_dir, variant, data, args.max_train_steps, args.num_samples)
                       for variant in args.variants]:
            future.result()
    markdown = table(args.output_dir, args.variants)
    with open(os.path.join(args.output_dir, "sweep.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
