"""Build untrained pipelines from preset folders in Diffusers' on-disk layout (no weights)."""

import importlib
import os

import diffusers
import torch
from diffusers import SchedulerMixin, UNet2DModel

from .pipeline_robust_ddpm import RobustDDPMPipeline, load_pipeline_index

# What a preset may name: a component is imported only from these libraries, and must be of the expected kind.
ALLOWED_LIBRARIES = ("diffusers", "diffusers_robust")
EXPECTED_KINDS = {"unet": UNet2DModel, "scheduler": SchedulerMixin}


def _component_class(name: str, library: str, class_name: str) -> type:
    """The class `model_index.json` names for component `name`, imported only from Diffusers or diffusers_robust and
    checked to be a `UNet2DModel` (unet) or a DDPM-family scheduler (scheduler); `ValueError` otherwise."""
    root = str(library).split(".")[0]
    if root not in ALLOWED_LIBRARIES:
        raise ValueError(f"model_index.json names {name} from '{library}'; a preset may only use {list(ALLOWED_LIBRARIES)}")
    module = diffusers if library == "diffusers" else importlib.import_module(library)
    component = getattr(module, class_name, None)
    if not isinstance(component, type):
        raise ValueError(f"model_index.json names {library}.{class_name}, which does not exist")
    if not issubclass(component, EXPECTED_KINDS[name]):
        raise ValueError(f"model_index.json names {library}.{class_name} as {name}, but {name} must be a "
                         f"{EXPECTED_KINDS[name].__name__}")
    if name == "scheduler" and not hasattr(component, "add_noise"):
        raise ValueError(f"{library}.{class_name} cannot noise images for training (no add_noise)")
    return component


def build_pipeline_from_preset(preset: str | os.PathLike, seed: int | None = None) -> RobustDDPMPipeline:
    """
    Build a [`RobustDDPMPipeline`] with freshly initialised weights from a preset folder.

    A preset folder holds `model_index.json`, `unet/config.json` and `scheduler/scheduler_config.json`
    (as `save_pretrained` writes them, without weights), for example `pipelines/ddpm-digits`.

    Args:
        preset (`str` or `os.PathLike`): the preset folder.
        seed (`int`, *optional*): seeds the weight initialisation; the global RNG is left as it was.

    Example:

    ```py
    >>> from diffusers_robust import build_pipeline_from_preset
    >>> pipe = build_pipeline_from_preset("pipelines/ddpm-digits", seed=0)  # doctest: +SKIP
    >>> pipe.unet.num_parameters()  # doctest: +SKIP
    ```
    """
    index = load_pipeline_index(preset)
    if index.get("_class_name") != RobustDDPMPipeline.__name__:
        raise ValueError(f"{preset}: model_index.json is for {index.get('_class_name')}, expected RobustDDPMPipeline")
    components = {}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for name in ("unet", "scheduler"):
            if name not in index:
                raise ValueError(f"{preset}: model_index.json has no '{name}' component")
            entry = index[name]
            if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)):
                raise ValueError(f"{preset}: model_index.json entry '{name}' must be [library, class], got {entry!r}")
            component_class = _component_class(name, *entry)
            config = component_class.load_config(os.path.join(preset, name))
            components[name] = component_class.from_config(config)
    return RobustDDPMPipeline(**components)
