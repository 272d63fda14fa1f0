"""Build untrained pipelines from preset folders in Diffusers' on-disk layout (no weights).

The presets of the repository's `pipelines/` folder install with the package (`diffusers_robust/presets/`), so a preset
is named (`ddpm-digits`) and found from any directory; a folder path or a Hub id works too ([`resolve_preset`]).
"""

import importlib
import json
import os
from pathlib import Path

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


def preset_root() -> Path:
    """The folder of the named presets: installed with the package, or the `pipelines/` folder of a source checkout."""
    installed = Path(__file__).resolve().parent.parent / "presets"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "pipelines"


def available_presets() -> dict[str, str]:
    """`{name: one-line description}` of the named presets (sample size, channels, UNet widths)."""
    presets = {}
    root = preset_root()
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        config_file = folder / "unet" / "config.json"
        if (folder / "model_index.json").is_file() and config_file.is_file():
            unet = json.loads(config_file.read_text(encoding="utf-8"))
            presets[folder.name] = (f"{unet['sample_size']}x{unet['sample_size']}, {unet['in_channels']} channel(s), "
                                    f"UNet widths {unet['block_out_channels']}")
    return presets


def resolve_preset(preset: str | os.PathLike) -> str:
    """
    The folder of `preset`: an existing folder, a preset name (`ddpm-digits`; `pipelines/ddpm-digits` also works from
    any directory), or a Hub id (`user/name`, whose configs are downloaded, no weights). `FileNotFoundError` naming the
    presets otherwise: a local-looking path is never looked up on the Hub.
    """
    text = os.path.expanduser(os.fspath(preset))
    if os.path.isdir(text):
        return text
    names = available_presets()
    name = os.path.basename(os.path.normpath(text))
    if text in names or (os.path.dirname(os.path.normpath(text)) == "pipelines" and name in names):
        return str(preset_root() / name)
    looks_local = text.startswith((".", "/", "~")) or text.count("/") != 1 or os.path.isdir(text.split("/")[0])
    if looks_local:
        raise FileNotFoundError(f"no preset or pipeline folder {os.fspath(preset)!r}: presets are {list(names)} "
                                "(diffusers-robust presets), or give a folder holding model_index.json or a Hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(text, allow_patterns=["model_index.json", "*/config.json", "*/scheduler_config.json"])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as error:
        raise FileNotFoundError(f"{text!r} is neither a preset ({list(names)}) nor a local folder, and the Hub could not "
                                f"give it: {str(error).splitlines()[0]}") from error


def build_pipeline_from_preset(preset: str | os.PathLike, seed: int | None = None) -> RobustDDPMPipeline:
    """
    Build a [`RobustDDPMPipeline`] with freshly initialised weights from a preset.

    A preset folder holds `model_index.json`, `unet/config.json` and `scheduler/scheduler_config.json`
    (as `save_pretrained` writes them, without weights), for example `pipelines/ddpm-digits`.

    Args:
        preset (`str` or `os.PathLike`): a preset name, folder or Hub id ([`resolve_preset`]).
        seed (`int`, *optional*): seeds the weight initialisation; the global RNG is left as it was.

    Example:

    ```py
    >>> from diffusers_robust import build_pipeline_from_preset
    >>> pipe = build_pipeline_from_preset("ddpm-digits", seed=0)
    >>> pipe.unet.config.sample_size, pipe.unet.config.in_channels
    (8, 1)
    ```
    """
    preset = resolve_preset(preset)
    index = load_pipeline_index(preset)
    if index.get("_class_name") not in (RobustDDPMPipeline.__name__, ["pipeline", RobustDDPMPipeline.__name__]):
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
