"""UNet conditioning on a label vector (augment labels for non-leaking augmentation, Karras et al. 2022, and corruption
labels), and the label embedding a restoration-trained pipeline keeps."""

from collections.abc import Sequence

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn


def image_size(sample_size: int | Sequence[int]) -> tuple[int, int]:
    """`(height, width)` in pixels of a UNet's `sample_size`, which Diffusers gives as an int (square) or a pair."""
    return (sample_size, sample_size) if isinstance(sample_size, int) else (int(sample_size[0]), int(sample_size[1]))


# Bytes a training step keeps per (image, channel, pixel) of each UNet level for the backward pass: peak RSS of the
# digits preset's UNet (one layer per block) rose by 190 bytes per unit from 32x32 to 64x64 on CPU (batch 16); a
# forward pass without gradients (sampling, restoration) by 39 (batch 64).
ACTIVATION_BYTES_PER_UNIT = {"training": 200, "inference": 40}


def activation_memory_estimate(unet_config, batch_size: int, resolution: int, training: bool = True) -> int:
    """Bytes of activations a UNet with `unet_config` needs on `batch_size` images of `resolution` x `resolution`
    pixels, for a training step (`training`) or a forward pass without gradients: `ACTIVATION_BYTES_PER_UNIT` per
    channel and pixel of each level (halved in size per level), scaled by the layers per block, plus the attention
    matrices (pixels squared) of attention levels."""
    channels = list(unet_config["block_out_channels"])
    layers = 0.5 * (unet_config.get("layers_per_block", 2) + 1)  # 1 for the one layer per block it was measured on
    units = sum(c * (resolution / 2 ** level) ** 2 for level, c in enumerate(channels))
    attention = 0.0
    for level, block in enumerate(unet_config.get("down_block_types", ())):
        if "Attn" in block:
            pixels = (resolution / 2 ** level) ** 2
            heads = max(1, channels[level] // (unet_config.get("attention_head_dim") or channels[level]))
            attention += (3 if training else 1) * 4 * heads * pixels ** 2  # scores (and softmax, gradient), float32
    per_unit = ACTIVATION_BYTES_PER_UNIT["training" if training else "inference"]
    return int(batch_size * (per_unit * layers * units + attention))


def check_activation_memory(unet_config, batch_size: int, resolution: int, device: torch.device, what: str,
                            training: bool = True, advice: str = "lower it") -> None:
    """`ValueError` naming the estimate when [`activation_memory_estimate`] exceeds the device's memory (the machine's
    RAM on CPU); `what` names the options, `advice` what to do."""
    needed = activation_memory_estimate(unet_config, batch_size, resolution, training)
    if device.type == "cuda":
        available, where = torch.cuda.get_device_properties(device).total_memory, f"{device} has"
    else:
        import psutil

        available, where = psutil.virtual_memory().total, "this machine has"
    if needed > available:
        raise ValueError(f"{what} needs about {needed / 2**30:,.1f} GiB for the UNet's activations; {where} "
                         f"{available / 2**30:.1f} GiB: {advice}")


def _public_config(unet: UNet2DModel) -> dict:
    # Private keys such as `_use_default_values` would make `from_config` drop the overrides below.
    return {key: value for key, value in unet.config.items() if not key.startswith("_")}


class LabelConditionedUNet(nn.Module):
    r"""
    A [`~diffusers.UNet2DModel`] told what was done to its training image: which augmentation (augment labels) and
    which corruption (corruption labels), concatenated into one label vector.

    The labels `(B, L)` pass through a bias-free linear layer into the UNet's time-embedding space and are
    added to the time embedding (the UNet is built with `class_embed_type="identity"`). Zero labels, as at
    sampling time, add exactly zero, so [`export_unet`] returns a plain `UNet2DModel` without the projection
    that produces the same outputs: the saved pipeline loads in any Diffusers code.

    Args:
        unet ([`~diffusers.UNet2DModel`]): built with `class_embed_type=None`.
        label_dim (`int`): length `L` of the label vector; 0 turns conditioning off.

    Example:

    ```py
    >>> from collections.abc import Sequence

import torch
    >>> from diffusers import UNet2DModel
    >>> from diffusers_robust.models import LabelConditionedUNet
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32),
    ...                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    >>> model = LabelConditionedUNet(unet, label_dim=7)
    >>> model(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), torch.zeros(2, 7)).shape
    torch.Size([2, 1, 8, 8])
    ```
    """

    def __init__(self, unet: UNet2DModel, label_dim: int = 0):
        super().__init__()
        if unet.config.class_embed_type is not None or unet.config.num_class_embeds is not None:
            raise ValueError("LabelConditionedUNet needs a UNet without class conditioning")
        self.label_dim = label_dim
        if label_dim > 0:
            config = {**_public_config(unet), "class_embed_type": "identity"}
            conditioned = UNet2DModel.from_config(config)
            conditioned.load_state_dict(unet.state_dict())
            unet = conditioned
            time_embed_dim = unet.time_embedding.linear_2.out_features
            self.label_projection = nn.Linear(label_dim, time_embed_dim, bias=False)
            nn.init.zeros_(self.label_projection.weight)
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict from `sample` `(B, C, H, W)` at `timestep` `(B,)`; `labels` `(B, L)`, zeros if None."""
        if self.label_dim == 0:
            return self.unet(sample, timestep).sample
        if labels is None:
            labels = torch.zeros(sample.shape[0], self.label_dim, device=sample.device, dtype=sample.dtype)
        if labels.shape != (sample.shape[0], self.label_dim):
            raise ValueError(
                f"labels must have shape ({sample.shape[0]}, {self.label_dim}), got {tuple(labels.shape)}"
            )
        embedding = self.label_projection(labels.to(self.label_projection.weight.dtype))
        return self.unet(sample, timestep, class_labels=embedding).sample


def prediction_error(model, noisy_images: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                     labels: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean squared error `(B,)` (over C, H, W, in float32) of `model(noisy_images, timesteps, labels)`
    against `target`: the training objective's loss before weighting, and the held-out validation loss."""
    prediction = model(noisy_images, timesteps, labels)
    return ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))


def export_unet(model: LabelConditionedUNet | nn.Module) -> UNet2DModel:
    """A plain `UNet2DModel` (no class embedding) with the trained weights, for sampling and saving."""
    unet = model.unet
    config = {**_public_config(unet), "class_embed_type": None}
    with torch.device("meta"):  # no random initialisation of weights that are replaced at once (0.17 s at 35.7M)
        plain = UNet2DModel.from_config(config)
    plain.load_state_dict({name: value.detach().clone() for name, value in unet.state_dict().items()}, assign=True)
    return plain


class ConditionEmbedding(ModelMixin, ConfigMixin):
    r"""
    The learned embedding of a conditioning vector, saved with a pipeline that was trained to restore.

    A bias-free linear map from the labels `(B, L)` into the UNet's time-embedding space, added to the time embedding
    (what [`LabelConditionedUNet`] does while training). All-zero labels add exactly zero, so the UNet alone is the
    unconditional model; `labels_for` builds the labels that ask it to undo a corruption.

    Args:
        label_names (`list[str]`): one name per label slot: `augment/<i>` for augment labels, `corruption/<name>` for the
            corruption slots (value `severity / 5`).
        embedding_dim (`int`): the UNet's time-embedding width.

    Example:

    ```py
    >>> from diffusers_robust.models import ConditionEmbedding
    >>> embedding = ConditionEmbedding(["corruption/gaussian_noise", "corruption/impulse_noise"], embedding_dim=16)
    >>> embedding.labels_for("impulse_noise", 5, batch_size=2).tolist()
    [[0.0, 1.0], [0.0, 1.0]]
    ```
    """

    @register_to_config
    def __init__(self, label_names: list[str], embedding_dim: int):
        super().__init__()
        self.projection = nn.Linear(len(label_names), embedding_dim, bias=False)
        nn.init.zeros_(self.projection.weight)

    @property
    def corruptions(self) -> list[str]:
        """The corruptions the model was trained to undo."""
        prefix = "corruption/"
        return [name[len(prefix):] for name in self.config.label_names if name.startswith(prefix)]

    def labels_for(self, corruption: str, severity: int, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Labels `(batch_size, L)` meaning "corrupted by `corruption` at `severity` (1..5)", as in training."""
        if isinstance(severity, bool) or severity not in (1, 2, 3, 4, 5):
            raise ValueError(f"severity must be an integer from 1 to 5 (the training labels), got {severity!r}")
        slot = f"corruption/{corruption}"
        if slot not in self.config.label_names:
            raise ValueError(f"this model was trained to undo {self.corruptions}, not '{corruption}'")
        labels = torch.zeros(batch_size, len(self.config.label_names), device=device)
        labels[:, self.config.label_names.index(slot)] = severity / 5.0
        return labels

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """`(B, L)` labels -> `(B, embedding_dim)` addition to the time embedding."""
        return self.projection(labels.to(self.projection.weight.dtype))


def export_condition_embedding(model: LabelConditionedUNet, label_names: list[str]) -> ConditionEmbedding:
    """The trained label projection of `model` as a [`ConditionEmbedding`] (a pipeline component)."""
    if model.label_dim != len(label_names):
        raise ValueError(f"the model has {model.label_dim} label slots, got {len(label_names)} names")
    weight = model.label_projection.weight.detach()
    embedding = ConditionEmbedding(list(label_names), weight.shape[0])
    embedding.projection.weight.data.copy_(weight)
    return embedding
