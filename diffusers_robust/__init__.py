"""diffusers-robust: robust DDPM training and sampling on top of HuggingFace Diffusers.

Layout: `schedulers/` (the robust schedulers and the table of their options), `pipelines/` (the pipeline, its
restoration methods, presets), `models.py` (label-conditioned UNet, condition embedding), `data/` (datasets,
corruptions, augmentation), `training/` (config, objective, set-up, loop phases, checkpoints, run summary),
`evaluation/` (losses, metrics, restoration scores, report, image grids), `hub.py`, `cli.py`.
"""

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

__version__ = "0.1.0"

__all__ = [
    "ROBUST_OPTIONS",
    "AugmentPipeline",
    "ConditionEmbedding",
    "LabelConditionedUNet",
    "RandomCorruption",
    "RobustDDIMScheduler",
    "RobustDDPMPipeline",
    "RobustDDPMScheduler",
    "RobustDiffusionObjective",
    "TrainingConfig",
    "TrainingNoiseOutput",
    "apply_corruption",
    "build_pipeline_from_preset",
    "load_image_dataset",
    "min_snr_weights",
]
