"""LatentDiffusion: autoencoder (frozen) + conditioner + U-Net + noise schedule.

It composes the parts and owns the two things that need all of them — the training loss and
sampling — and nothing else (no training loop, no logging; STYLE.md "worth avoiding" #2):

    loss:    z0 = scale·(E(x) − shift) (or a cached latent), c = Conditioner(batch, dropout)
             L = w(t) ‖target − unet(z_t, t, c)‖²                    (Rombach et al., 2022, eq. 2)
    sample:  z_T ~ N(0, I) → sampler(Denoiser(CFG(unet, c, ∅)), timesteps) → z0 → D(z0/scale + shift)

Concatenation routes (inpainting, super-resolution): `ldmkit.conditioning.concat`; control networks:
`ldmkit.conditioning.controlnet` / `adapter`. Classifier-free guidance wraps the model function
(`ldmkit.diffusion.guidance`), with guidance rescale (Lin et al., 2024) on request.

img2img / SDEdit (Meng et al., 2022) works for every model: `sample(init_image=, strength=s)` keeps
the last round(s·steps) of the `steps` sampling timesteps and starts at the first of them, t_s, from
z_{t_s} = α_{t_s} E(x) + σ_{t_s} ε (E(x) the posterior mean, normalised), as diffusers' img2img does;
s = 0 returns the encode-decode of the image and s = 1 starts from pure noise (the image is then
ignored unless a concatenation route reads it).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.conditioning.adapter import Adapter
from ldmkit.conditioning.concat import ConcatConfig, degrade, kept_cells, random_masks
from ldmkit.conditioning.cond import Cond, cat_conds
from ldmkit.conditioning.conditioner import Conditioner, ConditionerConfig
from ldmkit.conditioning.control_image import convert_channels
from ldmkit.conditioning.controlnet import ControlNet, MultiControlNet, controlled_unet
from ldmkit.diffusion.config import DiffusionConfig
from ldmkit.diffusion.guidance import batched_classifier_free_guidance
from ldmkit.diffusion.objective import DiffusionObjective
from ldmkit.diffusion.parameterization import Denoiser, KnownRegionDenoiser
from ldmkit.diffusion.samplers import get_sampler
from ldmkit.diffusion.schedules import make_schedule, q_sample, sampler_timesteps
from ldmkit.errors import LdmkitError
from ldmkit.layers.attention import clear_context_cache
from ldmkit.rng import BatchRandom
from ldmkit.unet import UNet, UNetConfig

__all__ = ["ConcatConfig", "DiffusionConfig", "LatentDiffusion", "LatentDiffusionConfig"]

Control = ControlNet | MultiControlNet | Adapter


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
        if config.concat is not None and config.concat.kind == "map" and \
                config.concat.map_factor != config.autoencoder.downsample_factor:
            raise LdmkitError(f"concat.map_factor is {config.concat.map_factor} but the first stage downsamples by "
                              f"{config.autoencoder.downsample_factor}; set them equal")

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
                         labels: torch.Tensor | None = None) -> torch.Tensor:
        """The concat tensor (B, concat_channels, h, w) for images (B, 3, H, W) in [-1, 1], or the maps / labels
        the route reads (`ConcatConfig.condition`)."""
        return self.config.concat.condition(self.encode_mean, self.latent_shape[1:], images, masks, train, generator,
                                            labels)

    def _conditioner_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The labels the conditioner takes: none when only the onehot concatenation route reads them."""
        cc = self.config.concat
        if cc is not None and cc.reads_labels and not self.config.conditioner.num_classes:
            return None
        return labels

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
        conv = convert_channels(image.expand(batch, -1, -1, -1), channels)
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
        unet: Callable[..., torch.Tensor] | None = None,
        control: torch.Tensor | None = None,
        size_crop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoising loss on normalised latents z0 (B, c, h, w), conditions dropped per route.
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
        return self.objective(lambda z, t: unet(z, t, cond), latents, generator)

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
        control: Control | None = None,
        control_image: torch.Tensor | list[torch.Tensor] | None = None,
        control_scale: float | list[float] | None = None,
        keep_known: bool = True,
        overlay: bool = True,
        sigmas: str | None = None,
        negative_prompt: str | list[str] | None = None,
        guidance_rescale: float = 0.0,
        **sampler_opts,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1]. B = len(texts) or len(labels) or num_samples.

        guidance: the classifier-free guidance scale w (1 = off); guidance_rescale: φ of guidance rescale
        (Lin et al., 2024; 0 = off, 0.7 their recommendation), which pulls the guided prediction's std back
        to the conditional one's and tames over-saturation at large w.
        sampler_opts go to the sampler, except `grid_steps` (lcm): the points of the student's distillation grid
        (an ldmkit student's meta.sampling.grid_steps; default 50, diffusers' LCMScheduler).
        init_image (B or 1, 3, H, W) in [-1, 1]: the concat route's source (inpaint / lowres) and the
        img2img start (`strength` in [0, 1]: 1 = from pure noise, 0 = the encode-decode of the image).
        mask (B or 1, 1, H, W) in [0, 1], 1 = repaint: inpainting models only; with `keep_known` the latent
        cells the mask does not touch are pinned to the image's own latent (blended latent diffusion),
        so only the decoder's reach past the hole changes kept pixels; with `overlay` (the default) the
        decoded image is then composited over the init image through the mask, so kept pixels are the
        input's exactly (the A1111 web UI's paste-back; diffusers' `apply_overlay`). sigmas: None (the
        model's timestep spacing) or "karras" / "exponential": steps spaced in σ (`make_sigma_steps`).
        negative_prompt (one, or one per sample): the unconditional branch of guidance encodes it instead
        of the empty caption, steering away from it (text models; no effect at guidance 1). control: a ControlNet /
        MultiControlNet / Adapter for this model's U-Net with `control_image` (B or 1, C, f·h, f·w) in
        [0, 1] and `control_scale`; it acts on both branches of guidance.

        The noise is drawn from one generator seeded with `seed`, so the same seed and arguments
        give the same images."""
        if labels is not None and not isinstance(labels, torch.Tensor):
            labels = torch.tensor(labels, dtype=torch.long)
        n = self._sample_count(texts, labels, num_samples, init_image)
        self._check_sample_inputs(strength, guidance_rescale, init_image, mask, control, control_image, labels)
        device = next(self.unet.parameters()).device
        image = self.prepare_image(init_image, 3, n, "init image").to(device) if init_image is not None else None
        m = self.prepare_image(mask, 1, n, "mask").to(device).clamp(0, 1).round() if mask is not None else None
        g = torch.Generator(device="cpu")
        if seed is not None:
            g.manual_seed(seed)
        z = torch.randn((n, *self.latent_shape), generator=g).to(device)
        cond, uncond, scale = self._sample_conds(texts, labels, n, guidance, image, m, device, negative_prompt)
        model = self._control(cond, uncond, control, control_image, control_scale, z)
        fn = batched_classifier_free_guidance(model, cond, uncond, scale, rescale=guidance_rescale, cat=cat_conds)
        denoiser = Denoiser(fn, self.schedule, self.config.diffusion.prediction_type)
        known = keep = None
        if self.config.concat is not None and self.config.concat.takes_mask and keep_known:
            known, keep = self.encode_mean(image), kept_cells(m, self.latent_shape[1:])  # (B, c, h, w), (B, 1, h, w)
            denoiser = KnownRegionDenoiser(denoiser, known, keep)
        z, timesteps, levels = self._start(z, steps, image, strength, sigmas, sampler, sampler_opts.pop("grid_steps", None))
        if len(timesteps) == 0:  # img2img at strength 0: the encode-decode of the image
            return z if return_latents else self.decode(z)
        if levels is not None:
            sampler_opts = {**sampler_opts, "alpha_bars": levels}
        z0 = get_sampler(sampler)(denoiser, z, timesteps, generator=g, callback=callback, **sampler_opts)
        if known is not None:  # samplers whose last step keeps a little noise end exactly on the known cells
            z0 = torch.lerp(z0, known, keep)
        for net in (self.unet, control):  # the text tokens' cached K/V are not needed for decoding: free them first
            if isinstance(net, nn.Module):
                clear_context_cache(net)
        if return_latents:
            return z0
        out = self.decode(z0)
        if m is not None and overlay and self.config.concat.takes_mask:
            # The decoder spreads every latent cell over ~f pixels and the cells that straddle the hole's
            # edge are regenerated, so kept pixels next to the hole drift (docs/design.md: 2.1 dB under the
            # first stage on shapes-free); the pixels the user asked to keep are pasted back.
            out = torch.lerp(image.to(out.dtype), out, m.to(out.dtype))
        return out

    def _start(self, z: torch.Tensor, steps: int, image: torch.Tensor | None, strength: float, sigmas: str | None,
               sampler: str = "ddim", grid_steps: int | None = None):
        """(z at the first sampling step, the sampling timesteps, their noise levels ᾱ or None for the
        schedule's own), from `sampler_timesteps` (lcm: its distillation grid of `grid_steps` points). From
        pure noise z, or SDEdit (Meng et al., 2022): the image's latent noised to the first timestep."""
        d = self.config.diffusion
        img2img = image is not None and strength < 1.0
        timesteps, levels = sampler_timesteps(self.schedule, sampler, steps, d.timestep_spacing, d.steps_offset,
                                              sigma_spacing=sigmas, strength=strength if img2img else 1.0,
                                              grid_steps=grid_steps)
        if not img2img:
            return z, timesteps, levels
        z_init = self.encode_mean(image)  # (B, c, h, w)
        if len(timesteps) == 0:
            return z_init, timesteps, levels
        if levels is None:
            return q_sample(self.schedule, z_init, timesteps[:1].expand(z.shape[0]).to(z.device), z), timesteps, levels
        a = float(levels[0])
        return a**0.5 * z_init + (1 - a) ** 0.5 * z, timesteps, levels

    @staticmethod
    def _sample_count(texts, labels, num_samples, init_image) -> int:
        n = len(texts) if texts is not None else (labels.shape[0] if labels is not None else num_samples)
        if not n and isinstance(init_image, torch.Tensor) and init_image.ndim == 4:
            n = init_image.shape[0]
        if not n:
            raise LdmkitError("nothing to sample: give prompts, labels or a number of samples")
        return n

    def _check_sample_inputs(self, strength, guidance_rescale, init_image, mask, control, control_image,
                             labels=None) -> None:
        if not 0.0 <= strength <= 1.0:
            raise LdmkitError(f"strength must be in [0, 1], got {strength}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise LdmkitError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        cc = self.config.concat
        if mask is not None and (cc is None or not cc.reads_mask):
            raise LdmkitError("this model has no inpainting route (it was trained without concat.kind=inpaint); "
                              "it cannot take a mask")
        if cc is not None:
            cc.check_inputs(init_image, mask, labels)
        if control is not None and control_image is None:
            raise LdmkitError("a ControlNet/adapter was given without a control image")
        if control is None and control_image is not None:
            raise LdmkitError("a control image was given, but no ControlNet or adapter to read it")

    def _sample_conds(self, texts, labels, n: int, guidance: float, image, mask, device,
                      negative_prompt=None) -> tuple[Cond, Cond | None, float]:
        """The conditional Cond, the unconditional one when guiding (every route at its null value, the
        caption the negative prompt when one is given), and the scale to guide with: 1 for a w-embedded
        student, which takes the scale as an input (`cond.guidance`) and needs no unconditional branch."""
        # SDXL's sampling default: an uncropped image of this size
        size_crop = self.conditioner.default_size_crop(n, self.config.image_size, self.config.image_size)
        cond = self.conditioner(texts=texts, labels=self._conditioner_labels(labels), batch_size=n,
                                size_crop=size_crop).to(device)
        uncond = None
        if self.unet.config.time_cond_proj_dim:  # guidance enters through the student's w-embedding (LCM)
            if negative_prompt is not None:
                raise LdmkitError("this model takes its guidance scale as an input (a w-embedded student) and has no "
                                  "unconditional branch for a negative prompt; leave the negative prompt out")
            cond.guidance = torch.full((n,), float(guidance), device=device)
            guidance = 1.0
        if negative_prompt is not None:
            if not self.config.conditioner.text_encoder:
                raise LdmkitError("a negative prompt needs a text-conditioned model; this one has no text route")
            negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) not in (1, n):
                raise LdmkitError(f"got {len(negatives)} negative prompts for {n} samples; give one, or one per sample")
            if guidance != 1.0:
                uncond = self.conditioner(texts=negatives * (n // len(negatives)), labels=None, batch_size=n,
                                          size_crop=size_crop).to(device)
        elif guidance != 1.0:
            uncond = self.conditioner.uncond(n, size_crop).to(device)
        cc = self.config.concat
        if cc is not None:
            cond.concat = self.concat_condition(image, mask, labels=labels).to(device)
            if uncond is not None:
                uncond.concat = cc.null(cond.concat)
        return cond, uncond, guidance

    def _control(self, cond: Cond, uncond: Cond | None, control: Control | None, control_image, scale,
                 z: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]:
        """The model function (z_t, t, cond) with the control network in it; the control acts on both
        branches of guidance (the same image in the conditional and the unconditional Cond)."""
        branches = [c for c in (cond, uncond) if c is not None]
        if control is None:
            return self.unet
        if isinstance(control, Adapter):
            feats = control(control_image, z, scale)  # once per image: the features do not depend on t
            for c in branches:
                c.adapter_residuals = feats
            return self.unet
        n = z.shape[0]
        images = [_expand(i, n) for i in control_image] if isinstance(control_image, (list, tuple)) else _expand(control_image, n)
        for c in branches:
            c.control = images
        return controlled_unet(self.unet, control, scale)


def _expand(image: torch.Tensor, n: int) -> torch.Tensor:
    """A control image (1, C, H, W) or (C, H, W) → (n, C, H, W), so the doubled guidance batch can be
    stacked; anything else is passed through for `prepare_control_image` to refuse with its own message."""
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        return image
    image = image if image.ndim == 4 else image[None]  # (1 or n, C, H, W)
    return image.expand(n, -1, -1, -1) if image.shape[0] == 1 else image
