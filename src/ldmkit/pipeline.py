"""LatentDiffusion: autoencoder (frozen) + conditioner + U-Net + noise schedule.

It composes the parts and owns the two things that need all of them — the training loss and
sampling — and nothing else (no training loop, no logging; STYLE.md "worth avoiding" #2):

    loss:    z0 = scale·(E(x) − shift) (or a cached latent), c = Conditioner(batch, dropout)
             L = w(t) ‖target − unet(z_t, t, c)‖²                    (Rombach et al., 2022, eq. 2)
    sample:  z_T ~ N(0, I) → sampler(Denoiser(CFG(unet, c, ∅)), timesteps) → z0 → D(z0/scale + shift)

Concatenation routes (`LatentDiffusionConfig.concat`, Rombach et al. §4.3 / §4.5):

    inpaint: U-Net input = [z_t (c) | m↓ (1) | E(x ⊙ (1 − m)) (c)]   (Stable Diffusion inpainting layout)
             m (B, 1, H, W) in {0, 1}, 1 = the region to repaint; m↓ = max-pool of m to latent size, so a
             latent cell that touches the hole is repainted; masked pixels are set to 0 (mid-grey in
             [-1, 1]) before encoding, as diffusers' inpainting pipeline does.
    lowres:  U-Net input = [z_t (c) | E(up(down_s(x))) (c)]: area-downsample by s, bicubic upsample back,
             encode (super-resolution; any degradation works the same way). With lowres_encode=False
             the low-resolution RGB image itself, resized to the latent grid, is concatenated (3
             channels; the SD x4 upscaler's layout, where s = f and no resize is needed).
    The encoded condition uses the posterior mean and the checkpoint's latent scale/shift.

img2img / SDEdit (Meng et al., 2022) works for every model: `sample(init_image=, strength=s)` keeps
the last round(s·steps) of the `steps` sampling timesteps and starts at the first of them, t_s, from
z_{t_s} = α_{t_s} E(x) + σ_{t_s} ε (E(x) the posterior mean, normalised), as diffusers' img2img does;
s = 0 returns the encode-decode of the image and s = 1 starts from pure noise (the image is then
ignored unless a concatenation route reads it).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.conditioning import Cond, Conditioner, ConditionerConfig, cat_conds
from ldmkit.control import Adapter, ControlNet, MultiControlNet, _convert_channels, controlled_unet
from ldmkit.diffusion.guidance import classifier_free_guidance
from ldmkit.diffusion.objective import DiffusionObjective
from ldmkit.diffusion.parameterization import Denoiser, KnownRegionDenoiser
from ldmkit.diffusion.samplers import get_sampler
from ldmkit.diffusion.schedules import make_schedule, make_timesteps, q_sample
from ldmkit.errors import LdmkitError
from ldmkit.layers.attention import clear_context_cache
from ldmkit.rng import BatchRandom
from ldmkit.train.checkpoint import register_kind
from ldmkit.unet import UNet, UNetConfig


class DiffusionConfig(BaseModel):
    """The forward process and the training objective."""

    model_config = ConfigDict(extra="forbid")

    schedule: str = Field("scaled_linear", description="linear | scaled_linear | cosine")
    num_timesteps: int = Field(1000, ge=1)
    beta_start: float = Field(0.00085, gt=0)
    beta_end: float = Field(0.012, gt=0)
    zero_terminal_snr: bool = Field(False, description="rescale to SNR(T) = 0 (Lin et al., 2024); use v-prediction")
    prediction_type: str = Field("eps", description="eps | v | x0")
    weighting: str = Field("uniform", description="uniform | min_snr")
    min_snr_gamma: float = Field(5.0, gt=0)
    offset_noise: float = Field(0.0, ge=0)
    timestep_spacing: str = Field("trailing", description="sampling timesteps: leading | trailing | linspace")
    steps_offset: int = Field(0, ge=0, description="added to 'leading' timesteps (SD v1: 1)")


class ConcatConfig(BaseModel):
    """The concatenation route: a spatial condition as extra U-Net input channels (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["inpaint", "lowres"] = Field(description="inpaint: mask + masked-image latent (c + 1 channels); "
                                               "lowres: latent of the degraded image (c channels)")
    lowres_factor: int = Field(4, ge=2, description="lowres: downsampling factor s of the degradation")
    lowres_encode: bool = Field(True, description="lowres: concatenate the latent of the degraded image (c channels) "
                                "or, False, the low-resolution RGB image resized to the latent grid (3 channels)")
    drop: float = Field(0.1, ge=0, le=1, description="P(concat → zeros) in training. With drop > 0 the unconditional "
                        "branch of guidance gets zeros; with 0 both branches keep the concat (SD inpainting)")
    mask_modes: tuple[float, float, float, float] = Field(
        (0.5, 0.25, 0.15, 0.1), description="inpaint training masks: P(random rectangle), P(the dataset's shape mask), "
        "P(everything: unconditional fill), P(nothing: keep all)")

    def channels(self, latent_channels: int) -> int:
        if self.kind == "inpaint":
            return latent_channels + 1
        return latent_channels if self.lowres_encode else 3


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
    def __init__(self, config: LatentDiffusionConfig, conditioner: Conditioner | None = None):
        super().__init__()
        self.config = config
        self.autoencoder = AutoencoderKL(config.autoencoder).eval().requires_grad_(False)
        self.unet = UNet(config.unet)
        self.conditioner = conditioner or Conditioner(config.conditioner)
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

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.config.autoencoder.downsample_factor
        return (self.config.autoencoder.latent_channels, self.config.image_size // f, self.config.image_size // f)

    def train(self, mode: bool = True) -> "LatentDiffusion":
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

    @contextlib.contextmanager
    def _first_stage_precision(self, x: torch.Tensor):
        """Run the autoencoder in its own weight dtype under float16 autocast: SD's VAE overflows
        float16 activations (diffusers' `force_upcast`). bfloat16 has float32's range and is kept."""
        dtype = next(self.autoencoder.parameters()).dtype
        kind = x.device.type
        if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16:
            with torch.autocast(kind, enabled=False):
                yield dtype
        else:
            yield dtype

    def model_fn(self, cond: Cond) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The U-Net with `cond` bound: (z_t, t) → raw prediction."""
        kwargs = cond.unet_kwargs()
        return lambda z_t, t: self.unet(z_t, t, **kwargs)

    # --- concatenation route ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_mean(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised posterior mean (B, c, h, w) of images (B, 3, H, W) in [-1, 1]: (μ − shift)·scale."""
        ae = self.autoencoder
        with self._first_stage_precision(images) as dtype:
            return (ae.encode(images.to(dtype)).mean - ae.config.shift_factor) * ae.config.scaling_factor  # (B, c, h, w)

    def degrade(self, images: torch.Tensor) -> torch.Tensor:
        """The lowres route's degradation: area-downsample by s, bicubic upsample back. (B, 3, H, W)."""
        s = self.config.concat.lowres_factor
        small = F.avg_pool2d(images, s)  # (B, 3, H/s, W/s)
        return F.interpolate(small, size=images.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)

    def random_masks(self, n: int, size: int, masks: torch.Tensor | None,
                     generator: torch.Generator | BatchRandom | None) -> torch.Tensor:
        """SD-inpainting-style training masks (n, 1, size, size) in {0, 1}: a random rectangle, the
        dataset's own mask (a rectangle when there is none), everything, or nothing."""
        probs = torch.tensor(self.config.concat.mask_modes, dtype=torch.float)
        r = BatchRandom.of(generator, n)
        mode = r.multinomial(probs).cpu()  # (n,)
        corners = r.rand(4).cpu()  # (n, 4): y0, x0, h, w fractions
        out = torch.zeros(n, 1, size, size)
        ar = torch.arange(size)
        for i in range(n):
            m = int(mode[i])
            if m == 1 and masks is not None:
                out[i] = masks[i].cpu().float()
            elif m in (0, 1):
                h, w = (0.25 + 0.5 * corners[i, 2:]) * size  # sides between 1/4 and 3/4 of the image
                y0, x0 = corners[i, 0] * (size - h), corners[i, 1] * (size - w)
                out[i, 0] = (((ar >= y0) & (ar < y0 + h))[:, None] & ((ar >= x0) & (ar < x0 + w))[None]).float()
            elif m == 2:
                out[i] = 1.0
        return out

    @torch.no_grad()
    def concat_condition(self, images: torch.Tensor, masks: torch.Tensor | None = None, train: bool = False,
                         generator: torch.Generator | BatchRandom | None = None) -> torch.Tensor:
        """The concat tensor (B, concat_channels, h, w) for images (B, 3, H, W) in [-1, 1].

        inpaint: `masks` (B, 1, H, W), 1 = repaint; in training they are drawn by `random_masks`
        (the given ones are the dataset's shape masks). lowres: `masks` is unused. In training each
        sample's concat is replaced by zeros with probability concat.drop."""
        cc = self.config.concat
        n = images.shape[0]
        if cc.kind == "inpaint":
            if train:
                masks = self.random_masks(n, images.shape[-1], masks, generator)
            if masks is None:
                raise LdmkitError("the inpainting route needs a mask (1 = region to repaint)")
            masks = masks.to(images.device, images.dtype)
            masked = images * (1 - masks)  # (B, 3, H, W): the hole at 0 (mid-grey)
            small = F.adaptive_max_pool2d(masks, self.latent_shape[1:])  # (B, 1, h, w)
            concat = torch.cat([small, self.encode_mean(masked)], dim=1)  # (B, 1 + c, h, w)
        elif cc.lowres_encode:
            concat = self.encode_mean(self.degrade(images))  # (B, c, h, w)
        else:  # the low-resolution pixels themselves on the latent grid (B, 3, h, w)
            small = F.avg_pool2d(images, cc.lowres_factor)
            concat = small if small.shape[-2:] == self.latent_shape[1:] else F.interpolate(
                small, size=self.latent_shape[1:], mode="bicubic", align_corners=False)
        if train and cc.drop > 0:
            keep = (BatchRandom.of(generator, n).rand() >= cc.drop).to(concat.device)
            concat = concat * keep[:, None, None, None].to(concat.dtype)
        return concat

    def prepare_image(self, image, channels: int, batch: int, name: str) -> torch.Tensor:
        """An image-like input (init image, mask) → (batch, channels, S, S) at the model's resolution S,
        converting what can be converted and refusing the rest with one LdmkitError naming `name`."""
        size = self.config.image_size
        want = f"({batch}, {channels}, {size}, {size})"
        if not isinstance(image, torch.Tensor) or not image.is_floating_point():
            got = image.dtype if isinstance(image, torch.Tensor) else type(image).__name__
            raise LdmkitError(f"{name} must be a float tensor {want}, got {got}")
        if image.ndim == 3:
            image = image[None]  # (1, C, H, W)
        if image.ndim != 4 or image.shape[0] not in (1, batch):
            raise LdmkitError(f"{name} must be {want} (or a batch of 1), got {tuple(image.shape)}")
        conv = _convert_channels(image.expand(batch, -1, -1, -1), channels)
        if conv is None:
            raise LdmkitError(f"{name} has {image.shape[1]} channels; expected {want}")
        h, w = conv.shape[-2:]
        if h != w:
            raise LdmkitError(f"{name} is {h}x{w}; expected a square {size}x{size} image (crop it first)")
        if h != size:
            conv = F.interpolate(conv.float(), size=(size, size), mode="bilinear" if channels == 3 else "nearest",
                                 align_corners=False if channels == 3 else None, antialias=channels == 3 and h > size)
        return conv

    # --- training --------------------------------------------------------------------------------
    def loss(
        self,
        latents: torch.Tensor,
        texts: list[str] | None = None,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | BatchRandom | None = None,
        images: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        unet: nn.Module | None = None,
    ) -> torch.Tensor:
        """Denoising loss on normalised latents z0 (B, c, h, w), conditions dropped per route.
        `images` (B, 3, H, W) in [-1, 1] (and the dataset's `masks` (B, 1, H, W), optional) feed the
        concatenation route; its random masks and dropout come from `generator` too (a BatchRandom
        when the batch is one piece of a larger one). `unet` is the module to call when it is not
        `self.unet` itself: a DistributedDataParallel/FSDP wrapper of it, or a ControlNet-driven one."""
        unet = self.unet if unet is None else unet
        generator = BatchRandom.of(generator, latents.shape[0]) if generator is not None else None
        cond = self.conditioner(texts=texts, labels=labels, batch_size=latents.shape[0], train=True, generator=generator)
        cond = cond.to(latents.device)
        if self.config.concat is not None:
            if images is None:
                raise LdmkitError(f"the '{self.config.concat.kind}' concat route needs the batch's images")
            cond.concat = self.concat_condition(images.to(latents.device), masks, train=True, generator=generator)
        return self.objective(lambda z, t: unet(z, t, **cond.unet_kwargs()), latents, generator)

    # --- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        texts: list[str] | None = None,
        labels: torch.Tensor | list[int] | None = None,
        num_samples: int | None = None,
        steps: int = 50,
        sampler: str = "ddim",
        guidance: float = 1.0,
        seed: int | None = 0,
        callback: Callable | None = None,
        return_latents: bool = False,
        init_image: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        strength: float = 1.0,
        control: ControlNet | MultiControlNet | Adapter | None = None,
        control_image: torch.Tensor | list[torch.Tensor] | None = None,
        control_scale: float | list[float] | None = None,
        keep_known: bool = True,
        **sampler_opts,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1]. B = len(texts) or len(labels) or num_samples.

        init_image (B or 1, 3, H, W) in [-1, 1]: the concat route's source (inpaint / lowres) and the
        img2img start (`strength` in [0, 1]: 1 = from pure noise, 0 = the encode-decode of the image).
        mask (B or 1, 1, H, W) in [0, 1], 1 = repaint: inpainting models only; with `keep_known` the latent
        cells the mask does not touch are pinned to the image's own latent (blended latent diffusion),
        so only the decoder's reach past the hole changes kept pixels. control: a ControlNet /
        MultiControlNet / Adapter for this model's U-Net with `control_image` (B or 1, C, f·h, f·w) in
        [0, 1] and `control_scale`; it acts on both branches of guidance.

        The noise is drawn from one generator seeded with `seed`, so the same seed and arguments
        give the same images."""
        if labels is not None and not isinstance(labels, torch.Tensor):
            labels = torch.tensor(labels, dtype=torch.long)
        n = len(texts) if texts is not None else (labels.shape[0] if labels is not None else num_samples)
        if not n and isinstance(init_image, torch.Tensor) and init_image.ndim == 4:
            n = init_image.shape[0]
        if not n:
            raise LdmkitError("nothing to sample: give prompts, labels or a number of samples")
        if not 0.0 <= strength <= 1.0:
            raise LdmkitError(f"strength must be in [0, 1], got {strength}")
        device = next(self.unet.parameters()).device
        cc = self.config.concat
        if mask is not None and (cc is None or cc.kind != "inpaint"):
            raise LdmkitError("this model has no inpainting route (it was trained without concat.kind=inpaint); "
                              "it cannot take a mask")
        if cc is not None and init_image is None:
            raise LdmkitError(f"this model has a '{cc.kind}' concatenation route: give init_image"
                              + (" and mask" if cc.kind == "inpaint" else ""))
        if cc is not None and cc.kind == "inpaint" and mask is None:
            raise LdmkitError("this inpainting model needs a mask (1 = region to repaint)")
        if control is not None and control_image is None:
            raise LdmkitError("a ControlNet/adapter was given without a control image")
        if control is None and control_image is not None:
            raise LdmkitError("a control image was given, but no ControlNet or adapter to read it")
        image = self.prepare_image(init_image, 3, n, "init image").to(device) if init_image is not None else None
        cond = self.conditioner(texts=texts, labels=labels, batch_size=n).to(device)
        uncond = self.conditioner.uncond(n).to(device) if guidance != 1.0 else None
        if cc is not None:
            m = self.prepare_image(mask, 1, n, "mask").to(device).clamp(0, 1).round() if mask is not None else None
            cond.concat = self.concat_condition(image, m)
            if uncond is not None:
                # A model trained with concat dropout knows the null concat (zeros); one trained without it
                # (SD inpainting) keeps the concat in both branches and guides the other routes only.
                uncond.concat = torch.zeros_like(cond.concat) if cc.drop > 0 else cond.concat

        g = torch.Generator(device="cpu")
        if seed is not None:
            g.manual_seed(seed)
        z = torch.randn((n, *self.latent_shape), generator=g).to(device)
        unet = self.unet
        if control is not None:
            if isinstance(control, Adapter):
                feats = control(control_image, z, control_scale)  # once per image: the features do not depend on t
                cond.adapter_residuals = feats
                if uncond is not None:
                    uncond.adapter_residuals = feats
            else:
                imgs = control_image
                if uncond is not None:  # the doubled guidance batch [∅; c]: the same control for both halves
                    imgs = [_double(i, n) for i in imgs] if isinstance(imgs, (list, tuple)) else _double(imgs, n)
                unet = controlled_unet(self.unet, control, imgs, control_scale)
        kwargs = cond.unet_kwargs()
        fn = lambda z_t, t: unet(z_t, t, **kwargs)  # noqa: E731
        if uncond is not None:
            both_kwargs = cat_conds(uncond, cond).unet_kwargs()

            def fn(z_t, t):
                # One doubled batch instead of two calls: [∅; c] → ε_∅ + w (ε_c − ε_∅) (Ho & Salimans, 2022, eq. 6)
                out = unet(torch.cat([z_t, z_t]), torch.cat([t, t]), **both_kwargs)
                e_u, e_c = out.chunk(2)
                return classifier_free_guidance(lambda *_: e_c, lambda *_: e_u, guidance)(z_t, t)

        denoiser = Denoiser(fn, self.schedule, self.config.diffusion.prediction_type)
        known = keep = None
        if cc is not None and cc.kind == "inpaint" and keep_known:
            known = self.encode_mean(image)  # (B, c, h, w)
            keep = 1 - F.adaptive_max_pool2d(m, self.latent_shape[1:])  # (B, 1, h, w): cells the hole misses
            denoiser = KnownRegionDenoiser(denoiser, known, keep)
        d = self.config.diffusion
        timesteps = make_timesteps(self.schedule, steps, d.timestep_spacing, d.steps_offset)
        if image is not None and strength < 1.0:
            # SDEdit: keep the last round(strength·steps) timesteps and noise the image's latent to the first.
            z_init = self.encode_mean(image)  # (B, c, h, w)
            timesteps = timesteps[steps - int(round(strength * steps)):]
            if len(timesteps) == 0:
                return z_init if return_latents else self.decode(z_init)
            z = q_sample(self.schedule, z_init, timesteps[:1].expand(n).to(device), z)
        z0 = get_sampler(sampler)(denoiser, z, timesteps, generator=g, callback=callback, **sampler_opts)
        if known is not None:  # samplers whose last step keeps a little noise end exactly on the known cells
            z0 = torch.lerp(z0, known, keep)
        for m in (self.unet, control):  # the text tokens' cached K/V are not needed for decoding: free them first
            if isinstance(m, nn.Module):
                clear_context_cache(m)
        return z0 if return_latents else self.decode(z0)


def _double(image: torch.Tensor, n: int) -> torch.Tensor:
    """A control image (n or 1, C, H, W) or (C, H, W) → (2n, C, H, W) for the doubled guidance batch.
    Anything else is passed through for `prepare_control_image` to refuse with its own message."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        return image
    image = image if image.ndim == 4 else image[None]  # (1 or n, C, H, W)
    if image.shape[0] not in (1, n):
        return image
    return image.expand(n, -1, -1, -1).repeat(2, 1, 1, 1)  # (2n, C, H, W)


def _build(config: LatentDiffusionConfig, meta: dict) -> LatentDiffusion:
    return LatentDiffusion(config)


register_kind("latent_diffusion", LatentDiffusionConfig, _build)
