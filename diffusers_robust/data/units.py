"""The two image units of the package, and the one conversion each way. Models and corruptions work in model units,
`[-1, 1]` (what the UNet sees); PSNR, noise levels and files work in image units, `[0, 1]`."""

from typing import TypeVar

Images = TypeVar("Images")  # a torch.Tensor or a numpy array, of any shape


def to_unit_range(images: Images) -> Images:
    """Model units `[-1, 1]` to image units `[0, 1]`: `(x + 1) / 2`, any shape; values outside stay outside."""
    return (images + 1) / 2


def to_model_range(images: Images) -> Images:
    """Image units `[0, 1]` to model units `[-1, 1]`: `x * 2 - 1`, any shape; values outside stay outside."""
    return images * 2 - 1
