"""Control images for ControlNets and adapters: float tensors in [0, 1] (what diffusers' ControlNet
pipelines feed) at pixel resolution, f times the latent size (f the autoencoder's downsampling factor).
`prepare_control_image` converts what can be converted (batch of 1, gray/RGBA channels, a different size
with the same aspect ratio) and refuses the rest with one LdmkitError naming the shape it expects."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldmkit.errors import LdmkitError
from ldmkit.imageio import convert_channels


def prepare_control_image(
    image: torch.Tensor,
    channels: int,
    size: tuple[int, int] | None,
    batch: int | None,
    like: torch.Tensor | None = None,
    who: str = "ControlNet",
) -> torch.Tensor:
    """Bring a control image to (batch, channels, *size), or raise one LdmkitError naming that shape.

    - (C, H, W) gets a batch axis; a batch of 1 is repeated to `batch`; any other batch is an error.
    - Channels: RGBA → RGB and gray+alpha → gray drop alpha; gray → RGB repeats; RGB → gray is BT.601 luma.
    - Size (pixels, = f × the latent size): a different size with the same aspect ratio (within 1%)
      is resized bilinearly (antialiased when shrinking); a different aspect ratio is refused —
      stretching would misplace the control, so crop or pad it first.
    - The result takes `like`'s dtype and device (the latent it conditions).
    """
    hgt, wid = size if size is not None else ("H", "W")
    want = f"({batch if batch is not None else 'B'}, {channels}, {hgt}, {wid})"
    if not isinstance(image, torch.Tensor):
        got = type(image).__name__
        raise LdmkitError(f"{who} needs a control image tensor {want} with values in [0, 1], got {got}")
    if image.ndim == 3:
        image = image[None]  # (1, C, H, W)
    if image.ndim != 4:
        raise LdmkitError(f"{who} control image must be {want}, got {tuple(image.shape)}")
    if not image.is_floating_point():
        hint = " (divide 8-bit images by 255)" if image.dtype == torch.uint8 else ""
        raise LdmkitError(f"{who} control image must be a float tensor in [0, 1], got {image.dtype}{hint}")
    if like is not None:
        image = image.to(device=like.device)
    if batch is not None and image.shape[0] != batch:
        if image.shape[0] != 1:
            raise LdmkitError(f"{who} control image must be {want} (or a batch of 1), got {tuple(image.shape)}")
        image = image.expand(batch, -1, -1, -1)  # (B, C, H, W) one control for the whole batch
    converted = convert_channels(image, channels)
    if converted is None:
        accepted = {3: " (RGB; gray and RGBA are converted)", 1: " (gray; RGB and RGBA are converted)"}
        raise LdmkitError(
            f"{who} control image has {image.shape[1]} channels; expected {want}{accepted.get(channels, '')}"
        )
    image = converted
    if size is not None and tuple(image.shape[2:]) != tuple(size):
        h0, w0 = image.shape[2:]
        if abs(h0 * wid - w0 * hgt) > 0.01 * h0 * wid:
            raise LdmkitError(
                f"{who} control image is {h0}x{w0}, expected {want} (f times the latent size); the aspect ratios "
                "differ, so it cannot be resized without distortion: crop or pad it to that aspect first"
            )
        shrink = h0 > hgt or w0 > wid  # antialiased resizing has float32/64 kernels only: resize there
        image = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return image if like is None else image.to(like.dtype)
