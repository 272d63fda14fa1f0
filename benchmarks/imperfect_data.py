#!/usr/bin/env python
"""Learning from imperfect data on the held-out digits: arms at equal budget, 2+ training seeds, one table.

    python benchmarks/imperfect_data.py --output_dir runs/imperfect --jobs 2

Settings (the digits' train split made imperfect by `diffusers_robust.data.imperfect`, data seed 0 whatever the training
seed):
- `noisy90`: 90% of records with Gaussian noise of std 0.2 ([0, 1] units), float arrays kept unclipped; 10% clean.
- `noisy100`: every record noisy at std 0.1 (float, unclipped), none clean.
- `png90`: `noisy90` stored as 8-bit PNG files (clipped, quantised), annotations in the folder's `annotations.csv`.
- `blur90`: 90% blurred (severity 3), annotated with that severity's `sigma_min`; 10% clean.
- `missing50`: every record with half of its pixels missing (one fixed random mask per record, known), float arrays.
Arms: `plain` (a plain DDPM on all records, annotations ignored: missing pixels are mid-grey), `ambient` (the noisy-data
objective with the annotations; on `missing50` the missing-pixel objective: x0 prediction from further-masked
inputs), `clean-only` (plain on the clean 10%: the same records in every 90/10 setting) and `oracle` (plain on the
clean train split). Every arm is `training/configs/digits.yaml` (same UNet, EMA, learning-rate schedule) with the
same `--max_train_steps`, `--prediction_type`, `--snr_gamma` and `--noisy_data_max_weight` (the main job's reference:
its recipe's, `sample`, 5 and 2; the cap changes only the `ambient` arms); each process runs one thread.

Figures on 512 samples per arm, drawn as `diffusers-robust evaluate` draws them (DDIM 50 steps, one generator per
sample from evaluation seed 1234, independent of the training seed), in the feature space of the digits classifier
(fitted on the clean train split only) against the 300 held-out digits (floor: the clean train split against them):
coverage, precision and recall (`manifold_figures`, k = 5; coverage is the figure a model
collapsed onto typical digits cannot win), Fréchet distance; the share of samples the classifier reads with p >= 0.8,
classes present; background noise (RMS where digits are blank: 0.003 for held-out digits), the samples' estimated noise
std (`estimate_noise_std`, median; samples are clipped to [0, 1] like any pipeline output), and
copying: the share of samples whose nearest clean train image is 3x closer than the second nearest (held-out digits:
the same figure, for comparison); in the 90/10 settings, the share of samples nearer one of the 150 clean records than
95% of held-out digits come to them (`Memorisation`: 5% for unseen digits, 100% for copies). Finished arms (their
`figures.json` exists) are not run again; `--score FOLDER --clean_subset PARQUET` re-scores one.
"""

import argparse
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from robustness_ablation import run  # one thread per process, offline, output to a log; raises naming the log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    "noisy90": "gaussian_noise:0.2=0.9,clean=0.1",
    "noisy100": "gaussian_noise:0.1=1.0",
    "png90": "gaussian_noise:0.2=0.9,clean=0.1",
    "blur90": "gaussian_blur:3=0.9,clean=0.1",
    "missing50": "missing_pixels:0.5=1.0",
}
ARMS = {"noisy90": ["plain", "ambient", "clean-only"], "noisy100": ["plain", "ambient"], "png90": ["plain", "ambient"],
        "blur90": ["plain", "ambient"], "missing50": ["plain", "ambient"]}
DATA_SEED, NUM_SAMPLES = 0, 512


def prepare_data(root: str, settings: list[str]) -> dict[str, dict[str, str]]:
    """Make the data of each of `settings` once (float parquet, PNG folder), and of `noisy90` for the clean subset;
    returns the paths."""
    import torch
    from torch.utils.data import DataLoader

    from diffusers_robust.data.datasets import collate_image_batch, load_digits_dataset, load_image_dataset
    from diffusers_robust.data.imperfect import make_imperfect, parse_recipe, save_imperfect

    paths = {}
    loaded = load_image_dataset("digits", channels=1, resolution=8)
    clean = torch.cat([b["pixel_values"] for b in DataLoader(loaded.dataset, batch_size=512, collate_fn=collate_image_batch)])
    labels = load_digits_dataset()["train"]["label"]
    for setting in dict.fromkeys([*settings, "noisy90"]):
        text = SETTINGS[setting]
        folder = os.path.join(root, "data", "noisy90" if setting == "png90" else setting)
        if not os.path.isdir(folder):
            recipe = parse_recipe(text)
            save_imperfect(make_imperfect(clean, recipe, seed=DATA_SEED), folder, recipe, DATA_SEED, labels)
        paths[setting] = {"float": os.path.join(folder, "float", "train.parquet"), "png": os.path.join(folder, "png")}
    clean_only = os.path.join(root, "data", "clean-only.parquet")
    if not os.path.isfile(clean_only):
        import datasets

        records = datasets.load_dataset("parquet", data_files=paths["noisy90"]["float"], split="train")
        records.filter(lambda r: r["noise_sigma"] == 0 and r["sigma_min"] == 0).to_parquet(clean_only)
    paths["clean-only"] = {"float": clean_only}
    return paths


def arm_arguments(setting: str, arm: str, paths: dict) -> list[str]:
    if arm == "oracle":
        return ["--dataset", "digits"]
    if arm == "clean-only":
        return ["--dataset", paths["clean-only"]["float"], "--image_column", "image", "--annotations", "ignore"]
    source = paths[setting]["png"] if setting == "png90" else paths[setting]["float"]
    extra = [] if setting == "png90" else ["--image_column", "image"]
    return ["--dataset", source, *extra, "--annotations", "ignore" if arm == "plain" else "null"]


def train_and_score(root: str, name: str, arguments: list[str], seed: int, steps: int, pipeline: str | None = None,
                    num_samples: int = NUM_SAMPLES) -> None:
    folder = os.path.join(root, name)
    if os.path.isfile(os.path.join(folder, "figures.json")):
        return
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        preset = ["--pipeline", pipeline] if pipeline else []
        run([sys.executable, "training/train_robust_ddpm.py", "--config", "training/configs/digits.yaml", *arguments, *preset,
             "--validation_split", "null", "--report", "false", "--logger", "none", "--seed", str(seed),
             "--max_train_steps", str(steps), "--checkpointing_steps", str(steps), "--validation_steps", str(steps),
             "--num_threads", "1", "--output_dir", folder, "--overwrite_output_dir"], os.path.join(root, f"{name}.log"))
    run([sys.executable, __file__, "--score", folder, "--clean_subset", os.path.join(root, "data", "clean-only.parquet"),
         "--num_samples", str(num_samples)], os.path.join(root, f"{name}.score.log"))
    print(f"done: {name}", flush=True)


def load_clean_subset(path: str):
    """The `train` split of `path` (a parquet file, an image folder or `digits`) as `(N, 1, 8, 8)` in `[-1, 1]`."""
    import torch
    from torch.utils.data import DataLoader

    from diffusers_robust.data.datasets import collate_image_batch, load_image_dataset

    loaded = load_image_dataset(path, channels=1, resolution=8, annotations="ignore")
    return torch.cat([b["pixel_values"] for b in DataLoader(loaded.dataset, batch_size=512, collate_fn=collate_image_batch)])


def draw_samples(folder: str, num_samples: int):
    """The trained pipeline in `folder` and its `num_samples` samples `(N, 1, 8, 8)` in `[-1, 1]`, drawn as `diffusers-robust
    evaluate` draws them (`evaluation.report.generate`: 50 DDIM steps, one generator per sample seeded from
    `EVALUATION_SEED`), one thread: the main job's column and these arms' are the same draw."""
    import torch

    from diffusers_robust import RobustDDPMPipeline
    from diffusers_robust.evaluation.defaults import EVALUATION_SEED
    from diffusers_robust.evaluation.report import generate

    torch.set_num_threads(1)
    pipe = RobustDDPMPipeline.from_pretrained(folder)
    return pipe, generate(pipe, num_samples, steps=50, seed=EVALUATION_SEED)


def score(folder: str, clean_subset: str | None = None, num_samples: int = NUM_SAMPLES) -> dict:
    """The figures of one trained arm (see the module docstring), written to `folder/figures.json`."""

    from diffusers_robust.data.units import to_unit_range
    from diffusers_robust.evaluation.digits import clean_sample_figures, digits_classifier, digits_quality
    from diffusers_robust.evaluation.metrics import Memorisation, Reference, copying_share, nearest_neighbour_distance

    pipe, samples = draw_samples(folder, num_samples)
    train, held_out = reference_digits()
    classifier = digits_classifier()
    figures = clean_sample_figures(samples, train, held_out, classifier)
    if clean_subset is not None:  # the 150 clean records of the 90/10 settings: the images clean-only trains on
        subset = load_clean_subset(clean_subset)
        figures["copying_clean_subset"] = copying_share(samples, subset)
        figures["copying_clean_subset_held_out"] = copying_share(held_out, subset)
        figures["distance_clean_subset"] = float(nearest_neighbour_distance(samples, subset).median())
        figures["distance_clean_subset_held_out"] = float(nearest_neighbour_distance(held_out, subset).median())
        # Samples nearer one of those 150 images than 95% of held-out digits come to them (5% for unseen digits).
        figures["memorisation_clean_subset"] = Memorisation().compute(samples, Reference(held_out, train_images=subset))[
            "memorisation"]
    figures["digits"] = digits_quality(to_unit_range(samples).permute(0, 2, 3, 1).numpy(), classifier=classifier)
    figures["sampling_stop_sigma"] = pipe.scheduler.config.sampling_stop_sigma
    with open(os.path.join(folder, "figures.json"), "w", encoding="utf-8") as handle:
        json.dump(figures, handle, indent=2)
    return figures


def reference_digits():
    import torch
    from torch.utils.data import DataLoader

    from diffusers_robust.data.datasets import collate_image_batch, load_image_dataset

    out = []
    for split in ("train", "test"):
        loaded = load_image_dataset("digits", split, channels=1, resolution=8)
        out.append(torch.cat([b["pixel_values"] for b in DataLoader(loaded.dataset, batch_size=512,
                                                                    collate_fn=collate_image_batch)]))
    return out


def floors() -> dict:
    """The same figures for the clean train split against the held-out digits."""
    from diffusers_robust.evaluation.digits import clean_sample_figures, digits_classifier

    train, held_out = reference_digits()
    return clean_sample_figures(train, train, held_out, digits_classifier())


def subset_share(figures: dict) -> float:
    """The memorisation share against the 150 clean images (`score`), NaN for arms scored before it existed."""
    return figures.get("memorisation_clean_subset", {}).get("share_nearer_than_held_out", math.nan)


def table(root: str, names: list[str]) -> tuple[str, dict]:
    rows, results = [], {}
    for name in names:
        path = os.path.join(root, name, "figures.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                results[name] = json.load(handle)
    groups: dict[str, list[str]] = {}
    for name in results:
        groups.setdefault(name.rsplit("-seed", 1)[0], []).append(name)
    lines = ["| setting / arm | seeds | coverage | precision | recall | confident samples | classes | Fréchet (classifier "
             "features) | background noise | sample noise std | copying (d1/d2 < 1/3) | NN distance to the 150 clean images | "
             "nearer one of the 150 than 95% of held-out digits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for group, members in groups.items():
        figs = [results[m] for m in members]

        def cell(get, fmt, figs=figs):
            return " / ".join(fmt(get(f)) for f in figs)

        def share(key):
            return cell(lambda f: f.get(key, math.nan), lambda v: f"{v:.1%}")

        lines.append(f"| {group} | {len(figs)} | {share('coverage')} | {share('precision')} | {share('recall')} | "
                     f"{cell(lambda f: f['digits']['confident_fraction'], lambda v: f'{v:.1%}')} | "
                     f"{cell(lambda f: f['digits']['classes_present'], str)} | "
                     f"{cell(lambda f: f['frechet_classifier'], lambda v: f'{v:.2f}')} | "
                     f"{cell(lambda f: f.get('background_noise', math.nan), lambda v: f'{v:.3f}')} | "
                     f"{cell(lambda f: f['noise_std'], lambda v: f'{v:.3f}')} | "
                     f"{cell(lambda f: f['copying'], lambda v: f'{v:.1%}')} | "
                     f"{cell(lambda f: f.get('distance_clean_subset', math.nan), lambda v: f'{v:.3f}')} | "
                     f"{cell(lambda f: subset_share(f), lambda v: f'{v:.1%}')} |")
        rows.append(group)
    floor = floors()
    with open(os.path.join(root, "floors.json"), "w", encoding="utf-8") as handle:
        json.dump(floor, handle, indent=2)
    key = "distance_clean_subset_held_out"
    held_out_distance = next((f[key] for f in results.values() if key in f), math.nan)
    lines.append(f"| floor: clean train split vs held-out | - | {floor['coverage']:.1%} | {floor['precision']:.1%} | "
                 f"{floor['recall']:.1%} | - | - | {floor['frechet_classifier']:.2f} | {floor['background_noise']:.3f} | "
                 f"{floor['noise_std']:.3f} | held-out digits: {floor['copying_held_out']:.1%} | held-out digits: "
                 f"{held_out_distance:.3f} | held-out digits: 5% by construction |")
    return "\n".join(lines) + "\n", results


# The figures `write_reference` keeps per arm: their mean over training seeds and their spread (max - min).
REFERENCE_KEYS = ("coverage", "precision", "recall", "confident_fraction", "classes_present", "frechet_classifier",
                  "background_noise", "noise_std", "copying")


def write_reference(results: dict, path: str, steps: int, prediction_type: str, snr_gamma: float | None,
                    max_weight: float | None) -> None:
    """Mean and spread over training seeds of the `noisy90` arms (trained `steps` steps), for `scripts/main_job.sh`: the
    job's own recipe (its seed 0 is the job's model) and the comparison arms."""
    arms = {}
    for label, prefix in (("job's recipe", "noisy90-ambient"), ("plain DDPM", "noisy90-plain"),
                          ("clean 10% only", "clean-only"), ("all-clean oracle", "oracle")):
        runs = [{**f["digits"], **f} for name, f in results.items() if name.rsplit("-seed", 1)[0] == prefix]
        if runs:
            arms[label] = {"seeds": len(runs)}
            for key in REFERENCE_KEYS:
                values = [run[key] for run in runs]
                mean = sum(values) / len(values)
                arms[label][key] = mean
                arms[label][f"{key}_spread"] = max(values) - min(values)
    seeds = ", ".join(f"{label}: {figures['seeds']}" for label, figures in arms.items())
    source = (f"benchmarks/imperfect_data.py --max_train_steps {steps} --prediction_type {prediction_type} --snr_gamma "
              f"{snr_gamma} --noisy_data_max_weight {max_weight}, setting noisy90 (the data of this job), training seeds "
              f"per arm: {seeds}; the same recipe, budget and evaluation seed as this job")
    # the job's recipe must match (a test checks)
    recipe = {"max_train_steps": steps, "prediction_type": prediction_type, "snr_gamma": snr_gamma,
              "noisy_data_max_weight": max_weight}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"source": source, "recipe": recipe, "arms": arms}, handle, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/imperfect")
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once (one thread each)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--max_train_steps", type=int, default=2000, help="optimizer steps of every arm")
    parser.add_argument("--write_reference", default=None,
                        help="also write the noisy90 arms' mean figures here (the main job prints them next to its own)")
    parser.add_argument("--pipeline", default=None, help="the preset every arm trains (default: the config's, ddpm-digits)")
    parser.add_argument("--num_samples", type=int, default=NUM_SAMPLES, help="samples scored per arm")
    parser.add_argument("--prediction_type", default=None, choices=("epsilon", "v_prediction", "sample"),
                        help="what every arm's UNet predicts (default: the preset's, epsilon)")
    parser.add_argument("--snr_gamma", type=float, default=None, help="every arm's min-SNR-gamma weighting (default: none)")
    parser.add_argument("--noisy_data_max_weight", type=float, default=None,
                        help="the noisy-data objective's weight cap s_max (default: the config's, 4)")
    parser.add_argument("--score", default=None, help="re-score one trained arm folder (writes its figures.json)")
    parser.add_argument("--clean_subset", default=None, help="with --score: the 150 clean records (data/clean-only.parquet)")
    args = parser.parse_args()
    if args.noisy_data_max_weight is not None and not args.noisy_data_max_weight > 1:
        parser.error(f"--noisy_data_max_weight (s_max) must be > 1, got {args.noisy_data_max_weight}")
    if args.score:
        print(json.dumps(score(args.score, args.clean_subset, args.num_samples)))
        return
    os.makedirs(args.output_dir, exist_ok=True)
    paths = prepare_data(args.output_dir, args.settings)
    objective = [*(["--prediction_type", args.prediction_type] if args.prediction_type else []),
                 *(["--snr_gamma", str(args.snr_gamma)] if args.snr_gamma is not None else []),
                 *(["--noisy_data_max_weight", str(args.noisy_data_max_weight)] if args.noisy_data_max_weight else [])]
    jobs = []
    for seed in args.seeds:
        jobs.append((f"oracle-seed{seed}", arm_arguments("", "oracle", paths) + objective, seed))
        for setting in args.settings:
            for arm in ARMS[setting]:
                name = f"clean-only-seed{seed}" if arm == "clean-only" else f"{setting}-{arm}-seed{seed}"
                jobs.append((name, arm_arguments(setting, arm, paths) + objective, seed))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(train_and_score, args.output_dir, name, arguments, seed, args.max_train_steps,
                                   args.pipeline, args.num_samples) for name, arguments, seed in jobs]:
            future.result()
    markdown, results = table(args.output_dir, [name for name, _, _ in jobs])
    if args.write_reference:
        write_reference(results, args.write_reference, args.max_train_steps, args.prediction_type or "the preset's",
                        args.snr_gamma, args.noisy_data_max_weight)
    with open(os.path.join(args.output_dir, "imperfect_data.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown)
    with open(os.path.join(args.output_dir, "imperfect_data.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    print(markdown)


if __name__ == "__main__":
    main()
