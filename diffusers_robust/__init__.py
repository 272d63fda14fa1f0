"""diffusers-robust: robust DDPM training and sampling on top of HuggingFace Diffusers.

Layout: `schedulers/` (the robust schedulers and the table of their options), `pipelines/` (the pipeline, its
restoration methods, presets), `models.py` (label-conditioned UNet, condition embedding), `data/` (datasets,
corruptions, augmentation), `training/` (config, objective, set-up, loop phases, checkpoints, run summary),
`evaluation/` (losses, metrics, restoration scores, report, image grids), `hub.py`, `cli.py`.

Names are resolved lazily, as Diffusers does: `import diffusers_robust` imports neither PyTorch nor Diffusers, and each
public name loads its module on first use.
"""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module (relative to this package) that defines it.
_EXPORTS = {
    "ROBUST_OPTIONS": ".schedulers.robust_options",
    "AugmentPipeline": ".data.augment",
    "ConditionEmbedding": ".models",
    "LabelConditionedUNet": ".models",
    "RandomCorruption": ".data.corruptions",
    "RobustDDIMScheduler": ".schedulers.scheduling_robust_ddim",
    "RobustDDPMPipeline": ".pipelines.pipeline_robust_ddpm",
    "RobustDDPMScheduler": ".schedulers.scheduling_robust_ddpm",
    "RobustDiffusionObjective": ".training.objective",
    "TrainingConfig": ".training.config",
    "TrainingNoiseOutput": ".schedulers.robust_noise",
    "apply_corruption": ".data.corruptions",
    "build_pipeline_from_preset": ".pipelines.presets",
    "load_image_dataset": ".data.datasets",
    "min_snr_weights": ".training.objective",
}
__all__ = [
    "ROBUST_OPTIONS", "AugmentPipeline", "ConditionEmbedding", "LabelConditionedUNet", "RandomCorruption",
    "RobustDDIMScheduler", "RobustDDPMPipeline", "RobustDDPMScheduler", "RobustDiffusionObjective", "TrainingConfig",
    "TrainingNoiseOutput", "apply_corruption", "build_pipeline_from_preset", "load_image_dataset", "min_snr_weights",
]

if TYPE_CHECKING:
    from .data.augment import AugmentPipeline
    from .data.corruptions import RandomCorruption, apply_corruption
    from .data.datasets import load_image_dataset
    from .models import ConditionEmbedding, LabelConditionedUNet
    from .pipelines.pipeline_robust_ddpm import RobustDDPMPipeline
    from .pipelines.presets import build_pipeline_from_preset
    from .schedulers import RobustDDIMScheduler, RobustDDPMScheduler, TrainingNoiseOutput
    from .schedulers.robust_options import ROBUST_OPTIONS
    from .training.config import TrainingConfig
    from .training.objective import RobustDiffusionObjective, min_snr_weights


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusers_robust' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
