"""LatentDiffusion: autoencoder (frozen) + conditioner + U-Net + noise schedule.

It composes the parts and owns what needs all of them — encode, decode, the model function and the
training loss — and nothing else (no sampling loop, no training loop, no logging; STYLE.md "worth
avoiding" #2):

    loss:    z0 = scale·(E(x) − shift) (or a cached latent), c = Conditioner(batch, dropout)
             L = w(t) ‖target − unet(z_t, t, c)‖²                    (Rombach et al., 2022, eq. 2)

Sampling is `ldmkit.generation.generate(model, GenerationRequest(…))`:
z_T ~ N(0, I) → sampler(Denoiser(CFG(unet, c, ∅)), timesteps) → z0 → D(z0/scale + shift).

Concatenation routes (inpainting, super-resolution): `ldmkit.conditioning.concat`; control networks:
`ldmkit.control.controlnet` / `adapter`. Classifier-free guidance wraps the model function
(`ldmkit.diffusion.guidance`), with guidance rescale (Lin et al., 2024) on request.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.conditioning.concat import ConcatConfig, degrade, random_masks
from ldmkit.conditioning.cond import Cond
from ldmkit.conditioning.conditioner import Conditioner, ConditionerConfig
from ldmkit.diffusion.config import DiffusionConfig
from ldmkit.diffusion.objective import DiffusionObjective
from ldmkit.diffusion.schedules import make_schedule
from ldmkit.errors import LdmkitError
from ldmkit.layers.sharing import with_children
from ldmkit.rng import BatchRandom
from ldmkit.unet import UNet, UNetConfig

__all__ = ["ConcatConfig", "DiffusionConfig", "LatentDiffusion", "LatentDiffusionConfig"]


def latent_loss_mask(mask: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """A pixel loss mask (B, 1, H, W) in [0, 1] → the latent grid (B, 1, h, w): the mean over each cell's f x f
    block of pixels (the image's side is f times the latent's), as kohya's sd-scripts weigh their masked loss.
    The min over the block (a cell that covers any unmasked pixel does not train) was measured no better with
    noise outside the mask (benchmarks/masked_loss.py; docs/finetune.md): the encoder mixes pixels beyond a
    cell's own block into it, so no pooling keeps what lies near the mask out of the latents that train."""
    mask = mask.float()
    return mask if mask.shape[-2:] == tuple(size) else F.interpolate(mask, size=tuple(size), mode="area")


class LatentDiffusionConfig(BaseModel):
    """Everything needed to rebuild a LatentDiffusion: saved in its checkpoint."""

    model_config = ConfigDict(extra="forbid")

    autoencoder: AutoencoderConfig
    unet: UNetConfig
    conditioner: ConditionerConfig = ConditionerConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    image_size: int = Field(32, ge=8, description="pixel resolution the model was trained at")
    concat: ConcatConfig | None = Field(None, description="concatenation route (inpainting / super-resolution); None: off")

    @model_validator(mode="after")
    def _infer_inpainting(self) -> "LatentDiffusionConfig":
        # A U-Net with c + 1 extra input channels and no route named is Stable Diffusion's inpainting
        # layout (a converted SD inpainting checkpoint): mask + masked-image latent, never dropped.
        if self.concat is None and self.unet.concat_channels and self.unet.concat_channels == self.autoencoder.latent_channels + 1:
            self.concat = ConcatConfig(kind="inpaint", drop=0.0)
        return self


class LatentDiffusion(nn.Module):
    """A container of parts: the frozen first stage, the U-Net, the conditioner, and the noise schedule of
    `config.diffusion` (with the training objective). Built from parts that already hold their weights
    (interop, fine-tuning) or with `from_config`; a trainer that samples with another U-Net (its EMA copy, a
    DDP/FSDP wrapper) takes `with_unet(net)`, a second container, and swaps no child of this one."""

    def __init__(self, autoencoder: AutoencoderKL, unet: UNet, conditioner: Conditioner, config: LatentDiffusionConfig):
        super().__init__()
        if autoencoder.config != config.autoencoder or unet.config.model_dump() != config.unet.model_dump():
            raise LdmkitError("the autoencoder or U-Net given does not match the LatentDiffusion config (build the parts "
                              "from config.autoencoder and config.unet, or use LatentDiffusion.from_config)")
        self.config = config
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.unet = unet
        self.conditioner = conditioner
        d = config.diffusion
        self.schedule = make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end, d.zero_terminal_snr)
        self.objective = DiffusionObjective(self.schedule, d.prediction_type, d.weighting, d.min_snr_gamma, d.offset_noise)
        if config.concat is not None:
            want = config.concat.channels(config.autoencoder.latent_channels)
            if config.unet.concat_channels != want:
                raise LdmkitError(f"concat route '{config.concat.kind}' needs unet.concat_channels = {want}, "
                                  f"got {config.unet.concat_channels}")
        elif config.unet.concat_channels:
            raise LdmkitError("unet.concat_channels is set but the model has no concat route (set concat.kind)")
        if config.concat is not None and config.concat.kind == "map" and \
                config.concat.map_factor != config.autoencoder.downsample_factor:
            raise LdmkitError(f"concat.map_factor is {config.concat.map_factor} but the first stage downsamples by "
                              f"{config.autoencoder.downsample_factor}; set them equal")

    @classmethod
    def from_config(cls, config: LatentDiffusionConfig, conditioner: Conditioner | None = None) -> LatentDiffusion:
        """Freshly initialised parts (the autoencoder, then the U-Net: the order their random weights are drawn
        in), the conditioner built from `config.conditioner` unless given."""
        autoencoder = AutoencoderKL(config.autoencoder)
        unet = UNet(config.unet)
        return cls(autoencoder, unet, conditioner or Conditioner(config.conditioner), config)

    def with_unet(self, unet: nn.Module) -> LatentDiffusion:
        """The same model around another U-Net (an EMA copy, a DDP/FSDP wrapper of this one): a new container
        sharing every other part; this one keeps its own U-Net."""
        return with_children(self, unet=unet)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.config.autoencoder.downsample_factor
        return (self.config.autoencoder.latent_channels, self.config.image_size // f, self.config.image_size // f)

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.autoencoder.eval()  # the first stage is frozen, always in eval mode
        return self

    # --- the two halves --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.autoencoder.encode_latents(images, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self._first_stage_precision(latents) as dtype:
            return self.autoencoder.decode_latents(latents.to(dtype)).clamp(-1, 1)

    @torch.no_grad()
    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised posterior mean (B, c, h, w) of images (B, 3, H, W) in [-1, 1]: (μ − shift)·scale."""
        ae = self.autoencoder
        with self._first_stage_precision(images) as dtype:
            return ae.normalize(ae.encode(images.to(dtype)).mean)  # (B, c, h, w)

    @contextlib.contextmanager
    def _first_stage_precision(self, x: torch.Tensor):
        """Run the autoencoder in its own weight dtype under float16 autocast: SD's VAE overflows
        float16 activations (diffusers' `force_upcast`). bfloat16 has float32's range and is kept on a GPU;
        on a CPU it gained 5 % on SD's 512² decode (within the noise of a loaded 2-core machine) for pixel
        errors up to 0.09 (docs/benchmarks.md, "CPU sampling"), so there the first stage stays float32."""
        dtype = next(self.autoencoder.parameters()).dtype
        kind = x.device.type
        if torch.is_autocast_enabled(kind) and (torch.get_autocast_dtype(kind) == torch.float16 or kind == "cpu"):
            with torch.autocast(kind, enabled=False):
                yield dtype
        else:
            yield dtype

    def model_fn(self, cond: Cond) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The U-Net with `cond` bound: (z_t, t) → raw prediction."""
        return lambda z_t, t: self.unet(z_t, t, cond)

    # --- concatenation route (ldmkit.conditioning.concat) ----------------------------------------
    def degrade(self, images: torch.Tensor) -> torch.Tensor:
        """The lowres route's degradation of images (B, 3, H, W)."""
        return degrade(images, self.config.concat.lowres_factor)

    def random_masks(self, n: int, size: int, masks: torch.Tensor | None,
                     generator: torch.Generator | BatchRandom | None) -> torch.Tensor:
        """The inpainting route's training masks (n, 1, size, size)."""
        return random_masks(n, size, masks, self.config.concat.mask_modes, generator)

    @torch.no_grad()
    def concat_condition(self, images: torch.Tensor | None, masks: torch.Tensor | None = None, train: bool = False,
                         generator: torch.Generator | BatchRandom | None = None,
                         labels: torch.Tensor | None = None,
                         latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """The concat tensor (B, concat_channels, h, w) for images (B, 3, H, W) in [-1, 1], or the maps / labels
        the route reads (`ConcatConfig.condition`); (h, w) = `latent_hw`, default the model's own latent size."""
        return self.config.concat.condition(self.encode_mean, latent_hw or self.latent_shape[1:], images, masks, train,
                                            generator, labels)

    def _conditioner_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The labels the conditioner takes: none when only the onehot concatenation route reads them."""
        cc = self.config.concat
        if cc is not None and cc.reads_labels and not self.config.conditioner.num_classes:
            return None
        return labels

    # --- training --------------------------------------------------------------------------------
    def loss(
        self,
        latents: torch.Tensor,
        texts: list[str] | None = None,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | BatchRandom | None = None,
        images: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        unet: Callable[..., torch.Tensor] | None = None,
        control: torch.Tensor | None = None,
        size_crop: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoising loss on normalised latents z0 (B, c, h, w), conditions dropped per route.
        `loss_mask` (B, 1, H, W) in [0, 1] at pixel (or latent) resolution weights the loss (`data.mask`): it
        is area-averaged to the latent grid (`latent_loss_mask`), each latent cell weighted by the share of its
        pixels that train (`DiffusionObjective`: cells at 0 get no gradient, a mask of ones is the plain loss).
        `size_crop` (B, 6) are the micro-conditions of a model that has them (default: uncropped, own size).
        `images` (B, 3, H, W) in [-1, 1] (and the dataset's `masks` (B, 1, H, W), optional) feed the
        concatenation route; its random masks and dropout come from `generator` too (a BatchRandom
        when the batch is one piece of a larger one). `unet(z_t, t, cond)` is the model to call when it
        is not `self.unet` itself: a DistributedDataParallel/FSDP wrapper of it, or `controlled_unet`,
        which reads `control` (B, C_hint, H, W) in [0, 1], the control maps, from the Cond."""
        unet = self.unet if unet is None else unet
        generator = BatchRandom.of(generator, latents.shape[0]) if generator is not None else None
        if size_crop is None:  # an uncropped image at its own size
            f = self.config.autoencoder.downsample_factor
            size_crop = self.conditioner.default_size_crop(latents.shape[0], latents.shape[2] * f, latents.shape[3] * f)
        cond = self.conditioner(texts=texts, labels=self._conditioner_labels(labels), batch_size=latents.shape[0],
                                train=True, generator=generator, size_crop=size_crop)
        cond = cond.to(latents.device)
        cond.control = control
        cc = self.config.concat
        if cc is not None:
            if images is None and not cc.reads_labels:
                raise LdmkitError(f"the '{cc.kind}' concat route needs the batch's images")
            masks = masks.to(latents.device) if masks is not None and cc.kind == "map" else masks
            images = images.to(latents.device) if images is not None else None
            cond.concat = self.concat_condition(images, masks, train=True, generator=generator,
                                                labels=labels).to(latents.device)
        if loss_mask is not None:
            loss_mask = latent_loss_mask(loss_mask, latents.shape[-2:]).to(latents.device)
        return self.objective(lambda z, t: unet(z, t, cond), latents, generator, loss_mask=loss_mask)
