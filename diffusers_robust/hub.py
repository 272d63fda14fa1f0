"""Model cards and Hub upload for trained pipelines."""

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

if TYPE_CHECKING:
    from .training.summary import RunSummary

# What a pipeline repository holds; checkpoints, logs and optimizer state never leave the machine.
PIPELINE_FILES = [
    "model_index.json",
    "unet/config.json",
    "unet/*.safetensors",
    "scheduler/scheduler_config.json",
    "condition_embedding/config.json",
    "condition_embedding/*.safetensors",
    "pipeline.py",  # with */diffusers_robust.*.py: what `DiffusionPipeline.from_pretrained(trust_remote_code=True)` imports
    "*/diffusers_robust.*.py",
    "README.md",
    "metrics.json",
    "training_config.yaml",
    "samples/final.png",
    "evaluation/report.json",
    "evaluation/report.md",
    "evaluation/*.png",
]


def _format_losses(losses: Mapping[str, float]) -> str:
    rows = ["| input | denoising loss |", "|---|---|"]
    rows += [f"| {name} | {value:.4f} |" for name, value in losses.items()]
    return "\n".join(rows)


def write_model_card(
    output_dir: str,
    repo_id: str,
    training_config: Mapping[str, Any],
    summary: "RunSummary",
    license: str = "apache-2.0",
) -> str:
    """
    Write `output_dir/README.md`: Hub metadata (`library_name: diffusers`, tags including `diffusers-robust`
    and `unconditional-image-generation`, dataset, license) and a body saying how the model was trained (from
    `training_config`, the recipe as a dict, and `summary`, the run's [`RunSummary`]), its robust options, validation
    figures, the sample grid and a usage snippet. Returns the path.
    """
    dataset = str(training_config.get("dataset"))
    robust_lines, scheduler_lines = _robust_option_lines(training_config, summary.scheduler_robust_options)
    quality_text = _quality_text(summary.sample_quality)
    report_text = _report_text(summary.report)
    body = f"""
# {repo_id}

An unconditional DDPM trained with [diffusers-robust](https://pypi.org/project/diffusers-robust/) on
`{dataset}` (split `{training_config.get("dataset_split")}`) at {summary.resolution}x{summary.resolution} pixels
for {summary.global_step} optimizer steps ({summary.images_seen} images, batch
{summary.train_batch_size_effective} x {summary.num_processes} processes x
{training_config.get("gradient_accumulation_steps")} accumulation), seed {training_config.get("seed")},
{"EMA weights" if training_config.get("use_ema") else "raw weights"}.

## Robust training options

{robust_lines}

Sampling-time options stored in the scheduler (epsilon scaling `lambda_t = slope * t + base`; `sampling_stop_sigma`:
the noise std, in [0, 1] units, below which sampling stops and returns the clean estimate):

{scheduler_lines}
{_annotation_text(summary.annotations)}
## Validation

Denoising loss on {summary.validation_images} held-out images ({_held_out_text(summary.held_out, training_config)}),
clean and with the validation corruptions at severities {training_config.get("validation_severities")}:

{_format_losses(summary.validation_losses) if summary.validation_losses else "No validation split was configured."}
{_monitor_text(summary.monitor_history)}
{quality_text}
![samples](samples/final.png)
{report_text}

## Usage

```python
from diffusers_robust import RobustDDPMPipeline, RobustDDIMScheduler

pipe = RobustDDPMPipeline.from_pretrained("{repo_id}")
pipe.scheduler = RobustDDIMScheduler.from_config(pipe.scheduler.config)
images = pipe(batch_size=16, num_inference_steps=50).images
```

With Diffusers alone installed beside `diffusers-robust`: `DiffusionPipeline.from_pretrained("{repo_id}",
trust_remote_code=True)` (the repository's `pipeline.py` is one import line of the installed package).

Training configuration: `training_config.yaml`; all figures: `metrics.json`.
"""
    card = ModelCard.from_template(_card_data(dataset, license), template_str="---\n{{ card_data }}\n---\n" + body)
    path = os.path.join(output_dir, "README.md")
    card.save(path)
    return path


def _monitor_text(history: dict[int, dict[str, float]] | None) -> str:
    """The memorisation monitor at the last validation, as a paragraph ("" without one)."""
    if not history:
        return ""
    step = max(history)
    figures = history[step]
    return (f"\nMemorisation monitor at step {step}: generalisation gap {figures['generalisation_gap']:+.4f} (the held-out "
            f"clean loss minus the same loss on as many training images, {figures['train_loss']:.4f}; it grows as a "
            f"model memorises); {figures['memorisation_share']:.0%} of the sample grid nearer a training image than 95% "
            "of held-out images are (about 5% for a model that does not copy). Every validation's figures: "
            "`metrics.json`, `monitor_history`.\n")


def _card_data(dataset: str, license: str) -> ModelCardData:
    """The card's Hub metadata: `library_name: diffusers`, the tags the Hub lists it under, the license, and the dataset
    when it is a Hub id (`user/name` that is no local path)."""
    return ModelCardData(
        library_name="diffusers",
        license=license,
        tags=["diffusers-robust", "unconditional-image-generation", "diffusers", "ddpm", "robust"],
        datasets=[dataset] if "/" in dataset and not os.path.exists(dataset) else None,
        pipeline_tag="unconditional-image-generation",
    )


def _robust_option_lines(training_config: Mapping[str, Any], scheduler_options: Mapping[str, Any]) -> tuple[str, str]:
    """Markdown lists of the options that shaped training (the scheduler's training-time options and the recipe's
    corruption, restoration and augmentation options) and of the sampling-time options stored in the scheduler."""
    from .schedulers.robust_options import options_acting_at

    training_options = {key: scheduler_options.get(key) for key in ("prediction_type", *options_acting_at("training"))}
    training_options.update({key: training_config.get(key) for key in (
        "snr_gamma", "corruptions", "corruption_p", "corruption_severity", "corruption_conditioning",
        "restoration_training", "augment", "augment_conditioning")})
    sampling_options = {key: scheduler_options.get(key) for key in options_acting_at("sampling")}
    return ("\n".join(f"- `{key}`: {value}" for key, value in training_options.items()),
            "\n".join(f"- `{key}`: {value}" for key, value in sampling_options.items()))


def _quality_text(quality: dict | None) -> str:
    """The card's line on sample quality (labelled embedded data with `quality_samples`; empty otherwise)."""
    if not quality:
        return ""
    return (f"\nSample quality ({quality['scorer']}, {quality['samples']} samples): "
            f"{quality['confident_fraction']:.1%} classified with probability >= 0.8; "
            f"{quality['classes_present']} of {len(quality['class_counts'])} classes present.\n")


def _report_text(report: dict | None) -> str:
    """The card's held-out evaluation section (empty without a report)."""
    if not report:
        return ""
    from .evaluation.report import restoration_markdown

    generation = report["generation"]
    return f"""
## Held-out evaluation

Restoration of {report["num_images"]} held-out images (`{report["split"]}`) per corruption, beside the corrupted input and
a classical baseline (PSNR in dB of the set's mean squared error; evaluation seed {report["seed"]}). Restore with
`pipe(image=..., corruption=..., severity=...)`.

{restoration_markdown(report["restoration"])}

![restoration](evaluation/restoration.png)

Generation ({generation["samples"]} samples, {report["sampler"]}): FID {generation["fid"]:.3f} and KID {generation["kid"]:.5f}
against the held-out images with {generation["feature_extractor"]} features.{_memorisation_text(generation)} Full report:
`evaluation/report.md`.

![evaluation samples](evaluation/samples.png)
"""


def _memorisation_text(generation: dict) -> str:
    """The report's memorisation figure as a sentence ("" for a report written before it existed)."""
    memorisation = generation.get("memorisation", {})
    if "share_nearer_than_held_out" not in memorisation:
        return ""
    return (f" Memorisation: {memorisation['share_nearer_than_held_out']:.1%} of the samples are nearer a training image "
            "than 95% of held-out images are (5% for unseen images, 100% for copies of training images), at "
            f"{memorisation['distance_ratio_to_held_out']:.2f}x the held-out images' median distance.")


def _held_out_text(held_out: dict | None, training_config: dict) -> str:
    """What the held-out images are: a seeded share of the training split, or a split or source of their own."""
    if not held_out:
        return f"`{training_config.get('validation_split')}`"
    if held_out.get("held_out_share"):
        return (f"{held_out['held_out_share']:.0%} of `{held_out['split']}` held out (seed {held_out['held_out_seed']}), "
                "never trained on")
    return f"split `{held_out['split']}` of `{held_out['source']}`"


def _annotation_text(annotations: dict | None) -> str:
    """The card's paragraph on imperfect training data (empty when no record was annotated)."""
    if annotations and annotations.get("masked"):
        return (f"\nTrained on images with missing pixels (Ambient Diffusion): {annotations['masked']} of "
                f"{annotations['records']} training images miss pixels, {annotations['observed_share']:.1%} of the pixels "
                "are observed on average; the UNet sees the observed pixels and their mask and predicts the clean image.\n")
    if not annotations or annotations["clean"] == annotations["records"]:
        return ""
    return (f"\nTrained on imperfect data with the noisy-data objective: of {annotations['records']} training images, "
            f"{annotations['clean']} clean, {annotations['noisy']} with Gaussian noise "
            f"({annotations.get('levels', 'levels given by the data')}), {annotations['restricted']} "
            f"usable only within a noise range; lowest trusted noise std {annotations['lowest_trusted_sigma']:.4g}.\n")


def prepare_hub_repo(repo_id: str, private: bool = False, token: str | None = None, endpoint: str | None = None) -> str:
    """
    Before training: check that a Hub token is available and the endpoint answers, and create `repo_id` (private when
    asked), so `--push_to_hub` fails in seconds, not after the run. Returns the repository URL; `ValueError` otherwise.
    """
    from huggingface_hub.utils import get_token

    api = HfApi(endpoint=endpoint, token=token)
    if (token or get_token()) is None:
        raise ValueError("push_to_hub needs a Hub token: set HF_TOKEN or run `hf auth login` (nothing was trained yet)")
    try:
        return str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    except Exception as error:  # noqa: BLE001 - connection, auth and name errors all stop the run before it starts
        raise ValueError(f"push_to_hub: {explain_hub_error(error, repo_id, api.endpoint)}; nothing was trained yet") from error


def explain_hub_error(error: Exception, repo_id: str, endpoint: str) -> str:
    """One line naming why the Hub refused or could not be reached, and the fix (token, network, endpoint URL)."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return (f"the Hub at {endpoint} refused the token ({status}) for {repo_id}: set HF_TOKEN to a token with write "
                "access, or run `hf auth login`")
    if status is not None:
        return f"the Hub at {endpoint} answered {status} for {repo_id} ({str(error).splitlines()[0]})"
    chain, cause = [], error
    while cause is not None and len(chain) < 8:
        chain.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    if any("Connect" in name or "Timeout" in name for name in chain):
        return f"cannot reach the Hub at {endpoint} (check the network, or HF_ENDPOINT if it names another server)"
    return f"cannot create {repo_id} on {endpoint} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"


def push_pipeline_to_hub(
    output_dir: str, repo_id: str, private: bool = False, token: str | None = None, endpoint: str | None = None
) -> str:
    """
    Create `repo_id` (as private when asked) and upload the pipeline, model card, metrics, config and final
    sample grid from `output_dir` in one commit; never checkpoints or logs. The token comes from `token`
    or the environment (`HF_TOKEN`) and is never printed. Returns the commit URL.

    Example:

    ```py
    >>> from diffusers_robust.hub import push_pipeline_to_hub
    >>> push_pipeline_to_hub("outputs/digits", "me/robust-digits", private=True)  # doctest: +SKIP
    ```
    """
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=output_dir, allow_patterns=PIPELINE_FILES,
            commit_message="Upload RobustDDPMPipeline trained with diffusers-robust",
        )
    except Exception as error:  # noqa: BLE001 - one line that names the cause and the fix, the trace stays in __cause__
        raise ValueError(f"push: {explain_hub_error(error, repo_id, api.endpoint)}") from error
    return str(commit)
