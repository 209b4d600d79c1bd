"""Stable Diffusion architectures as ldmkit configs (STYLE.md #3: named factory functions in a dict).

VAE presets: every SD-family first stage is the same network (Rombach et al. 2022, the f=8 KL
autoencoder "KL-f8": widths 128·(1, 2, 4, 4), two ResBlocks per encoder level, one middle
attention); they differ in latent channels and in the latent normalisation z' = (z - shift)·scale
measured on their training data:

| preset | latent ch. | scale   | shift  | quant convs | used by                      |
| ------ | ---------- | ------- | ------ | ----------- | ---------------------------- |
| sd     | 4          | 0.18215 | 0      | yes         | SD 1.x, SD 2.x               |
| sdxl   | 4          | 0.13025 | 0      | yes         | SDXL                         |
| sd3    | 16         | 1.5305  | 0.0609 | no          | SD 3 / 3.5                   |
| flux   | 16         | 0.3611  | 0.1159 | no          | FLUX.1                       |

Full `LatentDiffusionConfig` presets (the U-Net ones are `ldmkit.unet.UNET_PRESETS`):

| preset   | U-Net | context         | prediction | image | timesteps                      |
| -------- | ----- | --------------- | ---------- | ----- | ------------------------------ |
| sd1      | sd1   | CLIP L/14, 768  | ε          | 512   | scaled_linear 0.00085…0.012, leading, offset 1 |
| sd2      | sd2   | OpenCLIP H, 1024| v          | 768   | same                           |
| sd2_base | sd2   | OpenCLIP H, 1024| ε          | 512   | same                           |
| sdxl     | sdxl  | CLIP L + OpenCLIP bigG, 768 + 1280; pooled bigG + size/crop on the vector route | ε | 1024 | same |

The text encoder is not part of the architecture: pass `text_encoder=` (a local CLIP folder, e.g.
a diffusers pipeline's `text_encoder/`), since nothing is downloaded. Building these configs costs
nothing; instantiating the models allocates ~1 B parameters (use the meta device to inspect them).
"""

from __future__ import annotations

from collections.abc import Callable

from ldmkit.autoencoder import AutoencoderConfig
from ldmkit.conditioning.conditioner import ConditionerConfig
from ldmkit.unet import unet_sd1, unet_sd2, unet_sdxl


def vae_sd(**kw) -> AutoencoderConfig:
    """SD 1.x / 2.x KL-f8 autoencoder: 83.7M parameters, 4 latent channels, scale 0.18215."""
    base = dict(
        in_channels=3, latent_channels=4, base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
        mid_attention=True, norm_groups=32, variational=True, use_quant_conv=True, scaling_factor=0.18215,
        shift_factor=0.0,
    )  # fmt: skip
    return AutoencoderConfig(**(base | kw))


def vae_sdxl(**kw) -> AutoencoderConfig:
    """SDXL's retrained KL-f8 autoencoder: same network, scale 0.13025."""
    return vae_sd(**({"scaling_factor": 0.13025} | kw))


def vae_sd3(**kw) -> AutoencoderConfig:
    """SD 3's 16-channel KL-f8 autoencoder without quant convs: scale 1.5305, shift 0.0609."""
    return vae_sd(**({"latent_channels": 16, "use_quant_conv": False, "scaling_factor": 1.5305, "shift_factor": 0.0609} | kw))


def vae_flux(**kw) -> AutoencoderConfig:
    """FLUX.1's 16-channel KL-f8 autoencoder without quant convs: scale 0.3611, shift 0.1159."""
    return vae_sd(**({"latent_channels": 16, "use_quant_conv": False, "scaling_factor": 0.3611, "shift_factor": 0.1159} | kw))


VAE_PRESETS: dict[str, Callable[..., AutoencoderConfig]] = {
    "sd": vae_sd,
    "sdxl": vae_sdxl,
    "sd3": vae_sd3,
    "flux": vae_flux,
}


def _sd(unet, prediction_type: str, image_size: int, text_encoder: str | None, kw: dict, vae=None, conditioner=None):
    from ldmkit.pipeline import DiffusionConfig, LatentDiffusionConfig  # pipeline imports heavy modules

    # SD's training schedule (Rombach et al. 2022, App. E): 1000 steps of β with sqrt(β) linear in
    # 0.00085 … 0.012; its samplers use "leading" spacing shifted by 1 (981, 961, …, 1 for 50 steps).
    diffusion = DiffusionConfig(
        schedule="scaled_linear", num_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1,
    )  # fmt: skip
    base = dict(
        autoencoder=vae or vae_sd(), unet=unet, conditioner=conditioner or ConditionerConfig(text_encoder=text_encoder),
        diffusion=diffusion, image_size=image_size,
    )  # fmt: skip
    return LatentDiffusionConfig(**(base | kw))


def sd1(text_encoder: str | None = None, **kw):
    """Stable Diffusion v1.x: CLIP ViT-L/14 context (768), ε-prediction, 512 px."""
    return _sd(unet_sd1(zero_init=False), "eps", 512, text_encoder, kw)


def sd2(text_encoder: str | None = None, **kw):
    """Stable Diffusion v2.x (768-v): OpenCLIP ViT-H context (1024), v-prediction, 768 px."""
    return _sd(unet_sd2(zero_init=False), "v", 768, text_encoder, kw)


def sd2_base(text_encoder: str | None = None, **kw):
    """Stable Diffusion v2.x base: as sd2 but ε-prediction at 512 px."""
    return _sd(unet_sd2(zero_init=False), "eps", 512, text_encoder, kw)


def sdxl(text_encoder: str | None = None, **kw):
    """SDXL base (Podell et al. 2023): the sdxl U-Net (2.6B), the SDXL VAE (scale 0.13025), SD's training schedule,
    ε-prediction at 1024 px; the text is an SDXL pipeline folder's two encoders (`text_encoder`: the folder that
    holds text_encoder/ … tokenizer_2/), their pooled bigG embedding and the size/crop values on the vector route,
    and zeros as the unconditional text without a negative prompt (force_zeros_for_empty_prompt)."""
    conditioner = ConditionerConfig(text_encoder=text_encoder, pooled_text=True, micro_conditioning=True, zero_uncond=True)
    return _sd(unet_sdxl(zero_init=False), "eps", 1024, text_encoder, kw, vae=vae_sdxl(), conditioner=conditioner)


SD_PRESETS: dict[str, Callable[..., object]] = {
    "sd1": sd1,
    "sd2": sd2,
    "sd2_base": sd2_base,
    "sdxl": sdxl,
}
