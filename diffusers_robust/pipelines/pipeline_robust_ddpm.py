"""`RobustDDPMPipeline`: unconditional generation and restoration of corrupted images."""

import inspect
import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, RePaintScheduler, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import hf_hub_download, snapshot_download

from ..data.annotations import estimated_noise_levels
from ..data.corruptions import corruption_parameter
from ..data.units import to_model_range
from ..models import ConditionEmbedding, image_size
from .detection import Detection, detect_corruption
from .restoration import (
    DETECTION_SIGMA,
    ESTIMATED_BLUR_SHARE,
    LEARNED_RESTORATION_SIGMA,
    MAX_OPERATOR_PIXELS,
    PHOTO_METHODS_PIXELS,
    REFINE_SIGMA,
    RestorationPlan,
    added_blur_sigma,
    biharmonic_fill,
    clipped_noise_std,
    data_consistency,
    denoise_from_timestep,
    dihedral_average,
    estimate_noise_sigma,
    gaussian_blur_matrix,
    missing_pixel_mask,
    noise_matched_timestep,
    noise_to_signal,
    operator_matrix,
    plan_restoration,
    pseudo_inverse,
    reflect_padded,
    restoration_method,
    separable_consistency,
    sure_shrinkage,
    tiled,
    uses_separable_blur,
)

ImageInput = PIL.Image.Image | list[PIL.Image.Image] | np.ndarray | torch.Tensor

# What `diffusers.DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` imports from a saved folder.
LOADER_MODULE = "pipeline"
LOADER_LIBRARY = "diffusers_robust"
# The module Diffusers' loader imports our components from (see `components.py`).
COMPONENTS_MODULE = "diffusers_robust.pipelines.components"


@dataclass
class RestorationPipelineOutput(ImagePipelineOutput):
    """`ImagePipelineOutput` with, after `corruption="auto"`, the [`~pipelines.detection.Detection`] of each image."""

    detections: list[Detection] | None = None


def installed_class(name: str) -> type:
    """A pipeline component class of this package by name (`RobustDDPMScheduler`, `ConditionEmbedding`, ...);
    `ValueError` naming the components otherwise (also for exports that are not components, such as a function)."""
    from .components import COMPONENT_CLASSES

    if not isinstance(name, str) or name not in COMPONENT_CLASSES:
        raise ValueError(f"model_index.json names {name!r} from diffusers_robust, which is not one of its pipeline "
                         f"components ({', '.join(sorted(COMPONENT_CLASSES))})")
    return COMPONENT_CLASSES[name]

logger = logging.getLogger(__name__)
# (channels, height, width) of the images the detector's two calibrations were set on (`pipelines/detection.py`): the
# 8x8 grey digits and the 32x32 RGB photos.
CALIBRATED_SHAPES = ((1, 8, 8), (3, 32, 32))
# The severity label of learned restoration when the caller names none: the middle of the trained range 1-5.
LEARNED_DEFAULT_SEVERITY = 3


def _is_own_component(name: str, entry) -> bool:
    """Whether a `model_index.json` entry names a component class of this package (`["diffusers_robust...", class]`)."""
    return (not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)
            and str(entry[0]).split(".")[0] == LOADER_LIBRARY)


def write_diffusers_loader_files(folder: str) -> None:
    """Make a saved pipeline folder loadable by `diffusers.DiffusionPipeline.from_pretrained(folder,
    trust_remote_code=True)`: `pipeline.py` and `<component>/diffusers_robust.py`, each importing the installed class,
    and `model_index.json` naming them. Components of Diffusers itself are left as they are."""
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path, encoding="utf-8") as handle:
        index = json.load(handle)
    loaders = {LOADER_MODULE + ".py": RobustDDPMPipeline.__name__}
    index["_class_name"] = [LOADER_MODULE, RobustDDPMPipeline.__name__]
    for name, entry in index.items():
        if _is_own_component(name, entry):
            loaders[f"{name}/{entry[0]}.py"] = entry[1]  # Diffusers looks for custom code at <component>/<library>.py
    for path, class_name in loaders.items():
        with open(os.path.join(folder, path), "w", encoding="utf-8") as handle:
            handle.write(f'"""Lets `diffusers.DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` load this '
                         f'folder: the class is\nthe installed `diffusers_robust.{class_name}` '
                         f'(pip install diffusers-robust)."""\n\nfrom diffusers_robust import {class_name}  # noqa: F401\n')
    with open(index_path, "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _warn_if_uncalibrated(images: torch.Tensor) -> None:
    """Warn when `images` `(B, C, H, W)` are of a shape neither of the detector's calibrations was set on."""
    if tuple(images.shape[1:]) not in CALIBRATED_SHAPES:
        logger.warning(f"the damage detector's thresholds were set on 8x8 grey digits and 32x32 RGB photos; these are "
                       f"{images.shape[1]}x{images.shape[2]}x{images.shape[3]} images, where it can misjudge: name the "
                       "corruption when you know it")


# Fresh-noise draws averaged when a model trained on noisy data restores noise below its data's level (`_denoise`).
TOP_UP_DRAWS = 4


class RobustDDPMPipeline(DiffusionPipeline):
    r"""
    Pipeline for unconditional image generation and for restoring corrupted images (SDEdit / DiffPure).

    With the robust options of its scheduler off, generation equals [`~diffusers.DDPMPipeline`]'s for the
    same UNet, scheduler and generator. Any DDPM-family scheduler can be swapped in with `from_config`.

    Args:
        unet ([`~diffusers.UNet2DModel`]): the denoiser, predicting what the scheduler's `prediction_type` says.
        scheduler ([`~diffusers.SchedulerMixin`]): e.g. [`RobustDDPMScheduler`] or [`RobustDDIMScheduler`].
        condition_embedding ([`~diffusers_robust.models.ConditionEmbedding`], *optional*): present when the model was
            trained to restore (`restoration_training`); generation never uses it.

    A UNet that takes twice the channels it outputs was trained on images with missing pixels (Ambient Diffusion): its
    input is the pixels it may see, zero elsewhere, then their mask, and it predicts the clean image
    (`prediction_type="sample"`). Generation and restoration then draw one random mask per image that keeps the
    scheduler's `sampling_observed_share` of the pixels, fixed at every step.

    Example:

    ```py
    >>> from diffusers import UNet2DModel
    >>> from diffusers_robust import RobustDDPMPipeline, RobustDDPMScheduler
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32),
    ...                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    >>> pipe = RobustDDPMPipeline(unet=unet, scheduler=RobustDDPMScheduler())
    >>> pipe(batch_size=2, num_inference_steps=5, output_type="np").images.shape
    (2, 8, 8, 1)
    ```
    """

    model_cpu_offload_seq = "unet"
    _optional_components = ["condition_embedding"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, condition_embedding: ConditionEmbedding | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, condition_embedding=condition_embedding)
        self._observed: torch.Tensor | None = None  # missing-pixel models: this call's fixed mask (B, 1, H, W)
        self._detections: list[Detection] | None = None  # corruption="auto": what this call detected per image

    @property
    def masked_input(self) -> bool:
        """Whether the UNet was trained on images with missing pixels: it takes the seen pixels and their mask."""
        return self.unet.config.in_channels == 2 * self.image_channels

    @property
    def image_channels(self) -> int:
        """Channels of the images the pipeline makes and restores: the UNet's `out_channels` (its `in_channels` for a
        denoiser whose config has no `out_channels`)."""
        return self.unet.config.get("out_channels", self.unet.config.in_channels)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Diffusers' `save_pretrained`, plus what lets `diffusers.DiffusionPipeline.from_pretrained(folder or repo,
        trust_remote_code=True)` load the folder: `_class_name` `["pipeline", "RobustDDPMPipeline"]` with a `pipeline.py`,
        and a `<component>/<module>.py` for each component of this package. Each of those files is one import line from
        the installed package (`pip install diffusers-robust`)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        write_diffusers_loader_files(str(save_directory))

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict:
        """Read `model_index.json`, with the `["pipeline", "RobustDDPMPipeline"]` form read as this class (the installed
        one loads without running the folder's `pipeline.py`), and this package's components read as classes of
        `diffusers_robust.pipelines.components`, by class name: Diffusers' loader then imports the installed class
        (never a folder's `<component>/*.py`), and folders saved when a class lived in another module still load."""
        config = super()._dict_from_json_file(json_file)
        if config.get("_class_name") == [LOADER_MODULE, cls.__name__]:
            config["_class_name"] = cls.__name__
        for name, entry in config.items():
            if _is_own_component(name, entry):
                config[name] = [COMPONENTS_MODULE, installed_class(entry[1]).__name__]
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "RobustDDPMPipeline":
        """Diffusers' `from_pretrained`: every component, this package's included, goes through Diffusers' loader
        (`torch_dtype`, `variant`, `device_map`, `use_safetensors` behave as for any pipeline). Code files in the folder
        (`pipeline.py`, `<component>/*.py`, written for `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`)
        are never run: this package's classes are the installed ones."""
        if kwargs.get("trust_remote_code") or kwargs.get("custom_pipeline") is not None:
            raise ValueError("RobustDDPMPipeline.from_pretrained never runs a folder's code: drop trust_remote_code and "
                             "custom_pipeline (the installed diffusers_robust classes are used)")
        folder = str(pretrained_model_name_or_path)
        if os.path.isdir(folder):
            for name in _component_names(os.path.join(folder, cls.config_name)):
                if os.path.isfile(os.path.join(folder, name, COMPONENTS_MODULE + ".py")):
                    raise ValueError(f"{folder}/{name} holds {COMPONENTS_MODULE}.py, which would shadow the installed "
                                     "diffusers_robust classes; this loader never runs a folder's code: remove it")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs) -> str:
        """
        Download a pipeline repository from the Hub into the local cache and return its folder.

        Diffusers' own `download` rejects repositories whose `model_index.json` names components from a
        package other than Diffusers (it expects their code as files in the repository). Our components are
        installed code, so this downloads exactly what the loader needs: `model_index.json`, and the configs
        and weights of each component that `model_index.json` lists: safetensors, or PyTorch `.bin` files where a
        component has none (or with `use_safetensors=False`), as Diffusers falls back. Code files are never fetched.
        """
        hub_kwargs = {
            key: kwargs.get(key)
            for key in ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
            if kwargs.get(key) is not None
        }
        use_safetensors = kwargs.get("use_safetensors")
        components = _component_names(hf_hub_download(pretrained_model_name, cls.config_name, **hub_kwargs))
        weights = "*.bin" if use_safetensors is False else "*.safetensors"
        patterns = [cls.config_name] + [f"{name}/{pattern}" for name in components for pattern in ("*.json", weights)]
        folder = snapshot_download(pretrained_model_name, allow_patterns=patterns, **hub_kwargs)
        without_weights = [name for name in components if _needs_bin_weights(os.path.join(folder, name))]
        if without_weights and use_safetensors is None:
            bin_patterns = [f"{name}/*.bin" for name in without_weights]
            folder = snapshot_download(pretrained_model_name, allow_patterns=bin_patterns, **hub_kwargs)
        return folder

    def _image_to_tensor(self, image: ImageInput) -> torch.Tensor:
        """Convert a restoration input to a `(B, C, H, W)` tensor in `[-1, 1]` on the pipeline's device."""
        channels = self.image_channels
        if isinstance(image, PIL.Image.Image):
            image = [image]
        if isinstance(image, list):
            if not image or not all(isinstance(item, PIL.Image.Image) for item in image):
                raise ValueError("image as a list must be a non-empty list of PIL images")
            mode = "L" if channels == 1 else "RGB"
            arrays = [np.asarray(item.convert(mode), dtype=np.float32) / 255.0 for item in image]
            if len({array.shape for array in arrays}) != 1:
                raise ValueError(f"all images must have the same size, got {sorted({a.shape[:2] for a in arrays})}")
            image = np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])
        if isinstance(image, np.ndarray):
            if image.dtype == np.uint8:
                image = image.astype(np.float32) / 255.0
            if image.ndim == 3:
                image = image[None]
            if image.ndim != 4:
                raise ValueError(f"image as a numpy array must be (H, W, C) or (B, H, W, C), got shape {image.shape}")
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2)
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"image must be a PIL image, a list of them, a numpy array or a tensor, got {type(image)}")
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4:
            raise ValueError(f"image as a tensor must be (C, H, W) or (B, C, H, W), got shape {tuple(image.shape)}")
        if image.is_complex() or image.shape[0] == 0:
            raise ValueError(f"image must be a non-empty batch of real values, got {image.dtype} of shape {tuple(image.shape)}")
        image = image.float()
        if not torch.isfinite(image).all():
            raise ValueError("image contains NaN or infinite values")
        if image.min() < 0 or image.max() > 1:
            raise ValueError(
                f"image values must lie in [0, 1] (as output_type 'np' and 'pt' return them), "
                f"got [{image.min().item():.3f}, {image.max().item():.3f}]"
            )
        size = self._sample_size()
        if image.shape[1] != channels:
            raise ValueError(f"image has {image.shape[1]} channels but the UNet takes {channels}")
        factor = self.size_multiple
        if tuple(image.shape[2:]) != size and any(side < factor for side in image.shape[2:]):
            raise ValueError(f"image is {tuple(image.shape[2:])} pixels but the UNet takes {size}, or any size whose "
                             f"sides are at least {factor} pixels (it is convolutional)")
        return to_model_range(image).to(device=self._execution_device, dtype=self.unet.dtype)

    def _step_kwargs(self, generator, eta: float) -> dict:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "generator" in accepted:
            kwargs["generator"] = generator
        if "eta" in accepted:
            kwargs["eta"] = eta
        return kwargs

    def _denoiser(self, labels: torch.Tensor | None = None):
        """`(x_t, t) -> eps` from the UNet, whatever the scheduler's `prediction_type` (a `sample` or `v_prediction`
        output is converted to the noise it implies); `t` is `(B,)`. With `labels`, their embedding is added to the time
        embedding (as in training) through a forward hook on `unet.time_embedding`, so the saved UNet stays a plain
        `UNet2DModel`."""
        prediction_type = self.scheduler.config.prediction_type

        def predict(sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            output = self._unet_output(sample, timesteps, labels)
            if prediction_type == "epsilon":
                return output
            alpha = self.scheduler.alphas_cumprod.to(sample.device)[timesteps.to(sample.device)]
            alpha = alpha.reshape(-1, 1, 1, 1).to(sample.dtype)
            if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0
                return alpha.sqrt() * output + (1 - alpha).sqrt() * sample
            if prediction_type == "sample":
                return (sample - alpha.sqrt() * output) / (1 - alpha).sqrt()
            raise ValueError(f"restoration supports prediction_type epsilon, v_prediction or sample, got '{prediction_type}'")

        return predict

    def _restoration_denoiser(self, image: torch.Tensor):
        """The denoiser restoration uses on `image` `(B, C, H, W)`: from `PHOTO_METHODS_PIXELS` up, the image taken in
        blocks of the UNet's sample size, each with `PADDING_MARGIN` pixels of its surroundings, mirrored outward at the
        image's border (`tiled`, `reflect_padded`), and averaged over the square's 8 symmetries (`dihedral_average`;
        all measured in `restoration.py`); below, on the 8x8 digits, one pass as it is. A missing-pixel model keeps one
        pass at any size: it sees the image through this call's fixed mask."""
        if image.shape[-1] * image.shape[-2] >= PHOTO_METHODS_PIXELS and not self.masked_input:
            core = max(self._sample_size())
            return dihedral_average(tiled(self._denoiser(), core, multiple=self.size_multiple))
        return self._denoiser()

    def _unet_output(self, sample: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's raw prediction (what `prediction_type` says), with `labels` embedded when given; a missing-pixel
        model sees `sample` through this call's fixed mask (outside a call, every pixel)."""
        if self.masked_input:
            seen = self._observed if self._observed is not None else torch.ones_like(sample[:, :1])
            sample = torch.cat([sample * seen, seen.expand_as(sample)], dim=1)
        # An image whose sides the UNet's downsampling does not divide is mirrored out to the next multiple and the
        # prediction cropped back, so restoration takes photos of any size.
        forward = reflect_padded(lambda padded, t: self.unet(padded, t).sample, margin=0, multiple=self.size_multiple)
        if labels is None:
            return forward(sample, timesteps)
        added = self.condition_embedding(labels).to(sample.dtype)
        handle = self.unet.time_embedding.register_forward_hook(lambda module, args, output: output + added)
        try:
            return forward(sample, timesteps)
        finally:
            handle.remove()

    def _draw_observed(self, batch: int, generator, device: torch.device, size: tuple[int, int] | None = None
                       ) -> torch.Tensor | None:
        """Missing-pixel models: one random mask per image `(B, 1, H, W)` (1 = seen) keeping `sampling_observed_share`
        of the pixels, at `size` (default: the model's sample size), drawn after the initial noise so the noise stream
        is unchanged; `None` for other models."""
        if not self.masked_input:
            return None
        share = float(self.scheduler.config.get("sampling_observed_share", 1.0) or 1.0)
        shape = (1, *(size or self._sample_size()))
        if isinstance(generator, list):
            draws = [torch.rand((1, *shape), generator=g, device=g.device) for g in generator]
        else:
            draws = [torch.rand((batch, *shape), generator=generator,
                                device=generator.device if generator is not None else "cpu")]
        return (torch.cat(draws).to(device) < share).to(self.unet.dtype)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        image: ImageInput | None = None,
        strength: float | None = None,
        eta: float = 0.0,
        corruption: str | None = None,
        severity: int | None = None,
        noise_sigma: float | None = None,
        mask: torch.Tensor | np.ndarray | None = None,
        restoration_steps: int | None = None,
        learned_restoration: bool = False,
        blur_sigma: float | None = None,
    ) -> "RestorationPipelineOutput | tuple":
        r"""
        Generate images, or restore corrupted ones (`image=`).

        Restoration, by what is known about the damage:

        - `noise_sigma=S`, or `corruption="gaussian_noise", severity=K`: Gaussian noise of std S (`[0, 1]` units). The
          image is scaled into the forward process at the timestep whose noise level matches (no fresh noise) and
          denoised: one step gives the posterior mean (best PSNR), `restoration_steps > 1` deterministic DDIM steps.
        - `corruption="auto"`: what damaged each image is detected with the pipeline's prior (`detect_corruption`:
          clean, Gaussian noise and its std, salt-and-pepper, holes, blur and its severity) and restored by the method
          below that fits it; images found clean come back unchanged. Its thresholds were set on 8x8 digits.
        - `corruption="impulse_noise"` / `"salt_and_pepper"` / `"masking"` (severity optional), or `mask=`: the hit pixels
          are treated as missing (detected as extreme values that the prior disagrees with, or `mask` where it is 1)
          and inpainted with RePaint; from 16x16 up, filled by biharmonic inpainting and refined by the prior from low
          noise instead (far better on held-out photos: README, "Photos"); untouched pixels are kept exactly.
        - `corruption="gaussian_blur"` / `"pixelate"` / `"contrast"` with `severity`: the operator is known, so each DDIM
          step's clean estimate is projected onto the images the operator maps to the input (DDNM).
        - `blur_sigma=S`: a Gaussian blur of std S pixels, from any tool (PIL, OpenCV, a lens), restored the same way with
          its separable operator, at any image size: its truncated pseudo-inverse, then a few prior steps from low noise,
          each projected; `corruption="gaussian_blur"` without `severity` estimates S per image (`added_blur_sigma`,
          less exact: README, "Photos").
        - other corruptions (`shot_noise`, `speckle_noise`, `jpeg_compression`, `brightness`): the noise-matched start
          with the estimated noise std.
        - `learned_restoration=True`, on a pipeline trained with `restoration_training` (it has a `condition_embedding`):
          the corruptions it was trained on are restored by its corruption-conditioned denoiser instead (off by default:
          in the robustness ablation it restored below the methods above; README, "Robustness ablation").
        - `strength=s` alone: SDEdit. Fresh noise to `t = s * T`, then `s * num_inference_steps` steps; the input is then
          under noise of std `sqrt((1 - abar_t) / abar_t) / 2` in `[0, 1]` units (0.14 at s = 0.1, 0.32 at 0.2, 0.56 at
          0.3 for the linear schedule and 50 steps), so it suits heavy damage, not mild noise. It is the default (0.3)
          when no other restoration argument is given.

        Args:
            batch_size (`int`, *optional*, defaults to 1):
                Number of images to generate; ignored when `image` is given (its batch size is used).
            generator (`torch.Generator` or list of them, *optional*):
                Seeded source of noise; a list of `batch_size` generators gives each image its own noise.
            num_inference_steps (`int`, *optional*, defaults to 1000):
                Denoising steps for a full generation; SDEdit runs the last `strength` share of them.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` (list of `PIL.Image`), `"np"` (`(B, H, W, C)` in `[0, 1]`) or `"pt"` (`(B, C, H, W)` in `[0, 1]`).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`~diffusers.ImagePipelineOutput`] instead of a tuple.
            image (PIL image, list of them, `np.ndarray` or `torch.Tensor`, *optional*):
                Corrupted images to restore: PIL, numpy `(B, H, W, C)` / tensor `(B, C, H, W)` with values in
                `[0, 1]` (uint8 numpy in `[0, 255]`). PIL images are converted to the UNet's channel count;
                arrays and tensors must already have it, and the UNet's `sample_size`.
            strength (`float`, *optional*):
                SDEdit only, in `(0, 1]`: how far the input is noised before denoising; 1 discards it entirely.
            eta (`float`, *optional*, defaults to 0.0):
                DDIM's eta, passed to schedulers whose `step` takes it (generation and SDEdit).
            corruption (`str`, *optional*):
                What damaged `image`: a name from `diffusers_robust.data.corruptions` (aliases accepted) or `"auto"`.
            severity (`int`, *optional*):
                1..5, the corruption table's severity; required for Gaussian noise and the linear corruptions.
            noise_sigma (`float`, *optional*):
                Gaussian noise std in `[0, 1]` image units, for noise outside the table.
            mask (`torch.Tensor` or `np.ndarray`, *optional*):
                `(B, 1, H, W)` tensor or `(B, H, W, 1)` array (or one image's `(H, W)`), 1 where a pixel is missing.
            restoration_steps (`int`, *optional*):
                Denoiser calls of a restoration: defaults to 1 (posterior mean) for noise, 5 for `blur_sigma` and for
                inpainting from 16x16 up, 50 for RePaint and the other data consistency.
            blur_sigma (`float`, *optional*):
                Gaussian blur std in pixels, in `(0, 3]`.
            learned_restoration (`bool`, *optional*, defaults to `False`):
                Restore with the `condition_embedding` of a restoration-trained pipeline (see above); `ValueError` if
                the pipeline has none or was not trained on `corruption`. Without `severity`, the labels say severity
                3 (`LEARNED_DEFAULT_SEVERITY`, the middle of the 1-5 range it was trained on).

        Returns:
            [`RestorationPipelineOutput`] (an `ImagePipelineOutput`) or `tuple`: the images in the format of
            `output_type`; with `corruption="auto"`, `.detections` says what was found in each image.

        Example:

        ```py
        >>> import numpy as np
        >>> from diffusers_robust import build_pipeline_from_preset
        >>> pipe = build_pipeline_from_preset("ddpm-digits", seed=0)  # untrained; yours: RobustDDPMPipeline.from_pretrained(...)
        >>> pipe.set_progress_bar_config(disable=True)
        >>> rng = np.random.default_rng(0)
        >>> clean = rng.random((2, 8, 8, 1))  # (B, H, W, C) in [0, 1]
        >>> noisy = np.clip(clean + 0.1 * rng.standard_normal(clean.shape), 0, 1)
        >>> pipe(image=noisy, noise_sigma=0.1, output_type="np").images.shape
        (2, 8, 8, 1)
        >>> restored = pipe(image=noisy, corruption="auto", output_type="np")
        >>> len(restored.detections)
        2
        >>> damaged = np.where(rng.random(clean.shape) < 0.1, 1.0, clean)  # salt: 10% of the pixels white
        >>> inpainted = pipe(image=damaged, corruption="salt_and_pepper", output_type="np").images
        ```
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got '{output_type}'")
        _check_count("num_inference_steps", num_inference_steps)
        if restoration_steps is not None:
            _check_count("restoration_steps", restoration_steps)
        if not (isinstance(eta, int | float) and math.isfinite(eta) and eta >= 0):  # NaN would pass `eta < 0` unnoticed
            raise ValueError(f"eta must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")
        self._detections = None
        try:
            sample = self._generate_or_restore(batch_size, generator, num_inference_steps, image, strength, eta, corruption,
                                               severity, noise_sigma, mask, restoration_steps, learned_restoration,
                                               blur_sigma)
        finally:
            self._observed = None
        images = (sample / 2 + 0.5).clamp(0, 1)  # not to_unit_range: Diffusers' formula, so images equal DDPMPipeline's
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return RestorationPipelineOutput(images=images, detections=self._detections)

    def _generate_or_restore(self, batch_size, generator, num_inference_steps, image, strength, eta, corruption, severity,
                             noise_sigma, mask, restoration_steps, learned_restoration, blur_sigma=None) -> torch.Tensor:
        """`__call__`'s work after the argument checks: the images `(B, C, H, W)` in `[-1, 1]`."""
        if image is None:
            given = [name for name, value in (("strength", strength), ("corruption", corruption), ("severity", severity),
                                              ("noise_sigma", noise_sigma), ("mask", mask), ("blur_sigma", blur_sigma))
                     if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)} need an image to restore: pass image=")
            _check_count("batch_size", batch_size)
            self._check_generators(generator, batch_size)
            size = self._sample_size()
            shape = (batch_size, self.image_channels, *size)
            sample = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
            self._observed = self._draw_observed(batch_size, generator, sample.device)
            return self._sample(sample, self._timesteps(num_inference_steps), generator, eta)
        corrupted = self._image_to_tensor(image)
        self._check_generators(generator, corrupted.shape[0])
        plan = plan_restoration(corruption, severity, noise_sigma, mask, strength, blur_sigma)
        if learned_restoration and not (plan.corruption is not None and self._learned(plan.corruption)):
            known = self.condition_embedding.corruptions if self.condition_embedding is not None else []
            raise ValueError(f"learned_restoration needs a corruption this pipeline was trained to undo ({known}), "
                             f"got {plan.corruption!r}")
        self._observed = self._draw_observed(corrupted.shape[0], generator, corrupted.device, tuple(corrupted.shape[-2:]))
        if plan.method == "auto":
            return self._restore_detected(corrupted, generator, num_inference_steps, eta, restoration_steps)
        return self._restore(corrupted, plan, generator, num_inference_steps, eta, restoration_steps, learned_restoration)

    @torch.no_grad()
    def detect_corruption(self, image: ImageInput) -> list[Detection]:
        """What damaged each image (clean, Gaussian noise and its std, salt-and-pepper, holes, blur and its severity),
        as `corruption="auto"` decides it: [`~pipelines.detection.detect_corruption`] with this pipeline's prior."""
        corrupted = self._image_to_tensor(image)
        _warn_if_uncalibrated(corrupted)
        try:  # a missing-pixel model sees every pixel here
            self._observed = torch.ones_like(corrupted[:, :1]) if self.masked_input else None
            return detect_corruption(self._denoiser(), self.scheduler.alphas_cumprod, corrupted)
        finally:
            self._observed = None

    def _restore_detected(self, corrupted: torch.Tensor, generator, num_inference_steps: int, eta: float,
                          steps: int | None) -> torch.Tensor:
        """`corruption="auto"`: detect per image, then restore each group of images with the same detection by its
        method; images found clean are returned as they are."""
        observed = self._observed
        if self.masked_input:
            self._observed = torch.ones_like(corrupted[:, :1])  # detection sees every pixel
        _warn_if_uncalibrated(corrupted)
        detections = detect_corruption(self._denoiser(), self.scheduler.alphas_cumprod, corrupted)
        self._detections = detections
        restored = corrupted.clone()
        groups: dict[tuple, list[int]] = {}  # one batch per kind and severity; noisy images keep their own std
        for index, found in enumerate(detections):
            groups.setdefault((found.corruption, found.severity), []).append(index)
        for (corruption, severity), index in groups.items():
            if corruption is None:
                continue
            group_generator = [generator[i] for i in index] if isinstance(generator, list) else generator
            self._observed = observed[index] if observed is not None else None
            if corruption == "gaussian_noise" and corrupted.shape[-1] * corrupted.shape[-2] >= PHOTO_METHODS_PIXELS:
                # The flat regions' reading is the std the noise kept after clipping: denoised at it (64 training
                # photos, std 0.1 / 0.2: 29.19 / 24.69 dB, where the std it maps to, lowered by `clipped_noise_std`
                # as a named std is, gave 29.04 / 24.29).
                readings = estimated_noise_levels(corrupted[index]).double().cpu()
                restored[index] = self._denoise(corrupted[index], readings, group_generator, steps or 1, clipped=True)
                continue
            if corruption == "gaussian_noise":
                sigmas = torch.tensor([detections[i].noise_sigma for i in index], dtype=torch.float64)
                plan = RestorationPlan("noise", corruption, noise_sigma=sigmas)
            else:
                plan = plan_restoration(corruption=corruption, severity=severity)
            restored[index] = self._restore(corrupted[index], plan, group_generator, num_inference_steps, eta, steps)
        return restored

    @property
    def size_multiple(self) -> int:
        """The UNet's downsampling factor, `2 ** (number of blocks - 1)`: restoration takes images of any size whose
        sides are at least this; a side it does not divide is mirrored out to the next multiple (`reflect_padded`)."""
        blocks = self.unet.config.get("block_out_channels")
        return 2 ** (len(blocks) - 1) if blocks else 1

    def _sample_size(self) -> tuple[int, int]:
        return image_size(self.unet.config.sample_size)

    def _timesteps(self, num_inference_steps: int) -> torch.Tensor:
        self.scheduler.set_timesteps(num_inference_steps)
        return self.scheduler.timesteps

    def _stop_level(self) -> float:
        """The scheduler's `sampling_stop_sigma` in model units (0 when off or absent)."""
        return 2.0 * float(self.scheduler.config.get("sampling_stop_sigma", 0.0) or 0.0)

    def _sample(self, sample: torch.Tensor, timesteps: torch.Tensor, generator, eta: float) -> torch.Tensor:
        """Run the scheduler's reverse process over `timesteps`. With `sampling_stop_sigma` set, stop at the last
        timestep whose noise level it trusts and return the clean estimate the model made there (the posterior mean of
        one Tweedie step), taken at the timestep the latent actually sits at."""
        step_kwargs = self._step_kwargs(generator, eta)
        stop = self._stop_level()
        levels = noise_to_signal(self.scheduler.alphas_cumprod.double())
        for index, t in enumerate(self.progress_bar(timesteps)):
            model_output = self._unet_output(sample, t)
            output = self.scheduler.step(model_output, t, sample, **step_kwargs)
            next_t = timesteps[index + 1] if index + 1 < len(timesteps) else None
            if stop > 0 and (next_t is None or levels[int(next_t)] < stop):
                return output.pred_original_sample
            sample = output.prev_sample
        return sample

    def _restore(self, corrupted: torch.Tensor, plan: "RestorationPlan", generator, num_inference_steps: int,
                 eta: float, steps: int | None, learned: bool = False) -> torch.Tensor:
        """Dispatch a validated [`RestorationPlan`]; `corrupted` is `(B, C, H, W)` in `[-1, 1]`."""
        alphas = self.scheduler.alphas_cumprod.to(corrupted.device)
        batch = corrupted.shape[0]
        if plan.method == "sdedit":
            timesteps = self._timesteps(num_inference_steps)
            steps_to_run = min(max(round(num_inference_steps * plan.strength), 1), len(timesteps))
            timesteps = timesteps[len(timesteps) - steps_to_run:]
            noise = randn_tensor(corrupted.shape, generator=generator, device=corrupted.device, dtype=corrupted.dtype)
            sample = self.scheduler.add_noise(corrupted, noise, timesteps[:1].repeat(batch))
            return self._sample(sample, timesteps, generator, eta)
        if learned:
            severity = plan.severity if plan.severity is not None else LEARNED_DEFAULT_SEVERITY
            labels = self.condition_embedding.labels_for(plan.corruption, severity, batch, corrupted.device)
            return self._restore_learned(corrupted, labels, generator, steps or 1)
        if plan.method == "inpaint":
            missing = self._missing_pixels(corrupted, plan, alphas)
            if corrupted.shape[-1] * corrupted.shape[-2] >= PHOTO_METHODS_PIXELS:
                return self._fill_and_refine(corrupted, missing, steps or 5)
            return self._inpaint(corrupted, missing, generator, steps or 50)
        method = restoration_method(plan, *corrupted.shape[-2:])
        if method != plan.method:
            logger.warning(f"{plan.corruption}: images of {corrupted.shape[-2]}x{corrupted.shape[-1]} pixels exceed the "
                           f"{MAX_OPERATOR_PIXELS} pixels for which its operator is built; restoring it as noise instead "
                           "(noise-matched start), which undoes blur far less well")
        if uses_separable_blur(plan, *corrupted.shape[-2:]):
            sigma = plan.blur_sigma if plan.separable_blur else corruption_parameter("gaussian_blur", plan.severity)
            return self._deblur(corrupted, sigma, steps or 5)
        if method == "linear":
            matrix = operator_matrix(plan.corruption, plan.severity, *corrupted.shape[-2:])
            projection = data_consistency(corrupted, matrix, pseudo_inverse(matrix))
            noise = randn_tensor(corrupted.shape, generator=generator, device=corrupted.device, dtype=corrupted.dtype)
            start = torch.full((batch,), len(alphas) - 1, dtype=torch.long)
            return denoise_from_timestep(self._denoiser(), alphas, noise, start, steps or 50, projection)
        sigma = plan.noise_sigma if plan.noise_sigma is not None else estimate_noise_sigma(corrupted)
        return self._denoise(corrupted, torch.as_tensor(sigma, dtype=torch.float64).expand(batch), generator, steps or 1)

    def _denoise(self, corrupted: torch.Tensor, sigma: torch.Tensor, generator, steps: int,
                 clipped: bool = False) -> torch.Tensor:
        """Gaussian noise of std `sigma` `(B,)` (`[0, 1]` units) removed from its noise-matched start. A model trained
        on noisy data is not trusted below its data's noise level (`sampling_stop_sigma`): below it, fresh noise tops
        each image up to that level and the clean estimates of `TOP_UP_DRAWS` draws are averaged (starting there
        without the top-up, held-out photos under noise of std 0.05 came out at 27.2 dB, README "Photos"). From
        `PHOTO_METHODS_PIXELS` up, `sigma` is first lowered to what clipping to `[0, 1]` leaves (`clipped_noise_std`),
        unless it is that already (`clipped`). Without a top-up, the estimate of a UNet that predicts the clean image is
        shrunk toward the input by SURE (`sure_shrinkage`; the main job's model, 200 held-out digits under Gaussian
        noise s1: input 29.51 dB, the estimate 28.79, shrunk 30.13)."""
        alphas = self.scheduler.alphas_cumprod.to(corrupted.device)
        given = sigma
        if corrupted.shape[-1] * corrupted.shape[-2] >= PHOTO_METHODS_PIXELS and not clipped:
            sigma = clipped_noise_std(corrupted, sigma)
        start = noise_matched_timestep(alphas, sigma)
        if self._stop_level() <= 0:
            denoiser = self._restoration_denoiser(corrupted)

            def estimate(images: torch.Tensor) -> torch.Tensor:
                sample = alphas[start].view(-1, 1, 1, 1).sqrt().to(images.dtype) * images
                return denoise_from_timestep(denoiser, alphas, sample, start, steps)

            if self.scheduler.config.get("prediction_type") == "sample":
                return sure_shrinkage(estimate, corrupted, given)  # the unclipped values hold the noise as given
            return estimate(corrupted)
        levels = noise_to_signal(alphas.double().cpu())  # model units
        start = start.clamp(min=int((levels >= self._stop_level()).nonzero()[0]))
        below = 2 * sigma.cpu() < self._stop_level()
        top_up = torch.where(below, (levels[start].pow(2) - (2 * sigma.cpu()).pow(2)).clamp_min(0).sqrt(), 0.0)
        top_up = top_up.view(-1, 1, 1, 1)
        estimates = []
        for _ in range(TOP_UP_DRAWS if below.any() else 1):
            noise = randn_tensor(corrupted.shape, generator=generator, device=corrupted.device, dtype=corrupted.dtype)
            noisy = corrupted + top_up.to(corrupted) * noise
            sample = alphas[start].view(-1, 1, 1, 1).sqrt().to(corrupted.dtype) * noisy
            estimates.append(denoise_from_timestep(self._restoration_denoiser(corrupted), alphas, sample, start, steps))
        return torch.stack(estimates).mean(0)

    def _deblur(self, corrupted: torch.Tensor, blur_sigma: float | None, steps: int) -> torch.Tensor:
        """Gaussian blur of `blur_sigma` pixels (per image `ESTIMATED_BLUR_SHARE` of `added_blur_sigma` when None)
        undone with its separable operator: the truncated pseudo-inverse applied to the input, then `steps`
        deterministic DDIM steps of the prior from noise `REFINE_SIGMA`, each projected back onto the data. Starting
        from pure noise instead (DDNM) lost to the blurred input on held-out photos (README, "Photos"). An image whose
        estimate is 0 comes back as it is."""
        alphas = self.scheduler.alphas_cumprod.to(corrupted.device)
        height, width = corrupted.shape[-2:]
        sigmas = ([blur_sigma] * corrupted.shape[0] if blur_sigma is not None
                  else [round(ESTIMATED_BLUR_SHARE * float(value), 2) for value in added_blur_sigma(corrupted)])
        restored = corrupted.clone()
        for sigma in sorted(set(sigmas) - {0.0}):  # one batch per std
            index = [i for i, value in enumerate(sigmas) if value == sigma]
            projection = separable_consistency(corrupted[index], gaussian_blur_matrix(height, sigma),
                                               gaussian_blur_matrix(width, sigma))
            deconvolved = projection(corrupted[index]).clamp(-1, 1)
            start = noise_matched_timestep(alphas, torch.full((len(index),), REFINE_SIGMA))
            sample = alphas[start].view(-1, 1, 1, 1).sqrt().to(corrupted.dtype) * deconvolved
            restored[index] = denoise_from_timestep(self._restoration_denoiser(corrupted), alphas, sample, start, steps,
                                                    projection)
        return restored

    def _learned(self, corruption: str) -> bool:
        return self.condition_embedding is not None and corruption in self.condition_embedding.corruptions

    def _restore_learned(self, corrupted: torch.Tensor, labels: torch.Tensor, generator, steps: int) -> torch.Tensor:
        """The corruption-conditioned denoiser, as trained: fresh noise at a low timestep, then deterministic steps."""
        alphas = self.scheduler.alphas_cumprod.to(corrupted.device)
        start = noise_matched_timestep(alphas, torch.full((corrupted.shape[0],), LEARNED_RESTORATION_SIGMA))
        alpha = alphas[start].view(-1, 1, 1, 1).to(corrupted.dtype)
        noise = randn_tensor(corrupted.shape, generator=generator, device=corrupted.device, dtype=corrupted.dtype)
        sample = alpha.sqrt() * corrupted + (1 - alpha).sqrt() * noise
        return denoise_from_timestep(self._denoiser(labels), alphas, sample, start, steps)

    def _missing_pixels(self, corrupted: torch.Tensor, plan: "RestorationPlan", alphas: torch.Tensor) -> torch.Tensor:
        """`(B, 1, H, W)` bool, True where a pixel is missing: the caller's mask, or detected outliers."""
        if plan.mask is not None:
            return _mask_to_tensor(plan.mask, corrupted)
        # Reference: the prior's posterior mean under heavy smoothing, which an impulse or a hole does not survive.
        start = noise_matched_timestep(alphas, torch.full((corrupted.shape[0],), DETECTION_SIGMA))
        sample = alphas[start].view(-1, 1, 1, 1).sqrt().to(corrupted.dtype) * corrupted
        reference = denoise_from_timestep(self._denoiser(), alphas, sample, start, 1)
        return missing_pixel_mask(corrupted, reference, plan.corruption)

    def _fill_and_refine(self, corrupted: torch.Tensor, missing: torch.Tensor, steps: int) -> torch.Tensor:
        """Missing pixels filled by biharmonic inpainting (`biharmonic_fill`), then `steps` deterministic DDIM steps of
        the prior from noise `REFINE_SIGMA`, the known pixels imposed on every estimate and kept exactly."""
        alphas = self.scheduler.alphas_cumprod.to(corrupted.device)
        known = ~missing.expand_as(corrupted)

        def keep_known(clean: torch.Tensor) -> torch.Tensor:
            return torch.where(known, corrupted, clean)

        start = noise_matched_timestep(alphas, torch.full((corrupted.shape[0],), REFINE_SIGMA))
        sample = alphas[start].view(-1, 1, 1, 1).sqrt().to(corrupted.dtype) * biharmonic_fill(corrupted, missing)
        return keep_known(denoise_from_timestep(self._restoration_denoiser(corrupted), alphas, sample, start, steps, keep_known))

    def _inpaint(self, corrupted: torch.Tensor, missing: torch.Tensor, generator, steps: int) -> torch.Tensor:
        """RePaint through Diffusers' `RePaintScheduler` (resampling jumps of 5 steps, twice), known pixels kept."""
        # The model's own betas (whatever schedule or rescaling made them), so both processes are the same.
        config = self.scheduler.config
        scheduler = RePaintScheduler(num_train_timesteps=config.num_train_timesteps, clip_sample=config.clip_sample,
                                     trained_betas=self.scheduler.betas.numpy())
        scheduler.set_timesteps(steps, jump_length=5, jump_n_sample=2, device=corrupted.device)
        known = (~missing).to(corrupted.dtype)
        sample = randn_tensor(corrupted.shape, generator=generator, device=corrupted.device, dtype=corrupted.dtype)
        previous = scheduler.timesteps[0] + 1
        denoiser = self._denoiser()
        for t in self.progress_bar(scheduler.timesteps):
            if t < previous:
                eps = denoiser(sample, t.reshape(1).expand(sample.shape[0]))  # RePaint steps with predicted noise
                sample = scheduler.step(eps, t, sample, corrupted, known, generator).prev_sample
            else:
                sample = scheduler.undo_step(sample, previous, generator)  # a list: each image its own noise
            previous = t
        return known * corrupted + (1 - known) * sample.clamp(-1, 1)

    @staticmethod
    def _check_generators(generator, batch_size: int) -> None:
        items = generator if isinstance(generator, list) else [generator]
        if generator is not None and not all(isinstance(item, torch.Generator) for item in items):
            raise ValueError(f"generator must be a torch.Generator or a list of them, got {generator!r}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}; pass one per image")


def _needs_bin_weights(component_folder: str) -> bool:
    """Whether a downloaded model component (it has a `config.json`) came without safetensors weights."""
    return os.path.isfile(os.path.join(component_folder, "config.json")) and not any(
        file.endswith((".safetensors", ".bin")) for file in os.listdir(component_folder))


def _component_names(index_file: str) -> list[str]:
    """The components a `model_index.json` lists (entries `[library, class]`), or none when the file is missing."""
    if not os.path.isfile(index_file):
        return []
    with open(index_file, encoding="utf-8") as handle:
        index = json.load(handle)
    return [name for name, value in index.items() if isinstance(value, list) and not name.startswith("_")]


def load_pipeline_index(folder: str | os.PathLike) -> dict:
    """Read a pipeline folder's `model_index.json`."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not a pipeline folder: it has no model_index.json")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _check_count(name: str, value) -> None:
    """A positive int (not a bool, not 2.5), else `ValueError` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _mask_to_tensor(mask: torch.Tensor | np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A missing-pixel mask as `(B, 1, H, W)` bool on `like`'s device: tensor `(B, 1, H, W)` / `(H, W)`, or numpy
    `(B, H, W, 1)` / `(H, W, 1)` / `(H, W)`; nonzero means missing."""
    if isinstance(mask, np.ndarray):
        array = mask[..., 0] if mask.ndim in (3, 4) and mask.shape[-1] == 1 else mask
        mask = torch.from_numpy(np.ascontiguousarray(array)).unsqueeze(-3)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a tensor or numpy array, got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None, None]
    if mask.ndim == 3:
        mask = mask.unsqueeze(0)
    expected = (like.shape[0], 1, *like.shape[-2:])
    if mask.ndim == 4 and mask.shape[0] == 1:
        mask = mask.expand(like.shape[0], *mask.shape[1:])
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must have shape {expected} (1 = missing) for this image batch, got {tuple(mask.shape)}")
    if mask.is_floating_point() and not torch.isfinite(mask).all():  # NaN != 0 would mark every such pixel missing
        raise ValueError("mask holds NaN or infinite values; pass 1 where a pixel is missing, 0 where it is seen")
    return mask.to(like.device) != 0
