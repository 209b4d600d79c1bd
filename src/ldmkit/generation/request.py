"""GenerationRequest: everything one call to `generate` needs, as one typed object.

Every front end (`ldmkit sample`, Python, `ldmkit serve`, evaluate, the study, the trainers' sample grids)
builds one of these and calls `ldmkit.generation.generate`; validation against the model lives in
`GenerationRequest.check`, the seed-per-batch rule and the PNG parameters come from here, nowhere else.

Field names follow the A1111 web UI where it has one (its API is what clients speak), with ldmkit's own
names where A1111's mislead: `spacing` is the name of a noise-level spacing ("karras", "exponential"),
not a tensor of sigmas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from ldmkit.conditioning.conditioner import AESTHETIC_DEFAULTS
from ldmkit.errors import LdmkitError
from ldmkit.imageio import convert_channels

UPSCALERS = ("latent", "latent-nearest", "bicubic")
RESIZE_MODES = {0: "resize", 1: "crop and resize", 2: "resize and fill"}


def granularity(model) -> int:
    """g = f · 2^(levels − 1): the autoencoder divides a side by f, the U-Net halves it levels − 1 times,
    and every level's skip must meet its upsampled twin, so a side must be a multiple of g (SD 1.5: 8·8 = 64
    in the U-Net's eyes; A1111 and diffusers take multiples of 8 and let the U-Net's upsampling pad)."""
    return model.config.autoencoder.downsample_factor * 2 ** (len(model.config.unet.channel_mult) - 1)


def check_side(name: str, value: int, g: int) -> None:
    """Refuse a side that is not a positive multiple of the granularity g, naming the nearest valid sizes.
    ldmkit refuses rather than rounds down as A1111 does: an image of another size than asked for is a
    surprise, and the caller can pick one of the two sizes named."""
    if not isinstance(value, int) or isinstance(value, bool) or value < g or value % g:
        if not isinstance(value, int) or isinstance(value, bool):
            raise LdmkitError(f"{name} must be a whole number of pixels, a multiple of {g}; got {value!r}")
        lo, hi = value // g * g, (value // g + 1) * g
        near = f"{lo} or {hi}" if lo >= g else f"{hi}"
        raise LdmkitError(f"{name} {value} is not a multiple of {g}, this model's granularity (autoencoder factor "
                          f"× 2^(U-Net levels − 1)): use {near}")


def as_batch(image, channels: int, n: int, name: str) -> torch.Tensor:
    """An image-like input (init image, mask, control map) → (n, channels, H, W) at its own size, converting
    channels that can be converted (`convert_channels`) and refusing the rest with one LdmkitError naming `name`."""
    want = f"(1 or {n}, {channels}, H, W)"
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        got = image.dtype if isinstance(image, torch.Tensor) else type(image).__name__
        raise LdmkitError(f"{name} must be a float tensor {want}, got {got}")
    if image.ndim == 3:
        image = image[None]  # (1, C, H, W)
    if image.ndim != 4 or image.shape[0] not in (1, n):
        raise LdmkitError(f"{name} must be {want} (or a batch of 1), got {tuple(image.shape)}")
    conv = convert_channels(image.expand(n, -1, -1, -1), channels)
    if conv is None:
        raise LdmkitError(f"{name} has {image.shape[1]} channels; expected {want}")
    return conv


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

    def target(self, height: int, width: int, g: int) -> tuple[int, int]:
        """The second pass's (height, width): A1111's `hr_resize_x/y` (one of them 0: from the aspect ratio)
        or `hr_scale` × the first pass's size, rounded down to a multiple of g."""
        if self.resize_x or self.resize_y:
            w = self.resize_x or self.resize_y * width / height
            h = self.resize_y or self.resize_x * height / width
        else:
            h, w = height * self.scale, width * self.scale
        return int(h) // g * g, int(w) // g * g

    def check(self, height: int, width: int, g: int) -> None:
        if self.upscaler not in UPSCALERS:
            raise LdmkitError(f"unknown hires upscaler {self.upscaler!r}; choose one of {', '.join(UPSCALERS)}")
        if not 0.0 <= self.denoising_strength <= 1.0:
            raise LdmkitError(f"hires denoising strength must be in [0, 1], got {self.denoising_strength}")
        if self.second_pass_steps < 0 or self.resize_x < 0 or self.resize_y < 0 or self.scale <= 0:
            raise LdmkitError("hires scale must be > 0, its steps and resize_x/resize_y ≥ 0")
        h, w = self.target(height, width, g)
        if h < g or w < g:
            raise LdmkitError(f"the hires pass's size {w}x{h} is under this model's granularity {g}; raise hires scale")


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
    # SDXL's micro-conditioning (Podell et al. 2023, §2.2), named as diffusers' StableDiffusionXL(Img2Img)Pipeline:
    # (height, width) and (top, left) in pixels; None: original = target = each pass's size, crop (0, 0), and each
    # negative_* (the unconditional branch's) as its positive. The refiner takes aesthetic scores, no target size.
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None  # refiner: None = 6.0
    negative_aesthetic_score: float | None = None  # refiner: None = 2.5
    # ldmkit's own additions
    num_images: int | None = None  # None: one per prompt/label in a list, else batch_size · n_iter; the last batch may be short
    sampler_options: dict = field(default_factory=dict)  # extra keywords for the sampler (e.g. final_alpha_cumprod)
    model_name: str | None = None  # for the PNG parameters only ("Model: …", "Model hash: …")
    model_hash: str | None = None

    # --- derived values ------------------------------------------------------------------------------
    def size(self, model) -> tuple[int, int]:
        """(height, width) of the first pass: the request's, the model's own size where not given."""
        s = model.config.image_size
        return (self.height or s, self.width or s)

    def count(self) -> int:
        """How many images: `num_images`, else the length of a list of prompts or labels (one each), else
        batch_size · n_iter."""
        if self.num_images is not None:
            return self.num_images
        for v in (self.prompt, self.labels):
            if isinstance(v, (list, tuple)) and len(v) > 1:
                return len(v)
        return self.batch_size * self.n_iter

    def batches(self, seed: int) -> list[tuple[int, int, int]]:
        """(first, end, seed) of every batch: one generator per batch, seeded seed + k · batch_size
        (the first image's index), so a batch's images never depend on how many batches follow."""
        n, b = self.count(), self.batch_size
        return [(i, min(n, i + b), seed + i) for i in range(0, n, b)]

    def per_image(self, value, n: int) -> list | None:
        """A str/int or a list of one → n copies; a list of n → itself (`check` refused other lengths)."""
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return list(value) * n if len(value) == 1 else list(value)
        return [value] * n

    def micro_conditions(self) -> tuple[dict, dict]:
        """Keyword arguments of `Conditioner.micro_values` for the conditional and the unconditional branch
        (diffusers' StableDiffusionXLImg2ImgPipeline defaults; a negative_* left out is its positive)."""
        pos = {"original": self.original_size, "crop": self.crops_coords_top_left, "target": self.target_size,
               "aesthetic": self.aesthetic_score}
        neg = {"original": self.negative_original_size, "crop": self.negative_crops_coords_top_left,
               "target": self.negative_target_size,
               "aesthetic": AESTHETIC_DEFAULTS[1] if self.negative_aesthetic_score is None else self.negative_aesthetic_score}
        return pos, {k: pos[k] if v is None else v for k, v in neg.items()}

    def _check_micro(self, model) -> None:
        """SDXL micro-conditions: pairs of whole pixels, only on a model that takes them (a refiner: no target size;
        a base model: no aesthetic score)."""
        fields = model.conditioner.micro_fields
        given = [f.name for f in MICRO_REQUEST_FIELDS if getattr(self, f.name) is not None]
        if given and not fields:
            raise LdmkitError(f"{given[0]}: this model has no SDXL micro-conditioning; leave it out")
        for name in given:
            v = getattr(self, name)
            if "aesthetic" in name:
                if "aesthetic score" not in fields:
                    raise LdmkitError(f"{name}: only an SDXL refiner (aesthetic-score conditioning) takes it; leave it out")
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                    raise LdmkitError(f"{name} must be a number (LAION's aesthetic scale, 0-10), got {v!r}")
                continue
            if "target" in name and "target height" not in fields:
                raise LdmkitError(f"{name}: an SDXL refiner takes no target size (its fifth value is the aesthetic "
                                  "score); leave it out")
            low = 0 if "crops" in name else 1
            if (not isinstance(v, (tuple, list)) or len(v) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= low for x in v)):
                what = "(top, left), whole pixels ≥ 0" if low == 0 else "(height, width), whole pixels ≥ 1"
                raise LdmkitError(f"{name} must be {what}; got {v!r}")

    # --- validation: every refusal a request can earn, before any work -------------------------------
    def check(self, model, control=None) -> None:
        """Refuse, in one LdmkitError line, whatever this model (and `control`) cannot do with this request."""
        cfg = model.config
        g = granularity(model)
        if self.steps < 1 or self.batch_size < 1 or self.n_iter < 1 or (self.num_images is not None and self.num_images < 1):
            raise LdmkitError("steps, batch size, iterations and number of images must be at least 1")
        if not 0.0 <= self.strength <= 1.0:
            raise LdmkitError(f"strength must be in [0, 1], got {self.strength}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise LdmkitError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}")
        self._check_micro(model)
        if self.resize_mode not in RESIZE_MODES:
            raise LdmkitError(f"resize mode must be 0 (resize), 1 (crop and resize) or 2 (resize and fill), "
                              f"got {self.resize_mode}")
        if self.height is not None:
            check_side("height", self.height, g)
        if self.width is not None:
            check_side("width", self.width, g)
        height, width = self.size(model)
        if self.hires is not None:
            self.hires.check(height, width, g)
        n = self.count()
        for name, v in (("prompts", self.prompt), ("negative prompts", self.negative_prompt), ("labels", self.labels)):
            if isinstance(v, (list, tuple)) and len(v) not in (1, n):
                raise LdmkitError(f"got {len(v)} {name} for {n} images; give one, or one per image")
        text = cfg.conditioner.text_encoder or model.conditioner.text_encoder is not None  # named, or handed in
        if self.prompt is not None and not text:
            raise LdmkitError("this model has no text conditioning; train it with a text encoder to use prompts")
        if self.negative_prompt is not None:
            if not text:
                raise LdmkitError("a negative prompt needs a text-conditioned model; this one has no text route")
            if model.config.unet.time_cond_proj_dim:
                raise LdmkitError("this model takes its guidance scale as an input (a w-embedded student) and has no "
                                  "unconditional branch for a negative prompt; leave the negative prompt out")
        cc = cfg.concat
        classes = cfg.conditioner.num_classes or (cc.num_labels if cc is not None and cc.reads_labels else 0)
        if self.labels is not None:
            if not classes and any(lab >= 0 for lab in self.labels):
                raise LdmkitError("this model has no class conditioning; train it with num_classes > 0 to use labels")
            bad = [lab for lab in self.labels if not -1 <= lab < classes]
            if bad:
                raise LdmkitError(f"class labels must be in 0..{classes - 1} (or -1 for none), got {bad}")
        if self.mask is not None and (cc is None or not cc.reads_mask):
            raise LdmkitError("this model has no inpainting route (it was trained without concat.kind=inpaint); "
                              "it cannot take a mask")
        if cc is not None:
            cc.check_inputs(self.init_image, self.mask, self.labels)
        image = as_batch(self.init_image, 3, n, "init image") if self.init_image is not None else None
        mask = as_batch(self.mask, 1, n, "mask") if self.mask is not None else None
        if image is not None and mask is not None:
            (ih, iw), (mh, mw) = image.shape[-2:], mask.shape[-2:]
            if abs(ih * mw - iw * mh) > 0.01 * ih * mw:  # a mask lies on its image: the same aspect ratio
                raise LdmkitError(f"the mask is {mw}x{mh} but the init image {iw}x{ih}: give a mask of the image's "
                                  "aspect ratio")
        maps = self.control_image if isinstance(self.control_image, (list, tuple)) else [self.control_image]
        for m in maps:
            if isinstance(m, torch.Tensor) and m.ndim == 4 and m.shape[0] not in (1, n):
                raise LdmkitError(f"the control image has a batch of {m.shape[0]} for {n} images; give 1, or one per image")
        if control is not None and self.control_image is None:
            raise LdmkitError("a ControlNet/adapter was given without a control image")
        if control is None and self.control_image is not None:
            raise LdmkitError("a control image was given, but no ControlNet or adapter to read it")


MICRO_REQUEST_FIELDS = [f for f in fields(GenerationRequest) if f.name in (
    "original_size", "crops_coords_top_left", "target_size", "negative_original_size", "negative_crops_coords_top_left",
    "negative_target_size", "aesthetic_score", "negative_aesthetic_score")]


def micro_option(text: str) -> tuple[str, tuple[int, int] | float]:
    """`ldmkit sample --micro NAME=VALUE`: a micro-conditioning field of `GenerationRequest` and its value, sizes
    written HxW (`original_size=1024x1024`), crops TOPxLEFT (`crops_coords_top_left=0x0`), scores as numbers."""
    names = [f.name for f in MICRO_REQUEST_FIELDS]
    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in names:
        raise LdmkitError(f"--micro {text!r}: write NAME=VALUE with NAME one of {', '.join(names)}")
    try:
        if "aesthetic" in name:
            return name, float(value)
        a, b = value.lower().split("x")
        return name, (int(a), int(b))
    except ValueError:
        form = "a number" if "aesthetic" in name else "TOPxLEFT, e.g. 0x0" if "crops" in name else "HxW, e.g. 1024x1024"
        raise LdmkitError(f"--micro {text!r}: {name} takes {form}") from None
