"""The evaluation report of a trained pipeline, as `diffusers-robust evaluate` and the end of a training run write it.

Everything is held out: restoration and losses use the evaluation split, the digits classifier is fitted on the train
split only, generation is compared with the evaluation split, and every random draw comes from the evaluation seed
(`EVALUATION_SEED` unless given), not from the training seed.
"""

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.annotations import estimated_noise_levels
from ..data.embedded import embedded_dataset
from ..data.splits import HoldOut, describe_source
from ..data.units import to_model_range, to_unit_range
from ..models import image_size
from .defaults import DEFAULT_RESTORATION_CASES, EVALUATION_SEED
from .images import stack_images
from .losses import validation_losses
from .metrics import InceptionFeatures, Metric, PixelFeatures, Reference, dataset_extras, generation_metrics
from .restoration import case_cost, evaluate_restoration

logger = logging.getLogger(__name__)
REPORT_VERSION = 1
LOSS_CORRUPTIONS = ("gaussian_noise", "impulse_noise", "gaussian_blur")


def load_evaluation_images(dataset: Any, split: str, channels: int, resolution: int, limit: int,
                           hold_out: HoldOut | None = None) -> tuple[torch.Tensor, str | None]:
    """Up to `limit` images `(N, C, H, W)` in `[-1, 1]` of `dataset`'s `split` (or its `hold_out` part), in order, and
    a note when the stored images were converted to the model's channels or size (else None; logged as a warning too);
    `ValueError` if none decode."""
    from ..data.datasets import collate_image_batch, load_image_dataset

    loaded = load_image_dataset(dataset, split, hold_out=hold_out, channels=channels, resolution=resolution)
    batches = (batch["pixel_values"] for batch in DataLoader(loaded.dataset, batch_size=256, collate_fn=collate_image_batch))
    images = stack_images(batches, limit)
    if images.shape[0] == 0:
        raise ValueError(f"{dataset} split '{split}' holds no decodable image")
    note = None
    if loaded.source_shape is not None and tuple(loaded.source_shape) != (channels, resolution, resolution):
        stored = "x".join(str(n) for n in loaded.source_shape)
        note = (f"the images of {describe_source(dataset)} split '{split}' are stored as {stored} (channels x height x "
                f"width) and were converted to the model's {channels}x{resolution}x{resolution}")
        logger.warning(note)
    return images, note


# Training images the report compares samples with: 5,000 images of 3x256x256 are 3.9 GB of float32.
TRAIN_REFERENCE_IMAGES = 5_000


@torch.no_grad()
def generate(pipeline, count: int, steps: int, seed: int, batch_size: int = 256) -> torch.Tensor:
    """`count` DDIM samples `(N, C, H, W)` in `[-1, 1]` from `pipeline`, one seeded generator per image."""
    from ..schedulers import RobustDDIMScheduler

    sampler = type(pipeline)(**{**pipeline.components, "scheduler": RobustDDIMScheduler.from_config(pipeline.scheduler.config)})
    sampler.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, count, batch_size):
        generators = [torch.Generator().manual_seed(seed + i) for i in range(start, min(count, start + batch_size))]
        images = sampler(batch_size=len(generators), generator=generators, num_inference_steps=steps, output_type="pt").images
        out.append(to_model_range(images.cpu()))
    return torch.cat(out)


def generation_figures(samples: torch.Tensor, reference: Reference, metrics: Sequence[Metric]) -> dict[str, Any]:
    """The figures of generated `samples` `(N, C, H, W)` in `[-1, 1]`: each [`Metric`]'s against the held-out
    `reference` (by default FID / KID, memorisation, and on digits the classifier's view)."""
    figures: dict[str, Any] = {"samples": int(samples.shape[0])}
    for metric in metrics:
        figures.update(metric.compute(samples, reference))
    return figures


def held_out_noise(images: torch.Tensor) -> dict[str, float]:
    """How noisy the held-out images `(N, C, H, W)` (`[-1, 1]`) themselves read (`estimated_noise_levels`): the share
    read as noisy and the median std (`[0, 1]` units). A held-out part of noisy training data is noisy, and every
    figure of the report then compares with noisy images."""
    levels = estimated_noise_levels(images.float())
    return {"noisy_share": float((levels > 0).float().mean()), "median_noise_std": float(levels.median())}


def held_out_noise_warning(report: dict[str, Any]) -> list[str]:
    """The report's warning lines when most held-out images read noisy (none otherwise)."""
    noise = report.get("held_out_noise") or {}
    if noise.get("noisy_share", 0.0) <= 0.5:
        return []
    return [f"**The held-out images are noisy themselves:** {noise['noisy_share']:.0%} read as noisy (median estimated "
            f"std {noise['median_noise_std']:.3f}), so the figures below compare with noisy images, not clean ones. "
            "Score the model on clean held-out images: `diffusers-robust evaluate MODEL --dataset CLEAN_DATA`.", ""]


def pipeline_denoiser(pipeline):
    """`(x_t, t, labels) -> prediction` of a pipeline's UNet (as its `prediction_type` says, like the training loss), and
    the `labels_for` of its condition embedding (or None)."""

    def denoise(sample: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return pipeline._unet_output(sample, timesteps, labels)

    embedding = pipeline.condition_embedding
    if embedding is None:
        return denoise, None

    def labels_for(corruption: str, severity: int, batch: int) -> torch.Tensor | None:
        from ..data.corruptions import canonical_name

        name = canonical_name(corruption)
        return embedding.labels_for(name, severity, batch, pipeline.device) if name in embedding.corruptions else None

    return denoise, labels_for


def evaluate_pipeline(
    pipeline,
    dataset: str = "digits",
    split: str = "test",
    train_split: str = "train",
    num_images: int = 300,
    num_samples: int = 256,
    sampling_steps: int = 50,
    cases: Sequence[tuple[str, int | float]] = DEFAULT_RESTORATION_CASES,
    inception_weights: str | None = None,
    seed: int = EVALUATION_SEED,
    progress: bool = True,
    learned_restoration: bool = False,
    hold_out: HoldOut | None = None,
    train_dataset: Any = None,
    train_images: int = TRAIN_REFERENCE_IMAGES,
) -> dict[str, Any]:
    """
    Evaluate a [`RobustDDPMPipeline`] on held-out data: restoration per corruption case, generation (FID/KID and on
    digits the classifier's figures), memorisation, and validation losses. Returns the report as a dict (see README).

    Args:
        inception_weights (`str`, *optional*): a TorchScript Inception-v3 file for FID/KID; without it, an offline
            pixel feature extractor is used and the report says so.
        learned_restoration (`bool`): restore with a restoration-trained pipeline's conditioned denoiser where it can.
        hold_out ([`~data.splits.HoldOut`], *optional*): the held-out images are this part of `split` (a seeded
            hold-out of the training split; [`~data.splits.plan_held_out`]); the memorisation check then compares with
            the other part.
        train_dataset (*optional*): the training images' source when it is not `dataset` (held-out `validation_data`).
        train_images (`int`): how many training images (the first, in order) the memorisation and copying figures and
            the classical baselines compare with; a bound on memory, since they are held as one tensor.
    """
    size = image_size(pipeline.unet.config.sample_size)[0]
    held_out, conversion = load_evaluation_images(dataset, split, pipeline.image_channels, size, num_images, hold_out)
    train, _ = load_evaluation_images(dataset if train_dataset is None else train_dataset, train_split,
                                      pipeline.image_channels, size, train_images, hold_out.other() if hold_out else None)
    extras, entry = dataset_extras(dataset), embedded_dataset(dataset)
    if extras is not None and min(held_out.shape[0], num_samples) < extras.minimum_images:
        raise ValueError(f"the figures of {describe_source(dataset)} need at least {extras.minimum_images} held-out images "
                         f"and samples, got {held_out.shape[0]} and {num_samples}")
    labels = entry.labels(split)[:held_out.shape[0]] if extras is not None and hold_out is None else None
    classifier = extras.classifier() if extras is not None else None
    features = InceptionFeatures(inception_weights, pipeline.device) if inception_weights else PixelFeatures()

    # One bar in denoiser calls x images, so its ETA weighs a RePaint case (about 100 calls) against a one-call one.
    costs = {case: case_cost(*case, held_out.shape[0], size=tuple(held_out.shape[-2:])) for case in cases}
    generation_cost, loss_cost = num_samples * sampling_steps, held_out.shape[0] * (1 + 2 * 3 * len(LOSS_CORRUPTIONS))
    steps = tqdm(total=sum(costs.values()) + generation_cost + loss_cost, desc="evaluate", disable=not progress,
                 unit="calls", unit_scale=True)
    restoration = evaluate_restoration(pipeline, held_out, labels, cases, seed, classifier, progress=False,
                                       fit_images=train, learned_restoration=learned_restoration,
                                       on_case_done=lambda case: steps.update(costs[case]))
    examples = {row["case"]: row.pop("_examples") for row in restoration}
    samples = generate(pipeline, num_samples, sampling_steps, seed)
    metrics = generation_metrics(features, seed, extras.generation_metrics(classifier) if extras else ())
    generation = generation_figures(samples, Reference(held_out, labels, train), metrics)
    steps.update(generation_cost)
    denoise, labels_for = pipeline_denoiser(pipeline)
    losses = validation_losses(denoise, pipeline.scheduler, held_out.to(pipeline.device), LOSS_CORRUPTIONS, (1, 3, 5),
                               labels_for, seed=seed)
    steps.update(loss_cost)
    steps.close()
    return {
        "report_version": REPORT_VERSION,
        "dataset": describe_source(dataset), "split": split,
        "held_out_share": hold_out.share if hold_out else None, "train_split": train_split, "num_images": int(held_out.shape[0]),
        "train_images": int(train.shape[0]), "conversion": conversion, "held_out_noise": held_out_noise(held_out),
        "seed": seed, "sampler": f"DDIM-{sampling_steps}",
        "restoration": restoration, "generation": generation, "losses": losses,
        "_samples": samples,  # for the sample grid; not written to report.json
        "_examples": examples,  # per case: clean, corrupted and restored images, for restoration.png
    }


def restoration_markdown(rows: list[dict[str, Any]]) -> str:
    """The restoration table: PSNR / SSIM (and accuracy) of the input, the classical baseline and the restoration per
    case; rows whose method inverts the exact operator are starred, with the caveat below the table."""
    accuracy = "accuracy" in rows[0] if rows else False
    head = ("| case | method | baseline | PSNR input | PSNR baseline | PSNR restored | gain (dB) | SSIM input | "
            "SSIM restored |")
    rule = "|---|---|---|---|---|---|---|---|---|"
    if accuracy:
        head += " accuracy input | accuracy restored |"
        rule += "---|---|"
    lines, caveats = [head, rule], {}
    for row in rows:
        star = ""
        if row.get("caveat"):
            star = "*" * (list(caveats).index(row["caveat"]) + 1 if row["caveat"] in caveats else len(caveats) + 1)
            caveats.setdefault(row["caveat"], star)
        baseline = f"{row['psnr_baseline']:.2f}" if row.get("psnr_baseline") is not None else "-"
        line = (f"| {row['case']}{star} | {row['method']} | {row.get('baseline') or '-'} | {row['psnr_input']:.2f} | "
                f"{baseline} | {row['psnr']:.2f} | {row['psnr'] - row['psnr_input']:+.2f} | {row['ssim_input']:.3f} | "
                f"{row['ssim']:.3f} |")
        if accuracy:
            line += f" {row['accuracy_input']:.3f} | {row['accuracy']:.3f} |"
        lines.append(line)
    lines += ["", *(f"{star} {caveat}." for caveat, star in caveats.items())] if caveats else []
    return "\n".join(lines)


def report_markdown(report: dict[str, Any], title: str = "Evaluation") -> str:
    generation = report["generation"]
    memorisation = generation["memorisation"]
    lines = [
        f"# {title}", "",
        f"Held-out data: `{report['dataset']}` split `{report['split']}` ({report['num_images']} images); "
        f"evaluation seed {report['seed']}; sampler {report['sampler']}"
        + (f"; training images compared with: the first {report['train_images']}." if "train_images" in report else "."),
        "",
        *([f"**Converted:** {report['conversion']}.", ""] if report.get("conversion") else []),
        *held_out_noise_warning(report),
        "## Restoration", "",
        "PSNR of the set's mean squared error (dB, [0, 1] scale) and mean SSIM, against the clean images. "
        "Corrupted inputs are rounded to 8 bits.", "",
        restoration_markdown(report["restoration"]), "",
        "![restoration](restoration.png)", "",
        "## Generation", "",
        f"{generation['samples']} samples. FID {generation['fid']:.3f}, KID {generation['kid']:.5f} against the held-out "
        f"images, features: {generation['feature_extractor']}.",
    ]
    if "digits" in generation:
        digits = generation["digits"]
        lines += ["", f"Digits classifier (train split only): {digits['confident_fraction']:.1%} of samples classified with "
                  f"probability >= 0.8; {digits['classes_present']} of 10 classes present; class entropy "
                  f"{digits['class_entropy_bits']:.3f} bits (uniform: {math.log2(10):.3f})."]
    if "clean_samples" in generation:
        clean = generation["clean_samples"]
        lines += ["", f"Clean samples, against the held-out digits in the classifier's feature space: coverage "
                  f"{clean['coverage']:.1%} (share of held-out digits with a sample closer than their 5th nearest held-out "
                  f"neighbour; a model collapsed onto typical digits scores low), precision {clean['precision']:.1%}, "
                  f"recall {clean['recall']:.1%}, density {clean['density']:.2f}, Fréchet distance "
                  f"{clean['frechet_classifier']:.2f}; background noise {clean['background_noise']:.3f} (RMS where digits "
                  f"are blank; held-out digits: about 0.003), estimated noise std {clean['noise_std']:.3f} ([0, 1] units); "
                  f"{clean['copying']:.1%} of samples copy a train image (nearest 3x closer than the second; held-out "
                  f"digits: {clean['copying_held_out']:.1%})."]
    lines += [
        "", f"Memorisation: median nearest-neighbour RMS distance of samples to train images "
        f"{memorisation['median_distance_to_train']:.4f}, to held-out images {memorisation['median_distance_to_held_out']:.4f} "
        f"(a train subset as large as the held-out set); {memorisation['share_closer_to_train']:.1%} of samples are closer "
        "to a train image than to a held-out one (50% for a model that does not memorise); "
        f"{memorisation['share_nearer_than_held_out']:.1%} are nearer a train image than 95% of held-out images are "
        f"(5% for unseen images, 100% for copies), at {memorisation['distance_ratio_to_held_out']:.2f}x the held-out "
        "images' median distance." + (
            "" if memorisation.get("meaningful", True) else
            f" **Not meaningful here**: the samples lie farther from every image than held-out images lie from train "
            f"images ({memorisation['median_distance_held_out_to_train']:.4f}) by more than 1.5x, so they are not images "
            "of the data."),
        "", "![samples](samples.png)", "",
        "## Validation losses", "",
        "Denoising MSE at fixed evaluation timesteps and noise: clean, on the corrupted distribution "
        "(`<corruption>/s<k>`), and restoration (`restore/...`: corrupted input, clean target).", "",
        "| input | loss |", "|---|---|",
        *(f"| {name} | {value:.4f} |" for name, value in report["losses"].items()),
    ]
    return "\n".join(lines) + "\n"


def plot_restoration(rows: list[dict[str, Any]], path: str, examples: dict[str, torch.Tensor] | None = None,
                     title: str = "Restoration") -> None:
    """A bar chart of PSNR per case (corrupted input, classical baseline, restored) under `title`, its legend outside
    the plot, and below it, with `examples` (case -> `(3, k, C, H, W)` clean, corrupted, restored in `[-1, 1]`), one
    captioned row per case of up to `EXAMPLES_SHOWN` images as clean | corrupted | restored, at least 4 screen pixels
    per image pixel, grey gaps between the three views and white ones between images."""
    from .images import add_caption, make_grid

    parts = [_psnr_chart(rows, title)]
    for case in [row["case"] for row in rows if examples and row["case"] in examples]:
        clean, corrupted, restored = (views[:EXAMPLES_SHOWN] for views in to_unit_range(examples[case]).clamp(0, 1))
        scale = max(4, math.ceil(EXAMPLE_ROW_WIDTH / (clean.shape[-1] * 3 * clean.shape[0])))
        triples = [make_grid(torch.stack(views).permute(0, 2, 3, 1).numpy(), columns=3, min_size=0, gap=2, min_scale=scale)
                   for views in zip(clean, corrupted, restored, strict=True)]  # grey gaps inside, white between images
        row = PIL.Image.new("RGB", (sum(t.width + 12 for t in triples) - 12, triples[0].height), "white")
        for index, triple in enumerate(triples):
            row.paste(triple.convert("RGB"), (index * (triple.width + 12), 0))
        parts.append(add_caption(row, f"{case}: clean | corrupted | restored, {clean.shape[0]} images"))
    width = max(part.width for part in parts)
    canvas = PIL.Image.new("RGB", (width, sum(part.height + 8 for part in parts)), "white")
    top = 0
    for part in parts:
        canvas.paste(part.convert("RGB"), (0, top))
        top += part.height + 8
    canvas.save(path)


# Restoration examples per case in restoration.png, and the width (screen pixels) a row is enlarged to at least.
EXAMPLES_SHOWN = 4
EXAMPLE_ROW_WIDTH = 640


def _psnr_chart(rows: list[dict[str, Any]], title: str) -> "PIL.Image.Image":
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(8.0, 0.5 * len(rows) + 3.5), 4.8))
    axes.set_title(f"{title}: PSNR (dB) per corruption case", fontsize=11)
    positions = np.arange(len(rows))
    bars = (("psnr_input", "corrupted input"), ("psnr_baseline", "classical baseline"), ("psnr", "restored"))
    for offset, (key, label) in zip((-0.27, 0, 0.27), bars, strict=True):
        axes.bar(positions + offset, [min(row[key], 60) if row.get(key) is not None else 0 for row in rows], width=0.27,
                 label=label)
    axes.set_xticks(positions, [row["case"] + ("*" if row.get("caveat") else "") for row in rows], rotation=60,
                    ha="right", fontsize=8)
    axes.set_ylabel("PSNR (dB, capped at 60)")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, never over bars
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=100, format="png")
    plt.close(figure)
    buffer.seek(0)
    return PIL.Image.open(buffer).convert("RGB")


def write_report(report: dict[str, Any], output_dir: str, title: str = "Evaluation") -> dict[str, str]:
    """Write `report.json`, `report.md`, `restoration.png` and `samples.png` into `output_dir`; returns their paths."""
    from .images import add_caption, make_grid

    os.makedirs(output_dir, exist_ok=True)
    paths = {name: os.path.join(output_dir, name) for name in ("report.json", "report.md", "restoration.png", "samples.png")}
    samples = report.get("_samples")
    with open(paths["report.json"], "w", encoding="utf-8") as handle:
        json.dump({k: v for k, v in report.items() if not k.startswith("_")}, handle, indent=2)
    with open(paths["report.md"], "w", encoding="utf-8") as handle:
        handle.write(report_markdown(report, title))
    plot_restoration(report["restoration"], paths["restoration.png"], report.get("_examples"), title)
    if samples is not None:
        grid = to_unit_range(samples[:64]).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        picture = make_grid(grid, gap=2, min_scale=4)  # >= 4 screen pixels per pixel, grey gaps
        caption = f"{len(grid)} of {len(samples)} samples, {report['sampler']}, seed {report['seed']}"
        add_caption(picture, caption).save(paths["samples.png"])
    return paths
