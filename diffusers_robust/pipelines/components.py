"""The module Diffusers' loader imports this package's pipeline components from.

`RobustDDPMPipeline.from_pretrained` reads every `model_index.json` entry of this package as
`["diffusers_robust.pipelines.components", <class name>]`, so each component goes through Diffusers' own
`load_sub_model` (its logging, `torch_dtype`, `variant`, `device_map`, safetensors/bin fall-back) while its class comes
from the installed package. No saved folder carries a `<component>/diffusers_robust.pipelines.components.py` (the
import files `save_pretrained` writes are named after each class's own module), so the loader never runs a folder's
code. The loading-method lookup needs the Diffusers base classes as attributes of this module.
"""

from diffusers import ModelMixin, SchedulerMixin

from ..models import ConditionEmbedding
from ..schedulers import RobustDDIMScheduler, RobustDDPMScheduler

# Classes a `model_index.json` entry of this package may name, by name.
COMPONENT_CLASSES: dict[str, type] = {
    cls.__name__: cls for cls in (RobustDDPMScheduler, RobustDDIMScheduler, ConditionEmbedding)
}

__all__ = ["COMPONENT_CLASSES", "ConditionEmbedding", "ModelMixin", "RobustDDIMScheduler", "RobustDDPMScheduler",
           "SchedulerMixin"]
