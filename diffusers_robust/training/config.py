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


@dataclass(frozen=True)
class Bounds:
    """The values a numeric option accepts: `low` / `high` (None: unbounded), each inclusive unless `*_open`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"{'<' if self.high_open else '<='} {self.high}"

    def admits(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or (value < self.high if self.high_open else value <= self.high))


def option(default: Any, help: str, group: str, *, bounds: Bounds | None = None, choices: tuple | None = None,
           resumable: bool = False) -> Any:
    """A config field that knows itself: its `--help` text, its `--help` group, the `bounds` or `choices` `validate`
    checks, and whether a resumed run may change it (`resumable`; every other option is fixed by the first run's
    checkpoints). Lists get a fresh copy per instance."""
    metadata = {"help": help, "group": group, "bounds": bounds, "choices": choices, "resumable": resumable}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def at_least(low: float) -> Bounds:
    return Bounds(low=low)


def above(low: float) -> Bounds:
    return Bounds(low=low, low_open=True)


class OptionGroup:
    """`GROUP(default, help, ...)`: an [`option`] of one `--help` group."""

    def __init__(self, title: str):
        self.title = title

    def __call__(self, default: Any, help: str, **rules: Any) -> Any:
        return option(default, help, self.title, **rules)


RUN, DATA, IMPERFECT = OptionGroup("Run"), OptionGroup("Data"), OptionGroup("Imperfect training data")
CORRUPTION, OBJECTIVE = OptionGroup("Augmentation and corruption"), OptionGroup("Diffusion objective")
OPTIMISATION, EMA, CHECKPOINTS = OptionGroup("Optimisation"), OptionGroup("EMA"), OptionGroup("Checkpoints")
VALIDATION, HUB = OptionGroup("Validation and report"), OptionGroup("Logging and Hub")


def robust_option_field(name: str, resumable: bool = False) -> Any:
    """A config field for the robust scheduler option `name`: its default (off) and help come from the one table of
    robust options next to the schedulers (their ranges are checked by `validate_robust_options`)."""
    spec = robust_option(name)
    return OBJECTIVE(spec.default, f"{spec.help} (acts at {spec.acts_at})", resumable=resumable)


@dataclass
class TrainingConfig:
    """Every option of `training/train_robust_ddpm.py` (`diffusers-robust train`); each field's `help` metadata is its
    `--help` text and its line in the README table."""

    seed: int = RUN(0, "seeds weights, data order, augmentation, corruption and noise", bounds=Bounds(0, 2**32, high_open=True))
    output_dir: str = RUN("outputs/robust-ddpm", "pipeline, checkpoints, samples, logs, metrics and model card go here",
                          resumable=True)
    pipeline: str = RUN("ddpm-digits", "preset to train from: a name (diffusers-robust presets), a folder holding "
                        "model_index.json and configs, or a Hub id")
    dropout: float | None = RUN(None, "dropout probability in the UNet's residual blocks while training (sampling never "
                                "drops); null: the preset's unet/config.json value (0 in ddpm-digits, 0.1 in ddpm-cifar10-32)",
                                bounds=Bounds(0, 1, high_open=True))
    dataset: str = DATA("digits", "'digits' (embedded), an image folder, parquet/arrow files, or a Hub dataset name")
    dataset_split: str = DATA("train", "split to train on")
    validation_split: str | None = DATA("test", "held-out split for the validation loss and report; 'test' missing "
                                        "from the dataset holds out validation_share of the training split; null: none")
    validation_data: str | None = DATA(None, "held-out images from elsewhere (image folder, parquet/arrow files, "
                                       "save_to_disk folder, Hub id): its validation_split if it has one, else its only split")
    validation_share: float = DATA(0.1, "share of the training split held out (never trained on) when the dataset has "
                                   "no validation split and no validation_data is given",
                                   bounds=Bounds(0, 1, low_open=True, high_open=True))
    validation_holdout_seed: int = DATA(0, "seed of that hold-out (not the training seed, so runs of any seed hold out "
                                        "the same images)", bounds=Bounds(0, 2**32, high_open=True))
    image_column: str | None = DATA(None, "image column; detected (first Image feature) if null")
    streaming: bool = DATA(False, "stream the dataset (IterableDataset) instead of map-style")
    channels: int | None = DATA(None, "1 or 3 (images are converted to it; another count than the preset's builds the "
                                "UNet for it); null: the preset's, and images of another count stop before training",
                                choices=(None, 1, 3))
    resolution: int | None = DATA(None, "training side in pixels (images are resized and cropped to it; the UNet samples "
                                  "at it); null: the preset's, and images of another size stop before training",
                                  bounds=at_least(1))
    center_crop: bool = DATA(True, "center crop after resizing; false: random crop")
    shuffle_buffer: int = DATA(1000, "shuffle buffer of a stream, in records", bounds=at_least(1))
    dataloader_num_workers: int = DATA(0, "DataLoader worker processes per training process", bounds=at_least(0), resumable=True)
    annotations: str | None = IMPERFECT(
        None, "null: the dataset's noise_sigma/sigma_min/sigma_max columns or an annotations.csv/.json in the image "
        "folder, if any; a CSV/JSON path; 'auto': estimate each image's noise std; 'ignore': ignore them")
    noise_sigma: float | None = IMPERFECT(None, "one known Gaussian noise std for every training image; null: per record",
                                          bounds=at_least(0))
    annotations_required: bool = IMPERFECT(False, "refuse training records that carry no annotation")
    noisy_data_max_weight: float = IMPERFECT(
        4.0, "s_max: cap on the noisy-data target's scale k^2; an image with noise std s trains where "
        "sigma_t >= s * sqrt(s_max / (s_max - 1))", bounds=above(1))
    further_mask_p: float = IMPERFECT(
        0.1, "missing-pixel training (records with a mask): share of the observed pixels hidden further at each step, "
        "so the model learns to fill pixels it is not shown (Ambient Diffusion's delta)", bounds=Bounds(0, 1, high_open=True))
    augment: str | None = CORRUPTION(None, "Albumentations recipe file, e.g. training/configs/augment/edm.yaml; null: none")
    augment_conditioning: bool = CORRUPTION(True, "feed augment labels to the UNet while training, zeros when sampling")
    corruptions: list[str] = CORRUPTION([], "corruptions applied to training images, e.g. [gaussian_noise]")
    corruption_p: float = CORRUPTION(0.0, "probability that a training image is corrupted before noising", bounds=Bounds(0, 1))
    corruption_severity: list[int] = CORRUPTION([1, 5], "inclusive severity range drawn from")
    corruption_conditioning: bool = CORRUPTION(True, "feed which corruption a training image got to the UNet, zeros when "
                                                     "sampling")
    restoration_training: bool = CORRUPTION(
        False, "corrupted images keep their clean image as the target, so the model learns to undo them")
    restoration_max_timestep: int | None = CORRUPTION(
        None, "restoration training: corrupted images get timesteps below this; null: all", bounds=at_least(1))
    prediction_type: str | None = OBJECTIVE(None, "epsilon, v_prediction or sample; null: the preset scheduler's",
                                            choices=(None, "epsilon", "v_prediction", "sample"))
    # The robust scheduler options (schedulers/robust_options.py): they replace the preset scheduler's values.
    input_perturbation: float = robust_option_field("input_perturbation")
    offset_noise: float = robust_option_field("offset_noise")
    pyramid_noise_discount: float = robust_option_field("pyramid_noise_discount")
    epsilon_scale_base: float = robust_option_field("epsilon_scale_base", resumable=True)
    epsilon_scale_slope: float = robust_option_field("epsilon_scale_slope", resumable=True)
    sampling_stop_sigma: float = robust_option_field("sampling_stop_sigma")
    sampling_observed_share: float = robust_option_field("sampling_observed_share")
    snr_gamma: float | None = OBJECTIVE(None, "min-SNR-gamma loss weighting (5.0 in the paper); null: plain MSE", bounds=above(0))
    train_batch_size: int = OPTIMISATION(64, "images per process per micro-batch", bounds=at_least(1))
    max_train_steps: int | None = OPTIMISATION(2000, "optimizer steps; null: derived from num_epochs",
                                               bounds=at_least(1), resumable=True)
    num_epochs: int | None = OPTIMISATION(None, "epochs, used when max_train_steps is null", bounds=at_least(1), resumable=True)
    gradient_accumulation_steps: int = OPTIMISATION(1, "micro-batches per optimizer step", bounds=at_least(1))
    learning_rate: float = OPTIMISATION(2e-4, "peak learning rate", bounds=above(0), resumable=True)
    lr_scheduler: str = OPTIMISATION("cosine", "cosine, constant or linear (after warm-up)",
                                     choices=("cosine", "constant", "linear"))
    lr_warmup_steps: int = OPTIMISATION(100, "linear warm-up, in optimizer steps", bounds=at_least(0))
    adam_beta1: float = OPTIMISATION(0.9, "AdamW beta1", bounds=Bounds(0, 1, high_open=True))
    adam_beta2: float = OPTIMISATION(0.999, "AdamW beta2", bounds=Bounds(0, 1, high_open=True))
    adam_weight_decay: float = OPTIMISATION(0.0, "AdamW decoupled weight decay", bounds=at_least(0))
    adam_epsilon: float = OPTIMISATION(1e-8, "AdamW epsilon", bounds=above(0))
    max_grad_norm: float | None = OPTIMISATION(1.0, "gradient clipping norm; null: no clipping", bounds=above(0), resumable=True)
    mixed_precision: str = OPTIMISATION("no", "no, fp16 or bf16", choices=("no", "fp16", "bf16"), resumable=True)
    fused_optimizer: bool = OPTIMISATION(True, "fused AdamW kernel where PyTorch has one for the device (CUDA, CPU)")
    channels_last: bool = OPTIMISATION(False, "UNet weights and activations in channels_last memory format (for GPUs; "
                                              "slower on CPU)")
    num_threads: int | None = OPTIMISATION(
        None, "PyTorch threads per process; null: OMP_NUM_THREADS, else cores / processes on this machine",
        bounds=Bounds(1, 4096), resumable=True)
    use_ema: bool = EMA(True, "keep an exponential moving average of the weights; the EMA weights are exported")
    ema_max_decay: float = EMA(0.9999, "upper bound of the EMA decay", bounds=Bounds(0, 1, low_open=True))
    ema_inv_gamma: float = EMA(1.0, "EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power", bounds=above(0))
    ema_power: float = EMA(0.75, "EMA warm-up power", bounds=above(0))
    checkpointing_steps: int = CHECKPOINTS(500, "save a resumable checkpoint every N optimizer steps (and at the end)",
                                           bounds=at_least(1), resumable=True)
    checkpoints_total_limit: int | None = CHECKPOINTS(2, "keep at most N checkpoints; null: keep all",
                                                      bounds=at_least(1), resumable=True)
    resume_from_checkpoint: str | None = CHECKPOINTS(None, "'latest' or a checkpoint folder", resumable=True)
    overwrite_output_dir: bool = CHECKPOINTS(False, "a fresh run deletes checkpoints of an earlier run in output_dir "
                                             "(else it stops)", resumable=True)
    validation_steps: int = VALIDATION(500, "validate every N optimizer steps (and at the end)",
                                       bounds=at_least(1), resumable=True)
    validation_images: int = VALIDATION(256, "held-out images for the validation loss", bounds=at_least(1), resumable=True)
    validation_corruptions: list[str] | None = VALIDATION(None, "corruptions for the validation loss; null: the training list",
                                                          resumable=True)
    validation_severities: list[int] = VALIDATION([1, 3, 5], "severities for the validation loss",
                                                  bounds=Bounds(1, 5), resumable=True)
    num_grid_images: int = VALIDATION(16, "images in the sample grid", bounds=at_least(1), resumable=True)
    keep_best: bool = VALIDATION(False, "save the EMA weights of the validation with the lowest held-out clean loss as a "
                                        "pipeline in output_dir/best (needs held-out images)", resumable=True)
    num_inference_steps: int = VALIDATION(50, "DDIM steps for sample grids", bounds=at_least(1), resumable=True)
    quality_samples: int = VALIDATION(0, "labelled embedded datasets (digits): score N samples with a classifier of "
                                         "the real images; 0 = off", bounds=at_least(0), resumable=True)
    report: bool = VALIDATION(True, "at the end, write the held-out report of diffusers-robust evaluate to output_dir/evaluation",
                              resumable=True)
    report_images: int = VALIDATION(300, "held-out images restored per corruption case in the report",
                                    bounds=at_least(1), resumable=True)
    report_full: bool = VALIDATION(False, "score every restoration case of the table in the report, as evaluate --full "
                                          "does; false: the quick cases of evaluate's default", resumable=True)
    report_samples: int = VALIDATION(256, "samples generated for the report's FID/KID, digits and memorisation figures",
                                     bounds=at_least(2), resumable=True)
    logger: str = HUB("tensorboard", "tensorboard, wandb or none", choices=("tensorboard", "wandb", "none"), resumable=True)
    push_to_hub: bool = HUB(False, "upload the pipeline and model card (never checkpoints or logs)", resumable=True)
    hub_model_id: str | None = HUB(None, "'user/name'; defaults to the output folder's name", resumable=True)
    hub_private_repo: bool = HUB(False, "create the Hub repository as private", resumable=True)
    license: str = HUB("apache-2.0", "license in the model card", resumable=True)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the first bad value: each option's own rule (its choices or bounds; numbers must
        be finite), then the rules that tie options together."""
        optional = optional_fields(type(self))
        for item in dataclasses.fields(self):
            check_option(item, getattr(self, item.name), item.name in optional)
        self.validate_combinations()

    def validate_combinations(self) -> None:
        """The rules between options, and the robust scheduler options' own (`validate_robust_options`)."""
        from ..data.corruptions import canonical_name  # here, so `--help` does not import PyTorch
        from ..schedulers.robust_noise import validate_robust_options

        if self.max_train_steps is None and self.num_epochs is None:
            raise ValueError("set max_train_steps or num_epochs")
        if self.corruption_p > 0 and not self.corruptions:
            raise ValueError("corruption_p > 0 needs a non-empty corruptions list")
        if self.restoration_training and not (self.corruptions and self.corruption_p > 0 and self.corruption_conditioning):
            raise ValueError("restoration_training needs corruptions, corruption_p > 0 and corruption_conditioning: true "
                             "(the labels tell the model which images to restore; zeros keep generation clean)")
        if self.restoration_training and self.snr_gamma is None:
            # Without it, the ablation's samples stopped reading as digits (benchmarks/RESULTS.md, "Figures behind the code").
            raise ValueError("restoration_training needs snr_gamma (e.g. 5): at low timesteps its noise targets are up to "
                             "100x the noise, and min-SNR weighting keeps them from swamping the loss")
        for name in [*self.corruptions, *(self.validation_corruptions or [])]:
            canonical_name(name)
        if len(self.corruption_severity) != 2 or not 1 <= self.corruption_severity[0] <= self.corruption_severity[1] <= 5:
            raise ValueError(f"corruption_severity must be [low, high] within 1..5, got {self.corruption_severity}")
        validate_robust_options(self.input_perturbation, self.offset_noise, self.pyramid_noise_discount,
                                self.epsilon_scale_base, self.epsilon_scale_slope, self.prediction_type or "epsilon",
                                self.sampling_stop_sigma, self.sampling_observed_share)
        if self.noise_sigma is not None and self.annotations is not None:
            raise ValueError(f"noise_sigma sets every record's noise; it replaces annotations {self.annotations!r}: "
                             "set one of them")
        if not str(self.output_dir).strip():
            raise ValueError("output_dir is empty: name the folder the run writes to (it would train into the current "
                             "directory)")
        if self.quality_samples > 0:
            from ..data.embedded import EMBEDDED_DATASETS
            from ..evaluation.metrics import dataset_extras

            if dataset_extras(self.dataset) is None:
                scored = [name for name in EMBEDDED_DATASETS if dataset_extras(name) is not None]
                raise ValueError(f"quality_samples scores samples with the classifier of a labelled embedded dataset "
                                 f"({', '.join(scored)}), got dataset {self.dataset!r} (the report's FID/KID works for "
                                 "any dataset)")
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


def check_option(item: dataclasses.Field, value: Any, nullable: bool) -> None:
    """`ValueError` unless `value` (each item of a list) obeys option `item`'s choices and bounds and is finite."""
    choices, bounds = item.metadata.get("choices"), item.metadata.get("bounds")
    if choices is not None and value not in choices:
        raise ValueError(f"{item.name} must be one of {[c for c in choices if c is not None]}, got {value!r}")
    for one in value if isinstance(value, list) else [value]:
        if isinstance(one, float) and not math.isfinite(one):
            raise ValueError(f"{item.name} must be a finite number, got {one}")
        if bounds is not None and isinstance(one, int | float) and not bounds.admits(one):
            raise ValueError(f"{item.name} must be {bounds}{' or null' if nullable else ''}, got {value}")


def optional_fields(config_class: type) -> frozenset[str]:
    """Names of the fields of a config dataclass that accept None (`null`)."""
    hints = typing.get_type_hints(config_class)
    return frozenset(name for name, kind in hints.items() if type(None) in typing.get_args(kind))


def resumable_options(config_class: type | None = None) -> frozenset[str]:
    """Options a resumed run may change (logged); every other option must equal the first run's."""
    return frozenset(item.name for item in dataclasses.fields(config_class or TrainingConfig) if item.metadata.get("resumable"))


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
    """One `--<field>` per field of a config dataclass in its `--help` group, typed from its annotation (`null` for
    optional fields, a bare boolean flag means true, lists take several values), with the field's `help` metadata,
    default, bounds and whether it may change on resume. Unset options
    are absent from the parsed namespace, so a recipe file's values are not overridden by defaults."""
    hints = typing.get_type_hints(config_class)
    groups: dict[str, Any] = {}
    for item in dataclasses.fields(config_class):
        kind = hints[item.name]
        is_list = typing.get_origin(kind) is list or any(typing.get_origin(a) is list for a in typing.get_args(kind))
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        nargs = "*" if is_list else ("?" if kind is bool else None)
        rule = item.metadata.get("bounds") or ""
        resumable = "; may change on resume" if item.metadata.get("resumable") else ""
        title = item.metadata.get("group") or "options"
        group = groups.setdefault(title, parser.add_argument_group(title))
        group.add_argument(
            f"--{item.name}", type=_parse_value(kind), nargs=nargs, const=True if kind is bool else None,
            default=argparse.SUPPRESS,
            help=f"{item.metadata.get('help', '')} (default: {default}{f'; {rule}' if rule else ''}{resumable})",
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
    if os.path.isdir(path):
        raise ValueError(f"config {path} is a folder; pass a YAML recipe file (training/configs/*.yaml)")
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
