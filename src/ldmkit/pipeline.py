"""LatentDiffusion: autoencoder (frozen) + conditioner + U-Net + noise schedule.

It composes the parts and owns the two things that need all of them — the training loss and
sampling — and nothing else (no training loop, no logging; STYLE.md "worth avoiding" #2):

    loss:    z0 = scale·(E(x) − shift) (or a cached latent), c = Conditioner(batch, dropout)
             L = w(t) ‖target − unet(z_t, t, c)‖²                    (Rombach et al., 2022, eq. 2)
    sample:  z_T ~ N(0, I) → sampler(Denoiser(CFG(unet, c, ∅)), timesteps) → z0 → D(z0/scale + shift)
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.conditioning import Cond, Conditioner, ConditionerConfig, cat_conds
from ldmkit.diffusion.guidance import classifier_free_guidance
from ldmkit.diffusion.objective import DiffusionObjective
from ldmkit.diffusion.parameterization import Denoiser
from ldmkit.diffusion.samplers import get_sampler
from ldmkit.diffusion.schedules import make_schedule, make_timesteps
from ldmkit.errors import LdmkitError
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


class LatentDiffusionConfig(BaseModel):
    """Everything needed to rebuild a LatentDiffusion: saved in its checkpoint."""

    model_config = ConfigDict(extra="forbid")

    autoencoder: AutoencoderConfig
    unet: UNetConfig
    conditioner: ConditionerConfig = ConditionerConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    image_size: int = Field(32, ge=8, description="pixel resolution the model was trained at")


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
        return self.autoencoder.decode_latents(latents).clamp(-1, 1)

    def model_fn(self, cond: Cond) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The U-Net with `cond` bound: (z_t, t) → raw prediction."""
        kwargs = cond.unet_kwargs()
        return lambda z_t, t: self.unet(z_t, t, **kwargs)

    # --- training --------------------------------------------------------------------------------
    def loss(
        self,
        latents: torch.Tensor,
        texts: list[str] | None = None,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Denoising loss on normalised latents z0 (B, c, h, w), conditions dropped per route."""
        cond = self.conditioner(texts=texts, labels=labels, batch_size=latents.shape[0], train=True, generator=generator)
        cond = cond.to(latents.device)
        return self.objective(lambda z, t: self.unet(z, t, **cond.unet_kwargs()), latents, generator)

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
        **sampler_opts,
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1]. B = len(texts) or len(labels) or num_samples.

        The noise is drawn from one generator seeded with `seed`, so the same seed and arguments
        give the same images."""
        if labels is not None and not isinstance(labels, torch.Tensor):
            labels = torch.tensor(labels, dtype=torch.long)
        n = len(texts) if texts is not None else (labels.shape[0] if labels is not None else num_samples)
        if not n:
            raise LdmkitError("nothing to sample: give prompts, labels or a number of samples")
        device = next(self.unet.parameters()).device
        cond = self.conditioner(texts=texts, labels=labels, batch_size=n).to(device)
        fn = self.model_fn(cond)
        if guidance != 1.0:
            uncond = self.conditioner.uncond(n).to(device)
            both = cat_conds(uncond, cond)
            kwargs = both.unet_kwargs()

            def batched(z_t, t):
                # One doubled batch instead of two calls: [∅; c] → ε_∅ + w (ε_c − ε_∅) (Ho & Salimans, 2022, eq. 6)
                out = self.unet(torch.cat([z_t, z_t]), torch.cat([t, t]), **kwargs)
                e_u, e_c = out.chunk(2)
                return classifier_free_guidance(lambda *_: e_c, lambda *_: e_u, guidance)(z_t, t)

            fn = batched
        denoiser = Denoiser(fn, self.schedule, self.config.diffusion.prediction_type)
        g = torch.Generator(device="cpu")
        if seed is not None:
            g.manual_seed(seed)
        z = torch.randn((n, *self.latent_shape), generator=g).to(device)
        d = self.config.diffusion
        timesteps = make_timesteps(self.schedule, steps, d.timestep_spacing, d.steps_offset)
        z0 = get_sampler(sampler)(denoiser, z, timesteps, generator=g, callback=callback, **sampler_opts)
        return z0 if return_latents else self.decode(z0)


def _build(config: LatentDiffusionConfig, meta: dict) -> LatentDiffusion:
    return LatentDiffusion(config)


register_kind("latent_diffusion", LatentDiffusionConfig, _build)
