"""diffusers-robust: robust DDPM training and sampling on top of HuggingFace Diffusers."""

from .losses import min_snr_weights
from .pipeline_robust_ddpm import RobustDDPMPipeline
from .presets import build_pipeline_from_preset
from .schedulers import RobustDDIMScheduler, RobustDDPMScheduler, TrainingNoiseOutput

__version__ = "0.1.0"

__all__ = [
    "RobustDDIMScheduler",
    "RobustDDPMPipeline",
    "RobustDDPMScheduler",
    "TrainingNoiseOutput",
    "build_pipeline_from_preset",
    "min_snr_weights",
]
