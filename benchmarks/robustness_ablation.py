#!/usr/bin/env python
"""Robustness ablation: train arms at equal budget and seed, evaluate each with `diffusers-robust evaluate`, one table.

    python benchmarks/robustness_ablation.py --output_dir runs/ablation --jobs 2

Every arm is `training/configs/digits.yaml` (the main job's budget: 6000 steps of batch 64 on the embedded digits)
with the overrides below, so arms differ only by the option they test. `plain` is a plain DDPM (no robust option);
`plain-seed1` is the same with another training seed, to show run-to-run noise. `epsilon-scaling` is a sampling-time
option, so it reuses the `plain` weights with the scheduler's epsilon scaling turned on; `restoration-training-learned`
evaluates the `restoration-training` weights with their conditioned denoiser (`--learned_restoration`) instead of the
prior-based methods. Each process runs one thread.
Finished arms (their `report.json` exists) are not run again; delete the folder to rerun one. `--evaluate_only`
evaluates the trained weights again with the current code (no training), for when the evaluation code changed.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN = ["--input_perturbation", "0", "--snr_gamma", "null", "--corruption_p", "0", "--corruptions"]
NOISE = ["--corruptions", "gaussian_noise", "impulse_noise", "--corruption_p", "0.25", "--corruption_severity", "1", "5",
         "--corruption_conditioning", "true"]
ARMS: dict[str, list[str]] = {
    "plain": PLAIN,
    # Restoration training needs min-SNR weighting (it is refused without): compare it with the `min-snr` arm.
    "restoration-training": [*PLAIN, *NOISE, "--snr_gamma", "5", "--restoration_training", "true",
                             "--restoration_max_timestep", "50"],
    "plain-seed1": [*PLAIN, "--seed", "1"],
    # The main job's recipe before this ablation (digits.yaml is now the plain DDPM), spelled out so a rerun is the same.
    "main-job": ["--input_perturbation", "0.1", "--snr_gamma", "5", "--corruptions", "gaussian_noise", "impulse_noise",
                 "--corruption_p", "0.1", "--corruption_severity", "1", "2", "--corruption_conditioning", "true"],
    "noisy-training": [*PLAIN, *NOISE],
    "augmentation": [*PLAIN, "--augment", "training/configs/augment/edm.yaml"],
    "input-perturbation": [*PLAIN, "--input_perturbation", "0.1"],
    "min-snr": [*PLAIN, "--snr_gamma", "5"],
}
# Arms that reuse another arm's weights: (that arm, scheduler config overrides, extra `evaluate` arguments).
DERIVED_ARMS = {
    "epsilon-scaling": ("plain", {"epsilon_scale_base": 1.005}, []),
    "restoration-training-learned": ("restoration-training", {}, ["--learned_restoration"]),
}
CASES = ["gaussian_noise/s1", "gaussian_noise/s3", "gaussian_noise/s5", "gaussian_noise/sigma0.3", "impulse_noise/s3",
         "impulse_noise/s5", "masking/s3", "gaussian_blur/s3"]


def run(command: list[str], log: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w", encoding="utf-8") as handle:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed with exit code {result.returncode}; see {log}")


def train_and_evaluate(name: str, output_dir: str, extra: list[str], evaluate_only: bool = False,
                       evaluate_args: tuple[str, ...] = ()) -> None:
    folder = os.path.join(output_dir, name)
    if evaluate_only:
        if name not in DERIVED_ARMS and not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise FileNotFoundError(f"{folder} holds no trained pipeline to evaluate again")
        shutil.rmtree(os.path.join(folder, "evaluation"), ignore_errors=True)
    if os.path.isfile(os.path.join(folder, "evaluation", "report.json")):
        return
    evaluate_extra = []
    if name in DERIVED_ARMS:
        source, overrides, evaluate_extra = DERIVED_ARMS[name]
        derive_arm(os.path.join(output_dir, source), folder, overrides)
    elif not os.path.isfile(os.path.join(folder, "model_index.json")):
        run([sys.executable, "training/train_robust_ddpm.py", "--config", "training/configs/digits.yaml", *ARMS[name],
             "--output_dir", folder, "--logger", "none", "--quality_samples", "0", "--report", "false",
             *extra], os.path.join(output_dir, f"{name}.train.log"))
    run([sys.executable, "-m", "diffusers_robust", "evaluate", folder, "--output_dir", os.path.join(folder, "evaluation"),
         "--cases", *CASES, *evaluate_extra, *evaluate_args], os.path.join(output_dir, f"{name}.evaluate.log"))
    print(f"done: {name}", flush=True)


def derive_arm(source: str, folder: str, overrides: dict) -> None:
    """A copy of a trained pipeline with its scheduler config changed (a sampling-time option)."""
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("checkpoints", "logs", "evaluation"), dirs_exist_ok=True)
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    config.update(overrides)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)


def table(output_dir: str, names: list[str]) -> tuple[str, dict]:
    results, lines = {}, []
    head = ("| arm | confident samples | classes | pixel FID | samples nearer train | "
            + " | ".join(f"{case} PSNR (gain)" for case in CASES) + " |")
    lines += [head, "|" + "---|" * (5 + len(CASES))]
    for name in names:
        with open(os.path.join(output_dir, name, "evaluation", "report.json"), encoding="utf-8") as handle:
            report = json.load(handle)
        results[name] = report
        generation, rows = report["generation"], {row["case"]: row for row in report["restoration"]}
        memory = generation["memorisation"]
        cells = [f"{rows[c]['psnr']:.2f} ({rows[c]['psnr'] - rows[c]['psnr_input']:+.2f})" for c in CASES]
        lines.append(f"| {name} | {generation['digits']['confident_fraction']:.1%} | {generation['digits']['classes_present']} | "
                     f"{generation['fid']:.3f} | {memory['share_closer_to_train']:.1%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/ablation")
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once (one thread each)")
    parser.add_argument("--arms", nargs="+", default=[*ARMS, *DERIVED_ARMS], choices=[*ARMS, *DERIVED_ARMS])
    parser.add_argument("--max_train_steps", type=int, default=None, help="override the budget (all arms alike)")
    parser.add_argument("--evaluate_only", action="store_true", help="evaluate the trained arms again, train nothing")
    parser.add_argument("--pipeline", default=None, help="the preset every arm trains (default: the config's, ddpm-digits)")
    parser.add_argument("--num_images", type=int, default=None, help="held-out images per restoration case (evaluate's)")
    parser.add_argument("--num_samples", type=int, default=None, help="samples scored per arm (evaluate's default)")
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    extra = ["--max_train_steps", str(args.max_train_steps)] if args.max_train_steps else []
    extra += ["--pipeline", args.pipeline] if args.pipeline else []
    evaluate_args = tuple(f"--{key}={getattr(args, key)}" for key in ("num_images", "num_samples") if getattr(args, key))
    trained = [name for name in args.arms if name in ARMS]
    derived = [name for name in args.arms if name in DERIVED_ARMS]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(train_and_evaluate, name, args.output_dir, extra, args.evaluate_only, evaluate_args)
                       for name in trained]:
            future.result()
    for name in derived:
        train_and_evaluate(name, args.output_dir, extra, args.evaluate_only, evaluate_args)
    markdown, results = table(args.output_dir, args.arms)
    with open(os.path.join(args.output_dir, "ablation.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown)
    with open(os.path.join(args.output_dir, "ablation.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(markdown)


if __name__ == "__main__":
    main()
