from .robust_noise import RobustNoiseMixin, TrainingNoiseOutput
from .scheduling_robust_ddim import RobustDDIMScheduler
from .scheduling_robust_ddpm import RobustDDPMScheduler

__all__ = ["RobustDDIMScheduler", "RobustDDPMScheduler", "RobustNoiseMixin", "TrainingNoiseOutput"]
