"""Build untrained pipelines from preset folders in Diffusers' on-disk layout (no weights)."""

import importlib
import os

import diffusers
import torch

from .pipeline_robust_ddpm import RobustDDPMPipeline, load_pipeline_index


def _component_class(library: str, class_name: str) -> type:
    module = diffusers if library == "diffusers" else importlib.import_module(library)
    if not hasattr(module, class_name):
        raise ValueError(f"model_index.json names {library}.{class_name}, which does not exist")
    return getattr(module, class_name)


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
            library, class_name = index[name]
            component_class = _component_class(library, class_name)
            config = component_class.load_config(os.path.join(preset, name))
            components[name] = component_class.from_config(config)
    return RobustDDPMPipeline(**components)
