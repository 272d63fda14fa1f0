"""The robust options of the schedulers, defined once.

Each is a config field of [`RobustDDPMScheduler`] and [`RobustDDIMScheduler`] (saved with a pipeline), an option of the
training recipe (`TrainingConfig`, `--help`, the README table), a line of the model card, and an entry of the run
summary. Everything that lists them reads this table.
"""

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RobustOption:
    """One robust scheduler option: its config `name`, its `default` (the value that turns it off), when it acts
    (`"training"`: how `add_training_noise` noises; `"sampling"`: how `step` denoises) and a one-line `help`."""

    name: str
    default: float
    acts_at: Literal["training", "sampling"]
    help: str


ROBUST_OPTIONS: tuple[RobustOption, ...] = (
    RobustOption("input_perturbation", 0.0, "training",
                 "DDPM-IP gamma: x_t uses eps + gamma * xi, the target eps (0.1 in the paper)"),
    RobustOption("offset_noise", 0.0, "training", "std of per-channel constant noise added to eps"),
    RobustOption("pyramid_noise_discount", 0.0, "training", "multi-resolution noise discount; 0 = off"),
    RobustOption("epsilon_scale_base", 1.0, "sampling", "epsilon scaling b: step() divides the predicted noise by k * t + b"),
    RobustOption("epsilon_scale_slope", 0.0, "sampling", "epsilon scaling k, per training timestep"),
    RobustOption("sampling_stop_sigma", 0.0, "sampling",
                 "stop sampling before the noise std ([0, 1] image units) falls below this and return the clean estimate "
                 "there; set by training on noisy-only data (the lowest level it can trust); 0 = off"),
    RobustOption("sampling_observed_share", 1.0, "sampling",
                 "missing-pixel models (a UNet taking twice the channels it outputs: the pixels it sees, then their mask): "
                 "share of pixels it sees at every sampling step, one fixed random mask per image; set by training on "
                 "masked data; 1 = every pixel"),
)

ROBUST_OPTION_NAMES: tuple[str, ...] = tuple(option.name for option in ROBUST_OPTIONS)


def robust_option(name: str) -> RobustOption:
    """The [`RobustOption`] called `name`; `KeyError` naming the known ones otherwise."""
    for option in ROBUST_OPTIONS:
        if option.name == name:
            return option
    raise KeyError(f"'{name}' is not a robust option; known: {list(ROBUST_OPTION_NAMES)}")


def options_acting_at(stage: Literal["training", "sampling"]) -> tuple[str, ...]:
    """Names of the options that act while training or while sampling."""
    return tuple(option.name for option in ROBUST_OPTIONS if option.acts_at == stage)
