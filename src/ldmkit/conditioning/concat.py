"""The concatenation route: a spatial condition as extra U-Net input channels (Rombach et al. §4.3 / §4.5).

    inpaint: U-Net input = [z_t (c) | m↓ (1) | E(x ⊙ (1 − m)) (c)]   (Stable Diffusion inpainting layout)
             m (B, 1, H, W) in {0, 1}, 1 = the region to repaint; m↓ = max-pool of m to latent size, so a
             latent cell that touches the hole is repainted; masked pixels are set to 0 (mid-grey in
             [-1, 1]) before encoding, as diffusers' inpainting pipeline does.
    lowres:  U-Net input = [z_t (c) | E(up(down_s(x))) (c)]: area-downsample by s, bicubic upsample back,
             encode (super-resolution; any degradation works the same way). With lowres_encode=False
             the low-resolution RGB image itself, resized to the latent grid, is concatenated (3
             channels; the SD x4 upscaler's layout, where s = f and no resize is needed).
    onehot:  U-Net input = [z_t (c) | onehot(y) broadcast over h × w (Σ K_j)]: a class label as constant
             one-hot maps, the "concatenate the condition" route for a non-spatial condition (as
             conditional GANs feed labels to a generator's input, Mirza & Osindero 2014). With several
             factors (K_1, …, K_J) the label is read as a mixed-radix number y = ((d_1·K_2 + d_2)·K_3 + …)
             and each digit d_j gets its own one-hot group: a factorised label, whose parts can combine
             into a combination never seen whole (shapes' combo labels: factors (3, 6, 4)).
    map:     U-Net input = [z_t (c) | unshuffle_f(m) (f²)]: the dataset's spatial map m (B, 1, H, W), e.g.
             shapes' masks, folded onto the latent grid by pixel-unshuffle (each f × f block of pixels
             becomes f² channels of its latent cell), so no pixel of the map is lost; the
             concatenation counterpart of a ControlNet or adapter reading the same map.

The encoded condition is the posterior mean, normalised with the first stage's latent scale/shift
(`E` below is `encode_mean`, given by the pipeline that owns the first stage). Everything the route
needs to know about itself lives here; the pipeline only calls it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ldmkit.errors import LdmkitError
from ldmkit.rng import BatchRandom

Encoder = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, H, W) in [-1, 1] → normalised latents (B, c, h, w)


class ConcatConfig(BaseModel):
    """The concatenation route (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["inpaint", "lowres", "onehot", "map"] = Field(
        description="inpaint: mask + masked-image latent (c + 1 channels); lowres: latent of the degraded image (c "
        "channels); onehot: the label as one-hot maps (Σ onehot_factors channels); map: the dataset's mask, "
        "pixel-unshuffled (map_factor² channels)")
    onehot_factors: tuple[int, ...] = Field(
        (18,), min_length=1, description="onehot: the label's mixed-radix factors, one one-hot group each (shapes' "
        "class: (18,), or (3, 6) for shape and colour apart; shapes' combo labels: (3, 6, 4))")
    map_factor: int = Field(4, ge=1, description="map: the first stage's downsampling factor f")
    lowres_factor: int = Field(4, ge=2, description="lowres: downsampling factor s of the degradation")
    lowres_encode: bool = Field(True, description="lowres: concatenate the latent of the degraded image (c channels) "
                                "or, False, the low-resolution RGB image resized to the latent grid (3 channels)")
    drop: float = Field(0.1, ge=0, le=1, description="P(concat → zeros) in training. With drop > 0 the unconditional "
                        "branch of guidance gets zeros; with 0 both branches keep the concat (SD inpainting)")
    mask_modes: tuple[float, float, float, float] | tuple[float, float, float, float, float] = Field(
        (0.5, 0.25, 0.15, 0.1), description="inpaint training masks: P(random rectangle), P(the dataset's shape mask), "
        "P(everything: unconditional fill), P(nothing: keep all) and, optionally, P(the box around the dataset's "
        "shape mask, grown by 1/16–1/8 of the side: an object to replace)")

    def channels(self, latent_channels: int) -> int:
        if self.kind == "inpaint":
            return latent_channels + 1
        if self.kind == "onehot":
            return sum(self.onehot_factors)
        if self.kind == "map":
            return self.map_factor**2
        return latent_channels if self.lowres_encode else 3

    @property
    def takes_mask(self) -> bool:
        """Inpainting: the condition is an image and a mask (1 = repaint)."""
        return self.kind == "inpaint"

    @property
    def reads_mask(self) -> bool:
        """Sampling takes a mask: the hole of inpainting, or the map of the map route."""
        return self.kind in ("inpaint", "map")

    @property
    def reads_labels(self) -> bool:
        """The route reads the batch's labels (onehot), not its images."""
        return self.kind == "onehot"

    @property
    def num_labels(self) -> int:
        """onehot: the labels it can read, 0 … Π factors − 1."""
        return math.prod(self.onehot_factors)

    def check_inputs(self, image, mask, labels=None) -> None:
        """What sampling with this route needs, refused in one line when missing."""
        if self.kind == "onehot":
            if labels is None:
                raise LdmkitError(f"this model reads its label as one-hot maps: give labels (0..{self.num_labels - 1})")
            return
        if self.kind == "map":
            if mask is None:
                raise LdmkitError("this model reads a spatial map (1, H, W) through concatenation: give it as mask")
            return
        if image is None:
            raise LdmkitError(f"this model has a '{self.kind}' concatenation route: give init_image"
                              + (" and mask" if self.takes_mask else ""))
        if self.takes_mask and mask is None:
            raise LdmkitError("this inpainting model needs a mask (1 = region to repaint)")

    def null(self, concat: torch.Tensor) -> torch.Tensor:
        """The unconditional branch's concat: a model trained with concat dropout knows the null concat
        (zeros); one trained without it (SD inpainting) keeps the concat in both branches."""
        return torch.zeros_like(concat) if self.drop > 0 else concat

    def condition(self, encode_mean: Encoder, latent_hw: tuple[int, int], images: torch.Tensor | None,
                  masks: torch.Tensor | None = None, train: bool = False,
                  generator: torch.Generator | BatchRandom | None = None,
                  labels: torch.Tensor | None = None) -> torch.Tensor:
        """The concat tensor (B, channels, h, w) for images (B, 3, H, W) in [-1, 1].

        inpaint: `masks` (B, 1, H, W), 1 = repaint; in training they are drawn by `random_masks`
        (the given ones are the dataset's shape masks). lowres: `masks` is unused. onehot: `labels`
        (B,) long, the images unused. map: `masks` (B, 1, H, W) is the map. In training each sample's
        concat is replaced by zeros with probability `drop`."""
        if self.kind == "onehot":
            concat = onehot_maps(labels, self.onehot_factors, latent_hw)  # (B, ΣK, h, w)
        elif self.kind == "map":
            concat = unshuffle_map(masks, self.map_factor, latent_hw)  # (B, f², h, w)
        elif self.kind == "inpaint":
            if train:
                masks = random_masks(images.shape[0], images.shape[-1], masks, self.mask_modes, generator)
            if masks is None:
                raise LdmkitError("the inpainting route needs a mask (1 = region to repaint)")
            masks = masks.to(images.device, images.dtype)
            masked = images * (1 - masks)  # (B, 3, H, W): the hole at 0 (mid-grey)
            small = F.adaptive_max_pool2d(masks, latent_hw)  # (B, 1, h, w)
            concat = torch.cat([small, encode_mean(masked)], dim=1)  # (B, 1 + c, h, w)
        elif self.lowres_encode:
            concat = encode_mean(degrade(images, self.lowres_factor))  # (B, c, h, w)
        else:  # the low-resolution pixels themselves on the latent grid (B, 3, h, w)
            small = F.avg_pool2d(images, self.lowres_factor)
            concat = small if small.shape[-2:] == latent_hw else F.interpolate(
                small, size=latent_hw, mode="bicubic", align_corners=False)
        n = concat.shape[0]
        if train and self.drop > 0:
            keep = (BatchRandom.of(generator, n).rand() >= self.drop).to(concat.device)
            concat = concat * keep[:, None, None, None].to(concat.dtype)
        return concat


def onehot_maps(labels: torch.Tensor, factors: tuple[int, ...], latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, ΣK_j, h, w) in {0, 1}: labels (B,) long read as mixed-radix digits over `factors` (most
    significant first), each digit one-hot in its own group, constant over the grid."""
    if labels is None:
        raise LdmkitError("the onehot concatenation route needs the batch's labels")
    labels = labels.long()
    total = math.prod(factors)
    if ((labels < 0) | (labels >= total)).any():
        raise LdmkitError(f"onehot route: labels must be in 0..{total - 1}, got {labels.tolist()}")
    groups, rest = [], labels
    for k in reversed(factors):  # least significant digit first
        groups.append(F.one_hot(rest % k, k))  # (B, K_j)
        rest = rest // k
    vec = torch.cat(groups[::-1], dim=1).float()  # (B, ΣK_j), most significant group first
    return vec[:, :, None, None].expand(-1, -1, *latent_hw).contiguous()  # (B, ΣK_j, h, w)


def unshuffle_map(maps: torch.Tensor | None, factor: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, f², h, w): spatial maps (B, 1, H, W) folded onto the latent grid, each f × f pixel block as the
    f² channels of its cell (pixel-unshuffle, Shi et al. 2016), lossless."""
    if maps is None:
        raise LdmkitError("the map route needs the batch's maps (masks)")
    folded = F.pixel_unshuffle(maps.float(), factor)  # (B, f², H/f, W/f)
    if folded.shape[-2:] != torch.Size(latent_hw):
        raise LdmkitError(f"map route: a {maps.shape[-1]}-px map folds by {factor} to {tuple(folded.shape[-2:])}, "
                          f"not the latent grid {tuple(latent_hw)}")
    return folded


def degrade(images: torch.Tensor, factor: int) -> torch.Tensor:
    """The lowres route's degradation: area-downsample by `factor`, bicubic upsample back. (B, 3, H, W)."""
    small = F.avg_pool2d(images, factor)  # (B, 3, H/s, W/s)
    return F.interpolate(small, size=images.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def mask_box(mask: torch.Tensor, grow: int) -> torch.Tensor:
    """(1, H, W) {0, 1}: the bounding box of `mask` (1, H, W), grown by `grow` pixels on every side and
    clipped to the image; empty when the mask is."""
    out = torch.zeros_like(mask, dtype=torch.float)
    ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
    if len(ys):
        h, w = mask.shape[-2:]
        y0, y1 = max(int(ys.min()) - grow, 0), min(int(ys.max()) + 1 + grow, h)
        x0, x1 = max(int(xs.min()) - grow, 0), min(int(xs.max()) + 1 + grow, w)
        out[:, y0:y1, x0:x1] = 1.0
    return out


def random_masks(n: int, size: int, masks: torch.Tensor | None, modes: tuple[float, ...],
                 generator: torch.Generator | BatchRandom | None) -> torch.Tensor:
    """SD-inpainting-style training masks (n, 1, size, size) in {0, 1}, drawn with probabilities `modes`: a
    random rectangle, the dataset's own mask (a rectangle when there is none), everything, nothing, and
    (a fifth probability) the grown box around the dataset's mask (`mask_box`): the hole left by removing
    an object, which the caption then fills with whatever it names."""
    probs = torch.tensor(modes, dtype=torch.float)
    r = BatchRandom.of(generator, n)
    mode = r.multinomial(probs).cpu()  # (n,)
    corners = r.rand(4).cpu()  # (n, 4): y0, x0, h, w fractions
    out = torch.zeros(n, 1, size, size)
    ar = torch.arange(size)
    for i in range(n):
        m = int(mode[i])
        if m == 4 and masks is not None:
            # grown by 1/16 … 1/8 of the side (the corners' first fraction, reused: one draw per sample)
            out[i] = mask_box(masks[i].cpu(), round(size * (1 + float(corners[i, 0])) / 16))
        elif m == 1 and masks is not None:
            out[i] = masks[i].cpu().float()
        elif m in (0, 1, 4):
            h, w = (0.25 + 0.5 * corners[i, 2:]) * size  # sides between 1/4 and 3/4 of the image
            y0, x0 = corners[i, 0] * (size - h), corners[i, 1] * (size - w)
            out[i, 0] = (((ar >= y0) & (ar < y0 + h))[:, None] & ((ar >= x0) & (ar < x0 + w))[None]).float()
        elif m == 2:
            out[i] = 1.0
    return out


def kept_cells(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) in {0, 1}: the latent cells an inpainting mask (B, 1, H, W) does not touch."""
    return 1 - F.adaptive_max_pool2d(mask, latent_hw)
