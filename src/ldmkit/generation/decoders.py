"""Latents → images for `generate(decoder=…)`: the model's own first stage (`model.decode`) or a tiny
autoencoder (TAESD, `ldmkit.autoencoder.tiny`) decoding the same latents at a fraction of the cost.

Both take the diffusion model's latents z' (what the sampler returns) and give images in [-1, 1]:

    full:  D(z'/scale + shift)                          LatentDiffusion.decode, the first stage's own scale/shift
    tiny:  D_tiny(z'/scale_tiny + shift_tiny)           TinyAutoencoder.decode_latents (diffusers: vae.decode(z' /
                                                        scaling_factor + shift_factor)); TAESD for SD: (1, 0)

A tiny decoder is a callable handed to the request path; the model is not changed, so one loaded model
serves full and tiny decodes side by side (the server's previews and its final images).
"""

from __future__ import annotations

from typing import Callable

import torch

from ldmkit.autoencoder.tiny import TinyAutoencoder
from ldmkit.errors import LdmkitError

Decoder = Callable[[torch.Tensor], torch.Tensor]


def tiny_decoder(model, tiny: TinyAutoencoder, name: str = "the tiny decoder") -> Decoder:
    """z' (B, c, h, w) → images (B, 3, h·f, w·f) in [-1, 1] by `tiny`, after checking that it decodes the latents
    of `model` (a LatentDiffusion): the same latent channels, downsampling factor and image channels. `name`
    says where it came from in the one-line refusal (e.g. "--tiny-decoder DIR")."""
    if not isinstance(tiny, TinyAutoencoder):
        raise LdmkitError(f"{name} holds a {type(tiny).__name__}, not a tiny autoencoder; give a diffusers "
                          "AutoencoderTiny folder (TAESD) or a folder from `ldmkit distill-decoder`")
    ae, t = model.config.autoencoder, tiny.config
    if t.latent_channels != ae.latent_channels:
        raise LdmkitError(f"{name} decodes {t.latent_channels}-channel latents but this model's have "
                          f"{ae.latent_channels}; use a tiny decoder made for this model's first stage")
    if t.downsample_factor != ae.downsample_factor or t.in_channels != ae.in_channels:
        raise LdmkitError(f"{name} makes {t.in_channels}-channel images {t.downsample_factor}x the latent size but this "
                          f"model's first stage makes {ae.in_channels}-channel images {ae.downsample_factor}x; use a "
                          "tiny decoder made for this model's first stage")
    param = next(tiny.parameters())

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        return tiny.decode_latents(z.to(param.device, param.dtype)).clamp(-1, 1).to(z.device)

    return decode
