#!/usr/bin/env python
"""Few images, no copies: what each option does to memorisation on a small, balanced subset of the digits.

    python benchmarks/small_data.py --output_dir runs/small-data --images 150 --max_train_steps 4000 --seeds 0 1 --jobs 2

The subset: the first `--images / 10` digits of each class of the digits' train split (fixed, whatever the seed),
written as PNG files in `OUTPUT/data/digits-N/train` beside the held-out digits (`test/`, the test split). Every arm is
`training/configs/digits.yaml` (same UNet, EMA and schedule) on that folder for `--max_train_steps`, one thread per
process, with the options of `ARMS`:
- `plain`: a plain DDPM;
- `augment`: the EDM-style Albumentations recipe (`training/configs/augment/edm.yaml`: flips, rotations, scales, each
  with p = 0.12) as plain data augmentation (`augment_conditioning: false`: its rotated digits may leak into samples);
- `augment, labels`: the same with non-leaking augmentation labels (the UNet sees them in training, zeros at sampling);
- `noisy input`: half the training images under Gaussian noise or salt-and-pepper (severities 1-3), with corruption
  labels (zeros at sampling);
- `sigma_min 0.05`: every record annotated `sigma_min = 0.05` (the folder's `annotations.csv`): the model never regresses below
  noise of std 0.05, and sampling stops there with the clean estimate;
- `dropout 0.1`: dropout in the UNet's residual blocks while training (`--dropout`; the DDPM paper's CIFAR-10 value);
Every arm runs with `keep_best` (validation every eighth of the run) and is scored twice: its last weights and
`best/`, the validation with the lowest held-out clean loss.

Figures on 512 samples per arm (DDIM 50 steps, evaluation seed 1234) against the 300 held-out digits: the memorisation
share (`Memorisation`: samples nearer a training image than 95% of held-out digits come to the training images; 5% for
unseen digits, 100% for copies) and the median distance ratio; Fréchet distance, precision, recall and coverage in
the digits classifier's feature space; the confident share and classes present. Reference row: the same figures for
`plain` trained on the full train split (`--images 0` runs only that). Finished arms (`figures.json`) are not run
again. `--outside_check` scores the trained arms again against 300 train digits outside the subset, which neither
training nor `keep_best`'s choice (made on the held-out digits) saw.
"""

import argparse
import glob
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from imperfect_data import NUM_SAMPLES, draw_samples, load_clean_subset, reference_digits
from robustness_ablation import run  # one thread per process, offline, output to a log; raises naming the log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDM_AUGMENT = os.path.join(REPO, "training", "configs", "augment", "edm.yaml")
SIGMA_MIN = 0.05
DROPOUT = 0.1
ARMS: dict[str, list[str]] = {
    "plain": [],
    "augment": ["--augment", EDM_AUGMENT, "--augment_conditioning", "false"],
    "augment, labels": ["--augment", EDM_AUGMENT, "--augment_conditioning", "true"],
    "noisy input": ["--corruptions", "gaussian_noise", "impulse_noise", "--corruption_p", "0.5",
                    "--corruption_severity", "1", "3"],
    f"sigma_min {SIGMA_MIN:g}": [],  # the annotated copy of the subset (`write_subset`)
    f"dropout {DROPOUT:g}": ["--dropout", str(DROPOUT)],
}


def folder_name(arm: str) -> str:
    return arm.replace(",", "").replace(" ", "-")


def subset_indices(labels: list[int], images: int) -> list[int]:
    """The balanced subset: the first `images / 10` indices of each class in `labels`, class by class."""
    return [i for label in range(10) for i in [j for j, y in enumerate(labels) if y == label][: images // 10]]


def write_subset(root: str, images: int, sigma_min: float | None = None) -> str:
    """The balanced subset of `images` train digits as PNG files in `root/data/digits-N[-sigma]/train` (with
    `annotations.csv` beside them giving every training record `sigma_min` when set) and the test split in `test/`;
    returns the folder."""
    from diffusers_robust.data.annotations import write_sidecar
    from diffusers_robust.data.datasets import load_digits_dataset

    name = f"digits-{images}" + (f"-sigma{sigma_min:g}" if sigma_min else "")
    folder = os.path.join(root, "data", name)
    if os.path.isdir(folder):
        return folder
    digits = load_digits_dataset()
    chosen = subset_indices(digits["train"]["label"], images)
    staging = folder + ".tmp"
    for split, indices in (("train", chosen), ("test", range(len(digits["test"])))):
        os.makedirs(os.path.join(staging, split), exist_ok=True)
        for index in indices:
            digits[split][index]["image"].save(os.path.join(staging, split, f"{index:04d}.png"))
    if sigma_min:
        write_sidecar(os.path.join(staging, "annotations.csv"),
                      {f"train/{index:04d}.png": {"sigma_min": sigma_min} for index in chosen})
    os.replace(staging, folder)
    return folder


def train_and_score(root: str, arm: str, seed: int, images: int, steps: int, num_samples: int) -> str:
    name = f"{folder_name(arm)}-seed{seed}"
    folder = os.path.join(root, f"n{images}", name) if images else os.path.join(root, "full", name)
    if os.path.isfile(os.path.join(folder, "figures-best.json")):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    data = write_subset(root, images, SIGMA_MIN if arm.startswith("sigma_min") else None) if images else "digits"
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        run([sys.executable, "training/train_robust_ddpm.py", "--config", "training/configs/digits.yaml",
             "--dataset", data, "--seed", str(seed), "--max_train_steps", str(steps), "--checkpointing_steps", str(steps),
             "--validation_steps", str(max(1, steps // 8)), "--validation_images", "300", "--num_grid_images", "64",
             "--keep_best", "true", "--report", "false", "--logger", "none", "--num_threads", "1", "--output_dir", folder,
             "--overwrite_output_dir", *ARMS[arm]], f"{folder}.log")
    for scored, figures in ((folder, "figures.json"), (os.path.join(folder, "best"), "figures-best.json")):
        run([sys.executable, __file__, "--score", scored, "--train_images", data, "--num_samples", str(num_samples),
             "--figures", os.path.join(folder, figures)], f"{folder}.score.log")
    print(f"done: {arm}, seed {seed}", flush=True)
    return folder


def score(folder: str, train_source: str, num_samples: int) -> dict:
    """The figures of the module docstring for the pipeline in `folder`, its training images read from `train_source`."""
    from diffusers_robust.data.units import to_unit_range
    from diffusers_robust.evaluation.digits import clean_sample_figures, digits_classifier, digits_quality
    from diffusers_robust.evaluation.metrics import Memorisation, Reference

    _, samples = draw_samples(folder, num_samples)
    _, held_out = reference_digits()
    train = load_clean_subset(train_source)  # the train split of the folder (or of the digits), 8x8 grey
    classifier = digits_classifier()
    figures = clean_sample_figures(samples, train, held_out, classifier)
    figures["memorisation"] = Memorisation().compute(samples, Reference(held_out, train_images=train))["memorisation"]
    figures["digits"] = digits_quality(to_unit_range(samples).permute(0, 2, 3, 1).numpy(), classifier=classifier)
    return figures


def outside_subset_check(root: str, images: int, num_samples: int) -> str:
    """The selection-bias check: each trained arm's last and best weights scored against 300 train digits outside the
    subset, which neither training nor the checkpoint choice saw (memorisation share, Fréchet distance), as lines."""
    import numpy as np
    import torch

    from diffusers_robust.data.datasets import load_digits_dataset
    from diffusers_robust.data.units import to_model_range
    from diffusers_robust.evaluation.digits import digits_classifier
    from diffusers_robust.evaluation.metrics import Memorisation, Reference, frechet_distance

    train_split = load_digits_dataset()["train"]
    labels = train_split["label"]
    chosen = set(subset_indices(labels, images))

    def as_tensor(indices) -> torch.Tensor:
        stacked = np.stack([np.asarray(train_split[i]["image"], dtype=np.float32) for i in indices])
        return to_model_range(torch.from_numpy(stacked)[:, None] / 255)

    train, reference = as_tensor(sorted(chosen)), as_tensor([i for i in range(len(labels)) if i not in chosen][:300])
    classifier, lines = digits_classifier(), []
    for folder in sorted(glob.glob(os.path.join(root, f"n{images}", "*-seed*"))):
        for label, path in (("last", folder), ("best", os.path.join(folder, "best"))):
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                continue
            _, samples = draw_samples(path, num_samples)
            share = Memorisation().compute(samples, Reference(reference, train_images=train))["memorisation"]
            fd = frechet_distance(classifier.features(samples), classifier.features(reference))
            lines.append(f"{os.path.basename(folder)} {label}: memorisation share "
                         f"{share['share_nearer_than_held_out']:.1%}, Fréchet {fd:.2f}")
    return "\n".join(lines)


def table(folders: dict[str, list[str]]) -> str:
    """Two rows per arm, its last weights and its best checkpoint, the seeds' figures side by side."""
    lines = ["| arm | memorisation share | distance ratio | Fréchet | precision | recall | coverage | confident | classes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, paths in folders.items():
        for label, name in ((arm, "figures.json"), (f"{arm}: best checkpoint", "figures-best.json")):
            figures = []
            for path in paths:
                with open(os.path.join(path, name), encoding="utf-8") as handle:
                    figures.append(json.load(handle))
            if name == "figures-best.json":
                steps = []
                for path in paths:
                    with open(os.path.join(path, "best", "best.json"), encoding="utf-8") as handle:
                        steps.append(str(json.load(handle)["step"]))
                label += f" (step {' / '.join(steps)})"

            def cell(get, fmt, figures=figures):
                return " / ".join(fmt(get(f)) for f in figures)

            lines.append(f"| {label} | {cell(lambda f: f['memorisation']['share_nearer_than_held_out'], '{:.1%}'.format)} | "
                         f"{cell(lambda f: f['memorisation']['distance_ratio_to_held_out'], '{:.2f}'.format)} | "
                         f"{cell(lambda f: f['frechet_classifier'], '{:.2f}'.format)} | "
                         f"{cell(lambda f: f['precision'], '{:.1%}'.format)} | {cell(lambda f: f['recall'], '{:.1%}'.format)} | "
                         f"{cell(lambda f: f['coverage'], '{:.1%}'.format)} | "
                         f"{cell(lambda f: f['digits']['confident_fraction'], '{:.1%}'.format)} | "
                         f"{cell(lambda f: f['digits']['classes_present'], str)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/small-data")
    parser.add_argument("--images", type=int, default=150, help="training digits (a multiple of 10); 0: the full train "
                                                                "split, plain only (the reference row)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max_train_steps", type=int, default=4000)
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once (one thread each)")
    parser.add_argument("--num_samples", type=int, default=NUM_SAMPLES, help="samples scored per arm")
    parser.add_argument("--outside_check", action="store_true",
                        help="score the trained arms against 300 train digits outside the subset instead (no training)")
    parser.add_argument("--score", default=None, help=argparse.SUPPRESS)  # internal: score one pipeline folder
    parser.add_argument("--train_images", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--figures", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score:
        with open(args.figures, "w", encoding="utf-8") as handle:
            json.dump(score(args.score, args.train_images, args.num_samples), handle, indent=2)
        return
    if args.images % 10:
        parser.error(f"--images {args.images}: a multiple of 10 (the subset is balanced over the 10 classes)")
    if args.outside_check:
        print(outside_subset_check(args.output_dir, args.images, args.num_samples))
        return
    arms = ["plain"] if args.images == 0 else args.arms
    os.makedirs(args.output_dir, exist_ok=True)
    if args.images:  # written once, before the arms' threads (two writing one new folder would race)
        for sigma_min in {SIGMA_MIN if arm.startswith("sigma_min") else None for arm in arms}:
            write_subset(args.output_dir, args.images, sigma_min)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {(arm, seed): pool.submit(train_and_score, args.output_dir, arm, seed, args.images, args.max_train_steps,
                                            args.num_samples) for arm in arms for seed in args.seeds}
        folders: dict[str, list[str]] = {}
        for (arm, _), future in futures.items():
            folders.setdefault(arm, []).append(future.result())
    markdown = table(folders)
    with open(os.path.join(args.output_dir, f"small_data_n{args.images}.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
