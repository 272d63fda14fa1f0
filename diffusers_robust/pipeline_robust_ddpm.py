"""`RobustDDPMPipeline`: unconditional generation and restoration of corrupted images."""

import inspect
import json
import os

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import hf_hub_download, snapshot_download

ImageInput = PIL.Image.Image | list[PIL.Image.Image] | np.ndarray | torch.Tensor

# File patterns a pipeline needs from a repository: configs and safetensors weights of each component.
_COMPONENT_FILE_PATTERNS = ("*.json", "*.safetensors")


class RobustDDPMPipeline(DiffusionPipeline):
    r"""
    Pipeline for unconditional image generation and for restoring corrupted images (SDEdit / DiffPure).

    With the robust options of its scheduler off, generation equals [`~diffusers.DDPMPipeline`]'s for the
    same UNet, scheduler and generator. Any DDPM-family scheduler can be swapped in with `from_config`.

    Args:
        unet ([`~diffusers.UNet2DModel`]): the denoiser, predicting what the scheduler's `prediction_type` says.
        scheduler ([`~diffusers.SchedulerMixin`]): e.g. [`RobustDDPMScheduler`] or [`RobustDDIMScheduler`].

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

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs) -> str:
        """
        Download a pipeline repository from the Hub into the local cache and return its folder.

        Diffusers' own `download` rejects repositories whose `model_index.json` names components from a
        package other than Diffusers (it expects their code as files in the repository). Our components are
        installed code, so this downloads exactly what the loader needs: `model_index.json`, and the configs
        and safetensors weights of each component that `model_index.json` lists.
        """
        hub_kwargs = {
            key: kwargs.get(key)
            for key in ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
            if kwargs.get(key) is not None
        }
        index_file = hf_hub_download(pretrained_model_name, cls.config_name, **hub_kwargs)
        with open(index_file, encoding="utf-8") as handle:
            model_index = json.load(handle)
        components = [name for name, value in model_index.items() if isinstance(value, list) and not name.startswith("_")]
        allow_patterns = [cls.config_name] + [f"{name}/{pattern}" for name in components for pattern in _COMPONENT_FILE_PATTERNS]
        return snapshot_download(pretrained_model_name, allow_patterns=allow_patterns, **hub_kwargs)

    def _image_to_tensor(self, image: ImageInput) -> torch.Tensor:
        """Convert a restoration input to a `(B, C, H, W)` tensor in `[-1, 1]` on the pipeline's device."""
        channels = self.unet.config.in_channels
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
        image = image.float()
        if image.min() < 0 or image.max() > 1:
            raise ValueError(
                f"image values must lie in [0, 1] (as output_type 'np' and 'pt' return them), "
                f"got [{image.min().item():.3f}, {image.max().item():.3f}]"
            )
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if image.shape[1] != channels:
            raise ValueError(f"image has {image.shape[1]} channels but the UNet takes {channels}")
        if tuple(image.shape[2:]) != size:
            raise ValueError(f"image is {tuple(image.shape[2:])} pixels but the UNet takes {size}")
        return (image * 2 - 1).to(device=self._execution_device, dtype=self.unet.dtype)

    def _step_kwargs(self, generator, eta: float) -> dict:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "generator" in accepted:
            kwargs["generator"] = generator
        if "eta" in accepted:
            kwargs["eta"] = eta
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        image: ImageInput | None = None,
        strength: float = 0.3,
        eta: float = 0.0,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images, or restore `image` by noising it to `t = strength * T` and denoising.

        Args:
            batch_size (`int`, *optional*, defaults to 1):
                Number of images to generate; ignored when `image` is given (its batch size is used).
            generator (`torch.Generator` or list of them, *optional*):
                Seeded source of noise; a list of `batch_size` generators gives each image its own noise.
            num_inference_steps (`int`, *optional*, defaults to 1000):
                Denoising steps for a full generation; restoration runs the last `strength` share of them.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"` (list of `PIL.Image`), `"np"` (`(B, H, W, C)` in `[0, 1]`) or `"pt"` (`(B, C, H, W)` in `[0, 1]`).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`~diffusers.ImagePipelineOutput`] instead of a tuple.
            image (PIL image, list of them, `np.ndarray` or `torch.Tensor`, *optional*):
                Corrupted images to restore: PIL, numpy `(B, H, W, C)` / tensor `(B, C, H, W)` with values in
                `[0, 1]` (uint8 numpy in `[0, 255]`). PIL images are converted to the UNet's channel count;
                arrays and tensors must already have it, and the UNet's `sample_size`.
            strength (`float`, *optional*, defaults to 0.3):
                In `(0, 1]`: how far the input is noised before denoising; 1 discards it entirely.
            eta (`float`, *optional*, defaults to 0.0):
                DDIM's eta, passed to schedulers whose `step` takes it.

        Returns:
            [`~diffusers.ImagePipelineOutput`] or `tuple`: the images in the format of `output_type`.

        Example:

        ```py
        >>> import numpy as np
        >>> from diffusers_robust import RobustDDPMPipeline
        >>> pipe = RobustDDPMPipeline.from_pretrained("path/to/output_dir")  # doctest: +SKIP
        >>> noisy = np.clip(clean + 0.1 * np.random.randn(*clean.shape), 0, 1)  # doctest: +SKIP
        >>> restored = pipe(image=noisy, strength=0.3, output_type="np").images  # doctest: +SKIP
        ```
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got '{output_type}'")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        device = self._execution_device
        self.scheduler.set_timesteps(num_inference_steps)
        timesteps = self.scheduler.timesteps

        if image is None:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            self._check_generators(generator, batch_size)
            size = self.unet.config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            shape = (batch_size, self.unet.config.in_channels, *size)
            sample = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        else:
            if not 0 < strength <= 1:
                raise ValueError(f"strength must be in (0, 1], got {strength}")
            clean = self._image_to_tensor(image)
            self._check_generators(generator, clean.shape[0])
            steps_to_run = min(max(round(num_inference_steps * strength), 1), len(timesteps))
            timesteps = timesteps[len(timesteps) - steps_to_run :]
            noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=clean.dtype)
            start = timesteps[:1].repeat(clean.shape[0])
            sample = self.scheduler.add_noise(clean, noise, start)

        step_kwargs = self._step_kwargs(generator, eta)
        for t in self.progress_bar(timesteps):
            model_output = self.unet(sample, t).sample
            sample = self.scheduler.step(model_output, t, sample, **step_kwargs).prev_sample

        images = (sample / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @staticmethod
    def _check_generators(generator, batch_size: int) -> None:
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}; pass one per image")


def load_pipeline_index(folder: str | os.PathLike) -> dict:
    """Read a pipeline folder's `model_index.json`."""
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not a pipeline folder: it has no model_index.json")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
