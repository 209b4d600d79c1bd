"""GenerationRequest: everything one call to `generate` needs, as one typed object.

Every front end (`ldmkit sample`, Python, `ldmkit serve`, evaluate, the study, the trainers' sample grids)
builds one of these and calls `ldmkit.generation.generate`; validation against the model lives in
`GenerationRequest.check`, the seed-per-batch rule and the PNG parameters come from here, nowhere else.

Field names follow the A1111 web UI where it has one (its API is what clients speak), with ldmkit's own
names where A1111's mislead: `spacing` is the name of a noise-level spacing ("karras", "exponential"),
not a tensor of sigmas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class HiresPass:
    """A1111's hires fix: generate at the request's size, upscale (in latent space or in pixels), then an
    img2img pass of `second_pass_steps` (0: the request's steps) at `denoising_strength` at the larger size.
    The target is `resize_x` × `resize_y` when either is set (the other from the aspect ratio), else
    `scale` × the request's size; both rounded down to the model's granularity."""

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str = "latent"  # "latent" (bilinear on latents, A1111's "Latent"), "latent-nearest", "bicubic" (pixels)
    second_pass_steps: int = 0
    denoising_strength: float = 0.7


@dataclass
class GenerationRequest:
    """One generation: a batch of `batch_size` images per iteration, `n_iter` iterations."""

    prompt: str | list[str] | None = None  # A1111 syntax: emphasis, BREAK, <lora:name:w>, embedding names
    negative_prompt: str | list[str] | None = None
    labels: list[int] | None = None  # class-conditioned models
    height: int | None = None  # None: the model's own size
    width: int | None = None
    seed: int | None = 0  # None: a random seed, drawn once and reported in the parameters
    steps: int = 25
    sampler: str = "dpmpp_2m"
    spacing: str | None = None  # noise-level spacing ("karras", "exponential"); None: the model's timesteps
    eta: float | None = None  # ancestral / DDIM noise (None: the sampler's default)
    guidance: float = 1.0
    guidance_rescale: float = 0.0
    batch_size: int = 1
    n_iter: int = 1
    init_image: torch.Tensor | None = None  # (1 or B, 3, H, W) in [-1, 1], any size: fitted by `resize_mode`
    mask: torch.Tensor | None = None  # (1 or B, 1, H, W) in [0, 1], 1 = repaint
    strength: float = 1.0  # img2img denoising strength
    resize_mode: int = 0  # A1111: 0 resize, 1 crop and resize, 2 resize and fill
    keep_known: bool = True  # inpainting: pin the latent cells the mask does not touch
    overlay: bool = True  # inpainting: paste the kept pixels back
    control_image: torch.Tensor | list[torch.Tensor] | None = None  # (1 or B, C, H, W) in [0, 1]
    control_scale: float | list[float] | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)  # (name or path, weight), besides <lora:> tags
    hires: HiresPass | None = None
