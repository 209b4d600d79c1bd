"""The keywords of the old `LatentDiffusion.sample` as one call: a request built for `generate`.

Kept for programs and tests written against `ldm.sample(texts=…, seed=…)`; new code builds a
`GenerationRequest` and calls `generate`, which also returns the seeds and the PNG parameters.
"""

from __future__ import annotations

from typing import Callable

import torch

from ldmkit.errors import LdmkitError
from ldmkit.generation.generate import generate
from ldmkit.generation.request import GenerationRequest


def sample(model, texts: list[str] | None = None, labels: torch.Tensor | list[int] | None = None,
           num_samples: int | None = None, steps: int = 50, sampler: str = "ddim", guidance: float = 1.0,
           seed: int | None = 0, callback: Callable | None = None, return_latents: bool = False,
           init_image: torch.Tensor | None = None, mask: torch.Tensor | None = None, strength: float = 1.0,
           control=None, control_image=None, control_scale=None, keep_known: bool = True, overlay: bool = True,
           sigmas: str | None = None, negative_prompt: str | list[str] | None = None, guidance_rescale: float = 0.0,
           height: int | None = None, width: int | None = None, **sampler_opts) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] (or their latents), B = len(texts) or len(labels) or num_samples (or
    the init image's batch), drawn as one batch from one generator seeded with `seed`. `sigmas` is the
    request's `spacing`; other keywords go to the sampler."""
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    n = len(texts) if texts is not None else (len(labels) if labels is not None else num_samples)
    if not n and isinstance(init_image, torch.Tensor) and init_image.ndim == 4:
        n = init_image.shape[0]
    if not n:
        raise LdmkitError("nothing to sample: give prompts, labels or a number of samples")
    eta = sampler_opts.pop("eta", None)
    request = GenerationRequest(
        prompt=list(texts) if texts is not None else None, negative_prompt=negative_prompt, labels=labels,
        height=height, width=width, seed=seed, steps=steps, sampler=sampler, spacing=sigmas, eta=eta,
        guidance=guidance, guidance_rescale=guidance_rescale, batch_size=n, num_images=n, init_image=init_image,
        mask=mask, strength=strength, keep_known=keep_known, overlay=overlay, control_image=control_image,
        control_scale=control_scale, sampler_options=sampler_opts)
    out = generate(model, request, callback, control=control, decode=not return_latents)
    return out.latents if return_latents else out.images
