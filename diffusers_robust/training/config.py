"""The training recipe: one flat, typed configuration read from YAML and overridden on the command line."""

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..schedulers.robust_options import robust_option


def option(default: Any, help: str) -> Any:
    """A config field with its `--help` text as metadata (lists get a fresh copy per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def robust_option_field(name: str) -> Any:
    """A config field for the robust scheduler option `name`: its default (off) and help come from the one table of
    robust options next to the schedulers."""
    spec = robust_option(name)
    return field(default=spec.default, metadata={"help": f"{spec.help} (acts at {spec.acts_at})"})


@dataclass
class TrainingConfig:
    """Every option of `training/train_robust_ddpm.py` (`diffusers-robust train`); each field's `help` metadata is its
    `--help` text and its line in the README table."""

    # Run
    seed: int = option(0, "seeds weights, data order, augmentation, corruption and noise")
    output_dir: str = option("outputs/robust-ddpm", "pipeline, checkpoints, samples, logs, metrics and model card go here")
    pipeline: str = option("ddpm-digits", "preset to train from: a name (diffusers-robust presets), a folder holding "
                           "model_index.json and configs, or a Hub id")
    # Data
    dataset: str = option("digits", "'digits' (embedded), an image folder, parquet/arrow files, or a Hub dataset name")
    dataset_split: str = option("train", "split to train on")
    validation_split: str | None = option("test", "held-out split for the validation loss and report; 'test' missing "
                                          "from the dataset holds out validation_share of the training split; null: none")
    validation_data: str | None = option(None, "held-out images from elsewhere (image folder, parquet/arrow files, "
                                         "save_to_disk folder, Hub id): its validation_split if it has one, else its only split")
    validation_share: float = option(0.1, "share of the training split held out (never trained on) when the dataset has "
                                     "no validation split and no validation_data is given")
    validation_holdout_seed: int = option(0, "seed of that hold-out (not the training seed, so runs of any seed hold out "
                                          "the same images)")
    image_column: str | None = option(None, "image column; detected (first Image feature) if null")
    streaming: bool = option(False, "stream the dataset (IterableDataset) instead of map-style")
    channels: int | None = option(None, "1 or 3 (images are converted to it; another count than the preset's builds the "
                                  "UNet for it); null: the preset's, and images of another count stop before training")
    resolution: int | None = option(None, "training side in pixels (images are resized and cropped to it; the UNet samples "
                                    "at it); null: the preset's, and images of another size stop before training")
    center_crop: bool = option(True, "center crop after resizing; false: random crop")
    shuffle_buffer: int = option(1000, "shuffle buffer of a stream, in records")
    dataloader_num_workers: int = option(0, "DataLoader worker processes per training process")
    # Imperfect training data: quality annotations per record (data/annotations.py; [0, 1] image units)
    annotations: str | None = option(
        None, "null: the dataset's noise_sigma/sigma_min/sigma_max columns or an annotations.csv/.json in the image "
        "folder, if any; a CSV/JSON path; 'auto': estimate each image's noise std; 'ignore': ignore them")
    noise_sigma: float | None = option(None, "one known Gaussian noise std for every training image; null: per record")
    annotations_required: bool = option(False, "refuse training records that carry no annotation")
    noisy_data_max_weight: float = option(
        4.0, "s_max: cap on the noisy-data target's scale k^2; an image with noise std s trains where "
        "sigma_t >= s * sqrt(s_max / (s_max - 1))")
    further_mask_p: float = option(
        0.1, "missing-pixel training (records with a mask): share of the observed pixels hidden further at each step, "
        "so the model learns to fill pixels it is not shown (Ambient Diffusion's delta)")
    # Augmentation and corruption ("noisy training")
    augment: str | None = option(None, "Albumentations recipe file, e.g. training/configs/augment/edm.yaml; null: none")
    augment_conditioning: bool = option(True, "feed augment labels to the UNet while training, zeros when sampling")
    corruptions: list[str] = option([], "corruptions applied to training images, e.g. [gaussian_noise]")
    corruption_p: float = option(0.0, "probability that a training image is corrupted before noising")
    corruption_severity: list[int] = option([1, 5], "inclusive severity range drawn from")
    corruption_conditioning: bool = option(True, "feed which corruption a training image got to the UNet, zeros when sampling")
    restoration_training: bool = option(
        False, "corrupted images keep their clean image as the target, so the model learns to undo them")
    restoration_max_timestep: int | None = option(
        None, "restoration training: corrupted images get timesteps below this; null: all")
    # Diffusion objective: the robust scheduler options (schedulers/robust_options.py) replace the preset's values
    prediction_type: str | None = option(None, "epsilon, v_prediction or sample; null: the preset scheduler's")
    input_perturbation: float = robust_option_field("input_perturbation")
    offset_noise: float = robust_option_field("offset_noise")
    pyramid_noise_discount: float = robust_option_field("pyramid_noise_discount")
    epsilon_scale_base: float = robust_option_field("epsilon_scale_base")
    epsilon_scale_slope: float = robust_option_field("epsilon_scale_slope")
    sampling_stop_sigma: float = robust_option_field("sampling_stop_sigma")
    sampling_observed_share: float = robust_option_field("sampling_observed_share")
    snr_gamma: float | None = option(None, "min-SNR-gamma loss weighting (5.0 in the paper); null: plain MSE")
    # Optimisation
    train_batch_size: int = option(64, "images per process per micro-batch")
    max_train_steps: int | None = option(2000, "optimizer steps; null: derived from num_epochs")
    num_epochs: int | None = option(None, "epochs, used when max_train_steps is null")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    learning_rate: float = option(2e-4, "peak learning rate")
    lr_scheduler: str = option("cosine", "cosine, constant or linear (after warm-up)")
    lr_warmup_steps: int = option(100, "linear warm-up, in optimizer steps")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float | None = option(1.0, "gradient clipping norm; null: no clipping")
    mixed_precision: str = option("no", "no, fp16 or bf16")
    fused_optimizer: bool = option(True, "fused AdamW kernel where PyTorch has one for the device (CUDA, CPU)")
    channels_last: bool = option(False, "UNet weights and activations in channels_last memory format (for GPUs; slower on CPU)")
    num_threads: int | None = option(
        None, "PyTorch threads per process; null: OMP_NUM_THREADS, else cores / processes on this machine")
    # EMA
    use_ema: bool = option(True, "keep an exponential moving average of the weights; the EMA weights are exported")
    ema_max_decay: float = option(0.9999, "upper bound of the EMA decay")
    ema_inv_gamma: float = option(1.0, "EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power")
    ema_power: float = option(0.75, "EMA warm-up power")
    # Checkpoints
    checkpointing_steps: int = option(500, "save a resumable checkpoint every N optimizer steps (and at the end)")
    checkpoints_total_limit: int | None = option(2, "keep at most N checkpoints; null: keep all")
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint folder")
    overwrite_output_dir: bool = option(False, "a fresh run deletes checkpoints of an earlier run in output_dir (else it stops)")
    # Validation
    validation_steps: int = option(500, "validate every N optimizer steps (and at the end)")
    validation_images: int = option(256, "held-out images for the validation loss")
    validation_corruptions: list[str] | None = option(None, "corruptions for the validation loss; null: the training list")
    validation_severities: list[int] = option([1, 3, 5], "severities for the validation loss")
    num_grid_images: int = option(16, "images in the sample grid")
    num_inference_steps: int = option(50, "DDIM steps for sample grids")
    quality_samples: int = option(0, "digits only: score N samples with a classifier of the real digits; 0 = off")
    report: bool = option(True, "at the end, write the held-out report of diffusers-robust evaluate to output_dir/evaluation")
    report_images: int = option(300, "held-out images restored per corruption case in the report")
    report_samples: int = option(256, "samples generated for the report's FID/KID, digits and memorisation figures")
    # Logging and Hub
    logger: str = option("tensorboard", "tensorboard, wandb or none")
    push_to_hub: bool = option(False, "upload the pipeline and model card (never checkpoints or logs)")
    hub_model_id: str | None = option(None, "'user/name'; defaults to the output folder's name")
    hub_private_repo: bool = option(False, "create the Hub repository as private")
    license: str = option("apache-2.0", "license in the model card")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the first bad value."""
        from ..data.corruptions import canonical_name  # here, so `--help` does not import PyTorch
        from ..schedulers.robust_noise import validate_robust_options

        choices = {
            "lr_scheduler": ("cosine", "constant", "linear"),
            "mixed_precision": ("no", "fp16", "bf16"),
            "logger": ("tensorboard", "wandb", "none"),
            "prediction_type": (None, "epsilon", "v_prediction", "sample"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {[a for a in allowed if a]}, got {getattr(self, name)!r}")
        positive = ["train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps",
                    "num_grid_images", "num_inference_steps", "validation_images", "report_images", "report_samples"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.report_samples < 2:
            raise ValueError(f"report_samples must be >= 2 (KID compares pairs), got {self.report_samples}")
        if self.max_train_steps is None and self.num_epochs is None:
            raise ValueError("set max_train_steps or num_epochs")
        for name in ("max_train_steps", "num_epochs", "checkpoints_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {getattr(self, name)}")
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{item.name} must be a finite number, got {value}")
        positive_or_null = {"learning_rate": self.learning_rate, "max_grad_norm": self.max_grad_norm,
                            "snr_gamma": self.snr_gamma, "adam_epsilon": self.adam_epsilon, "ema_inv_gamma": self.ema_inv_gamma,
                            "ema_power": self.ema_power}
        for name, value in positive_or_null.items():
            if value is not None and value <= 0:
                nullable = " or null" if name in ("max_grad_norm", "snr_gamma") else ""
                raise ValueError(f"{name} must be > 0{nullable}, got {value}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.ema_max_decay <= 1:
            raise ValueError(f"ema_max_decay must be in (0, 1], got {self.ema_max_decay}")
        for name in ("lr_warmup_steps", "dataloader_num_workers", "adam_weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.corruption_p <= 1:
            raise ValueError(f"corruption_p must be in [0, 1], got {self.corruption_p}")
        if self.corruption_p > 0 and not self.corruptions:
            raise ValueError("corruption_p > 0 needs a non-empty corruptions list")
        if self.restoration_max_timestep is not None and self.restoration_max_timestep < 1:
            raise ValueError(f"restoration_max_timestep must be >= 1 or null, got {self.restoration_max_timestep}")
        if self.restoration_training and not (self.corruptions and self.corruption_p > 0 and self.corruption_conditioning):
            raise ValueError("restoration_training needs corruptions, corruption_p > 0 and corruption_conditioning: true "
                             "(the labels tell the model which images to restore; zeros keep generation clean)")
        if self.restoration_training and self.snr_gamma is None:
            # Measured: without it, samples fell from 86% to 5% confident digits in the ablation.
            raise ValueError("restoration_training needs snr_gamma (e.g. 5): at low timesteps its noise targets are up to "
                             "100x the noise, and min-SNR weighting keeps them from swamping the loss")
        for name in [*self.corruptions, *(self.validation_corruptions or [])]:
            canonical_name(name)
        if len(self.corruption_severity) != 2 or not 1 <= self.corruption_severity[0] <= self.corruption_severity[1] <= 5:
            raise ValueError(f"corruption_severity must be [low, high] within 1..5, got {self.corruption_severity}")
        if any(not 1 <= s <= 5 for s in self.validation_severities):
            raise ValueError(f"validation_severities must lie in 1..5, got {self.validation_severities}")
        validate_robust_options(self.input_perturbation, self.offset_noise, self.pyramid_noise_discount,
                                self.epsilon_scale_base, self.epsilon_scale_slope, self.prediction_type or "epsilon",
                                self.sampling_stop_sigma, self.sampling_observed_share)
        if self.noise_sigma is not None and self.noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0 ([0, 1] image units) or null, got {self.noise_sigma}")
        if self.noisy_data_max_weight <= 1:
            raise ValueError(f"noisy_data_max_weight must be > 1, got {self.noisy_data_max_weight}")
        if not 0 <= self.further_mask_p < 1:  # also refuses NaN
            raise ValueError(f"further_mask_p must be in [0, 1), got {self.further_mask_p}")
        if self.noise_sigma is not None and self.annotations is not None:
            raise ValueError(f"noise_sigma sets every record's noise; it replaces annotations {self.annotations!r}: "
                             "set one of them")
        if not str(self.output_dir).strip():
            raise ValueError("output_dir is empty: name the folder the run writes to (it would train into the current "
                             "directory)")
        for name in ("seed", "validation_holdout_seed"):
            if not 0 <= getattr(self, name) < 2**32:
                raise ValueError(f"{name} must be in [0, 2**32), got {getattr(self, name)}")
        if self.num_threads is not None and self.num_threads > 4096:
            raise ValueError(f"num_threads must be at most 4096, got {self.num_threads}")
        if not 0 < self.validation_share < 1:  # also refuses NaN
            raise ValueError(f"validation_share must be in (0, 1), got {self.validation_share}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or null, got {self.num_threads}")
        if self.quality_samples > 0 and self.dataset != "digits":
            raise ValueError("quality_samples scores samples with a classifier of the embedded digits: it needs "
                             f"dataset: digits, got {self.dataset!r} (the report's FID/KID works for any dataset)")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.push_to_hub and not (self.hub_model_id or os.path.basename(os.path.normpath(self.output_dir))):
            raise ValueError("push_to_hub needs hub_model_id")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainingConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {unknown}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _coerce(name, hints[name], value, source) for name, value in values.items()})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TrainingConfig":
        return cls.from_dict(read_yaml_values(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def help_texts(config_class: type | None = None) -> dict[str, str]:
    """`{field: help}` of a config dataclass (its fields' `help` metadata)."""
    return {item.name: item.metadata.get("help", "") for item in dataclasses.fields(config_class or TrainingConfig)}


def _parse_value(kind: Any) -> typing.Callable[[str], Any]:
    """An argparse `type` for a field annotation: `null` for optional fields, true/false for booleans."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    optional = typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)
    base = args[0] if optional else kind
    if typing.get_origin(base) is list:
        base = typing.get_args(base)[0]

    def parse(text: str) -> Any:
        if optional and text.lower() in ("null", "none"):
            return None
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
            return text.lower() in ("true", "1", "yes")
        return base(text)

    return parse


def _coerce(name: str, kind: Any, value: Any, source: str) -> Any:
    """`value` as the type of field `name`. YAML strings are parsed like the command line (so `1e-4`, which YAML
    reads as a string, is a float); anything that does not fit raises `ValueError` naming the option."""
    optional = type(None) in typing.get_args(kind)
    base = next((a for a in typing.get_args(kind) if a is not type(None)), kind) if optional else kind
    item_type = typing.get_args(base)[0] if typing.get_origin(base) is list else None
    expected = f"a list of {item_type.__name__}" if item_type else base.__name__
    parse = _parse_value(item_type or base)

    def one(item: Any, wanted: type) -> Any:
        if isinstance(item, str) and wanted is not str:
            return parse(item)
        if wanted is float and isinstance(item, int) and not isinstance(item, bool):
            return float(item)
        if not isinstance(item, wanted) or (wanted is int and isinstance(item, bool)):
            raise TypeError
        return item

    if value is None:
        if optional:
            return None
    else:
        try:
            if item_type is None:
                return one(value, base)
            if isinstance(value, list):
                return [one(item, item_type) for item in value]
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            pass
    raise ValueError(f"{source}: {name} must be {expected}{' or null' if optional else ''}, got {value!r}")


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> argparse.ArgumentParser:
    """One `--<field>` per field of a config dataclass, typed from its annotation (`null` for optional fields, a bare
    boolean flag means true, lists take several values), with the field's `help` metadata and default. Unset options
    are absent from the parsed namespace, so a recipe file's values are not overridden by defaults."""
    hints = typing.get_type_hints(config_class)
    for item in dataclasses.fields(config_class):
        kind = hints[item.name]
        is_list = typing.get_origin(kind) is list or any(typing.get_origin(a) is list for a in typing.get_args(kind))
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        nargs = "*" if is_list else ("?" if kind is bool else None)
        parser.add_argument(
            f"--{item.name}", type=_parse_value(kind), nargs=nargs, const=True if kind is bool else None,
            default=argparse.SUPPRESS, help=f"{item.metadata.get('help', '')} (default: {default})",
        )
    return parser


def build_argument_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`--config recipe.yaml` plus one `--<option>` per field of [`TrainingConfig`]."""
    parser = parser or argparse.ArgumentParser(
        description="Train a robust DDPM with Accelerate. Options come from --config, then command-line overrides.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML recipe, e.g. training/configs/digits.yaml")
    return add_config_arguments(parser, TrainingConfig)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"option {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_values(path: str | os.PathLike) -> dict[str, Any]:
    """The option mapping of a YAML recipe, each value parsed to its option's type (not yet validated as a whole)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        try:
            values = yaml.load(handle, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ValueError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config must be a mapping of option: value")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainingConfig)})
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}")
    hints = typing.get_type_hints(TrainingConfig)
    return {name: _coerce(name, hints[name], value, str(path)) for name, value in values.items()}


def parse_training_config(argv: list[str] | None = None) -> TrainingConfig:
    """Read `--config` (if given), apply command-line overrides, then validate the merged options once; errors name
    the bad option."""
    namespace = vars(build_argument_parser().parse_args(argv))
    config_path = namespace.pop("config")
    values = read_yaml_values(config_path) if config_path is not None else {}
    values.update(namespace)
    source = f"{config_path} with command-line overrides" if config_path and namespace else (config_path or "command line")
    return TrainingConfig.from_dict(values, source=source)
