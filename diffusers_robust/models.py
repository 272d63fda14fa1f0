"""UNet conditioning on augment labels (non-leaking augmentation, Karras et al. 2022)."""

import torch
from diffusers import UNet2DModel
from torch import nn


def _public_config(unet: UNet2DModel) -> dict:
    # Private keys such as `_use_default_values` would make `from_config` drop the overrides below.
    return {key: value for key, value in unet.config.items() if not key.startswith("_")}


class AugmentConditionedUNet(nn.Module):
    r"""
    A [`~diffusers.UNet2DModel`] told which augmentation its training image went through.

    The labels `(B, L)` pass through a bias-free linear layer into the UNet's time-embedding space and are
    added to the time embedding (the UNet is built with `class_embed_type="identity"`). Zero labels, as at
    sampling time, add exactly zero, so [`export_unet`] returns a plain `UNet2DModel` without the projection
    that produces the same outputs: the saved pipeline loads in any Diffusers code.

    Args:
        unet ([`~diffusers.UNet2DModel`]): built with `class_embed_type=None`.
        augment_dim (`int`): length `L` of the augment-label vector; 0 turns conditioning off.

    Example:

    ```py
    >>> import torch
    >>> from diffusers import UNet2DModel
    >>> from diffusers_robust.models import AugmentConditionedUNet
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32),
    ...                    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    >>> model = AugmentConditionedUNet(unet, augment_dim=7)
    >>> model(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), torch.zeros(2, 7)).shape
    torch.Size([2, 1, 8, 8])
    ```
    """

    def __init__(self, unet: UNet2DModel, augment_dim: int = 0):
        super().__init__()
        if unet.config.class_embed_type is not None or unet.config.num_class_embeds is not None:
            raise ValueError("AugmentConditionedUNet needs a UNet without class conditioning")
        self.augment_dim = augment_dim
        if augment_dim > 0:
            config = {**_public_config(unet), "class_embed_type": "identity"}
            conditioned = UNet2DModel.from_config(config)
            conditioned.load_state_dict(unet.state_dict())
            unet = conditioned
            time_embed_dim = unet.time_embedding.linear_2.out_features
            self.augment_projection = nn.Linear(augment_dim, time_embed_dim, bias=False)
            nn.init.zeros_(self.augment_projection.weight)
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, augment_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict from `sample` `(B, C, H, W)` at `timestep` `(B,)`; `augment_labels` `(B, L)`, zeros if None."""
        if self.augment_dim == 0:
            return self.unet(sample, timestep).sample
        if augment_labels is None:
            augment_labels = torch.zeros(sample.shape[0], self.augment_dim, device=sample.device, dtype=sample.dtype)
        if augment_labels.shape != (sample.shape[0], self.augment_dim):
            raise ValueError(
                f"augment_labels must have shape ({sample.shape[0]}, {self.augment_dim}), got {tuple(augment_labels.shape)}"
            )
        embedding = self.augment_projection(augment_labels.to(self.augment_projection.weight.dtype))
        return self.unet(sample, timestep, class_labels=embedding).sample


def export_unet(model: AugmentConditionedUNet | nn.Module) -> UNet2DModel:
    """A plain `UNet2DModel` (no class embedding) with the trained weights, for sampling and saving."""
    unet = model.unet
    config = {**_public_config(unet), "class_embed_type": None}
    plain = UNet2DModel.from_config(config)
    plain.load_state_dict(unet.state_dict())
    return plain
