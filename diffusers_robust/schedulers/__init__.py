"""The robust schedulers (subclasses of Diffusers' DDPM and DDIM schedulers) and the table of their options; names
resolve lazily, so reading the option table does not import Diffusers."""

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "RobustDDIMScheduler": ".scheduling_robust_ddim",
    "RobustDDPMScheduler": ".scheduling_robust_ddpm",
    "RobustNoiseMixin": ".robust_noise",
    "TrainingNoiseOutput": ".robust_noise",
}
__all__ = ["RobustDDIMScheduler", "RobustDDPMScheduler", "RobustNoiseMixin", "TrainingNoiseOutput"]

if TYPE_CHECKING:
    from .robust_noise import RobustNoiseMixin, TrainingNoiseOutput
    from .scheduling_robust_ddim import RobustDDIMScheduler
    from .scheduling_robust_ddpm import RobustDDPMScheduler


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusers_robust.schedulers' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
