"""Requests of the A1111 web UI's API (`modules/api/models.py` there), checked before they are queued.

The field names, defaults and meanings are A1111's, so its clients work unchanged. Two checks run
before a request is queued: the request models below (types and ranges, FastAPI's 422 naming the field)
and `resolve`, against the model that will run it (its size, routes, samplers; images decoded and
checked) — a `FieldProblem` is a 422 naming the field too. Unknown fields are ignored as A1111 does; a
known A1111 field that ldmkit cannot honour is listed in the response's `info` ("not_honoured"), never
silently dropped.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ldmkit.diffusion.samplers import SAMPLERS
from ldmkit.errors import LdmkitError
from ldmkit.generation.request import HiresPass
from ldmkit.sample import A1111_SAMPLERS

MAX_IMAGE_BYTES = 24 << 20  # per base64 image: a 4096² PNG photo fits, a runaway upload does not
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGES_PER_REQUEST = 64  # batch_size × n_iter
MAX_SIDE_FACTOR = 3  # width, height and the hires target: at most 3 × the model's training size (SD 1.5: 1536 px)
# Attention's cost grows with the square of the latent cells, so the cap follows the model: 3× its size covers
# A1111's common hires targets (768×512 × 2 = 1536×1024 on SD 1.5), while a client's default 512 px sent to a
# small 32-px model (96 px at most) is refused before any work instead of running 256 times the cells.


class FieldProblem(Exception):
    """A request field the model cannot take: a 422 whose detail names `field` (as FastAPI's own)."""

    def __init__(self, field: str, msg: str):
        super().__init__(f"{field}: {msg}")
        self.field, self.msg = field, msg

    def detail(self) -> list[dict]:
        return [{"loc": ["body", *self.field.split(".")], "msg": self.msg, "type": "value_error"}]


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img. The fields ldmkit reads; any other field is accepted and ignored, or
    reported in `info.not_honoured` when it asks for something ldmkit does not do (`NOT_HONOURED`)."""

    model_config = ConfigDict(extra="allow")

    prompt: str | None = Field("", description="what to draw (text-conditioned models)")
    negative_prompt: str | None = Field("", description="what to steer away from: the unconditional branch of guidance")
    seed: int | None = Field(-1, ge=-1, le=2**63 - 1, description="-1: a random seed; one seed draws the whole batch")
    sampler_name: str | None = Field(None, description="A1111 name (Euler a, DPM++ 2M, DPM++ 2M Karras...) or ldmkit's")
    sampler_index: str | None = Field(None, description="older name of sampler_name, used when that is absent")
    scheduler: str | None = Field(None, description="automatic / uniform (the model's spacing), karras, exponential")
    batch_size: int | None = Field(1, ge=1, le=16)
    n_iter: int | None = Field(1, ge=1, le=16, description="batches, each with seed + batch index × batch_size")
    steps: int | None = Field(50, ge=1, le=150)
    cfg_scale: float | None = Field(7.0, ge=0, le=30, allow_inf_nan=False, description="guidance scale (1 = off)")
    width: int | None = Field(None, ge=8, le=4096, description="a multiple of the model's granularity, at most "
                              f"{MAX_SIDE_FACTOR} × its size (default: the model's size)")
    height: int | None = Field(None, ge=8, le=4096, description="as width")
    eta: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="DDIM's η (other samplers ignore it)")
    send_images: bool | None = True
    enable_hr: bool | None = Field(False, description="hires fix: generate, upscale, then an img2img pass at the larger size")
    hr_scale: float | None = Field(2.0, ge=1, le=8, allow_inf_nan=False, description="upscale factor (when no hr_resize)")
    hr_upscaler: str | None = Field(None, description="Latent (default), Latent (nearest); any pixel upscaler runs as bicubic")
    hr_second_pass_steps: int | None = Field(0, ge=0, le=150, description="0: the request's steps")
    hr_resize_x: int | None = Field(0, ge=0, le=4096, description="target width (0: from hr_resize_y or hr_scale)")
    hr_resize_y: int | None = Field(0, ge=0, le=4096, description="target height (0: from hr_resize_x or hr_scale)")
    denoising_strength: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                             description="hires pass strength (default 0.7); img2img's strength")
    # SDXL micro-conditioning: not in A1111's API; diffusers' StableDiffusionXL(Img2Img)Pipeline names (docs/sdxl.md)
    original_size: list[int] | None = Field(None, min_length=2, max_length=2, description="SDXL: [height, width] "
                                            "the image claims to come from (default: the request's size)")
    crops_coords_top_left: list[int] | None = Field(None, min_length=2, max_length=2, description="SDXL: [top, left]")
    target_size: list[int] | None = Field(None, min_length=2, max_length=2, description="SDXL base: [height, width]")
    negative_original_size: list[int] | None = Field(None, min_length=2, max_length=2, description="default: original_size")
    negative_crops_coords_top_left: list[int] | None = Field(None, min_length=2, max_length=2)
    negative_target_size: list[int] | None = Field(None, min_length=2, max_length=2)
    aesthetic_score: float | None = Field(None, allow_inf_nan=False, description="SDXL refiner (default 6)")
    negative_aesthetic_score: float | None = Field(None, allow_inf_nan=False, description="SDXL refiner (default 2.5)")
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict,
                                                    description='"controlnet": {"args": [{"image": b64, "weight": 1}]}')
    override_settings: dict[str, Any] | None = Field(default_factory=dict,
                                                     description="sd_model_checkpoint runs this request on that model")


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: txt2img's fields plus the image, the mask and how much to change."""

    init_images: list[str] | None = Field(None, description="base64 images (a data: URL prefix is accepted); the first is used")
    mask: str | None = Field(None, description="base64 mask image, white = repaint (inpainting models)")
    denoising_strength: float | None = Field(0.75, ge=0, le=1, allow_inf_nan=False)
    resize_mode: int | None = Field(0, ge=0, le=3, description="0 resize (stretch), 1 crop and resize, 2 resize and fill; "
                                    "3 (latent resize) runs as 0")
    inpainting_mask_invert: int | None = Field(0, ge=0, le=1, description="1: black = repaint")


MICRO_NAMES = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
               "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score", "negative_aesthetic_score")

# A1111 fields ldmkit does not do, with the value that asks for nothing (anything else is reported)
NOT_HONOURED = {
    "restore_faces": False, "tiling": False, "subseed_strength": 0, "styles": [],
    "script_name": None, "s_churn": 0, "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0),
    "initial_noise_multiplier": 1.0, "save_images": False, "include_init_images": False, "inpaint_full_res": (False, 0),
    "refiner_checkpoint": None, "image_cfg_scale": None,
}


def sampler_names() -> list[dict]:
    """GET /sdapi/v1/samplers: A1111's SamplerItem per ldmkit sampler, its ldmkit name an alias."""
    return [{"name": A1111_SAMPLERS.get(s, s), "aliases": [s, "k_" + s], "options": {}} for s in SAMPLERS]


# A1111's API model defaults sampler_index to "Euler" (modules/api/models.py), deterministic; "Euler a" is
# only its UI's default. Used when neither the request nor the checkpoint's meta.sampling names a sampler.
DEFAULT_SAMPLER = "euler"
A1111_STEPS, A1111_CFG = 50, 7.0  # StableDiffusionProcessing's defaults, when the checkpoint says nothing


def find_sampler(name: str | None) -> tuple[str, str | None] | None:
    """(ldmkit sampler, σ spacing) for an A1111 or ldmkit sampler name, case-insensitive; older A1111
    names carry the schedule ("DPM++ 2M Karras"). None: unknown. No name: A1111's API default (Euler)."""
    if not name:
        return DEFAULT_SAMPLER, None
    key = name.strip().lower()
    sigmas = None
    for spacing in ("karras", "exponential"):
        if key.endswith(" " + spacing):
            key, sigmas = key[: -len(spacing) - 1].strip(), spacing
    for s in SAMPLERS:
        if key in (s, "k_" + s, A1111_SAMPLERS.get(s, s).lower()):
            return s, sigmas
    return None


SCHEDULERS = {"automatic": None, "uniform": None, "": None, "karras": "karras", "exponential": "exponential"}
# A1111 schedules that space steps evenly in timestep, close to the model's own spacing, which is used
NEAR_UNIFORM = ("normal", "simple", "sgm_uniform", "sgm uniform", "ddim")

# hr_upscaler → HiresPass.upscaler. A1111's latent modes are interpolations of the latents
# (shared.latent_upscale_modes: "Latent" bilinear, "Latent (nearest)"/"(nearest-exact)" nearest); every
# other name is a pixel upscaler (Lanczos, ESRGAN, SwinIR...), which ldmkit runs as bicubic in pixels.
LATENT_UPSCALERS = {"latent": "latent", "latent (antialiased)": "latent", "latent (bicubic)": "latent",
                    "latent (bicubic antialiased)": "latent", "latent (nearest)": "latent-nearest",
                    "latent (nearest-exact)": "latent-nearest"}
EXACT_PIXEL_UPSCALERS = ("none", "lanczos", "bicubic")  # close to bicubic: no note


@dataclass
class Generation:
    """A checked request, ready for the worker: every value resolved against its model."""

    entry: Any  # models.Entry: the request runs on this model even if the server switches meanwhile
    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    sampler: str
    sigmas: str | None
    guidance: float
    batch_size: int
    n_iter: int
    send_images: bool
    parameters: dict  # the request as understood (A1111 echoes it as `parameters`)
    width: int = 0  # pixels, a multiple of the model's granularity (resolve sets both)
    height: int = 0
    not_honoured: list[str] = field(default_factory=list)
    init_image: torch.Tensor | None = None  # (1, 3, height, width) in [-1, 1], fitted by resize_mode
    mask: torch.Tensor | None = None  # (1, 1, height, width) in {0, 1}
    strength: float | None = None
    resize_mode: int = 0  # A1111: 0 resize, 1 crop and resize, 2 resize and fill (images arrive fitted)
    control_image: torch.Tensor | None = None  # (1, C, height, width) in [0, 1]
    control_scale: float | None = None
    micro: dict = field(default_factory=dict)  # SDXL micro-conditioning: GenerationRequest's field → value
    eta: float | None = None
    hires: HiresPass | None = None  # A1111's hires fix (txt2img); its target is `hires_size`
    hires_size: tuple[int, int] | None = None  # (width, height) of the second pass

    @property
    def steps_per_batch(self) -> int:
        """Steps the sampler runs per batch (for progress): img2img keeps the last int(strength·steps) of them
        (diffusers' count), a hires pass adds its own steps (A1111 stretches the schedule so the second pass runs
        exactly `second_pass_steps or steps` of them; `generate` does the same)."""
        n = self.steps if self.init_image is None else max(1, int(self.strength * self.steps))
        if self.hires is not None:
            n += self.hires.second_pass_steps or self.steps
        return n


# --- sizes ------------------------------------------------------------------------------------------


def _nearest(v: int, g: int, top: int) -> str:
    """The valid sizes next to `v`: multiples of g in [g, top]."""
    lo, hi = max(g, v // g * g), v // g * g + g
    options = sorted({s for s in (lo, hi) if g <= s <= top and s != v})
    return " or ".join(map(str, options)) if options else str(min(max(g, lo), top))


def check_side(name: str, v: int, g: int, top: int, title: str) -> int:
    """`v` pixels for field `name`: a multiple of the granularity g, in [g, top]; else a FieldProblem naming
    the nearest valid sizes (A1111 rounds down silently; ldmkit says so instead)."""
    if v > top:
        raise FieldProblem(name, f"{v} px: at most {top} px for model {title} ({MAX_SIDE_FACTOR} × its size)")
    if v < g or v % g:
        raise FieldProblem(name, f"{v} px is not a multiple of {g}, the size step of model {title}; "
                                 f"nearest: {_nearest(v, g, top)}")
    return v


# --- images -----------------------------------------------------------------------------------------


def decode_image(data: Any, name: str, mask: bool = False):
    """A base64 image (raw, or a data: URL as browsers and A1111 clients send) → a PIL image, decoded whole;
    anything else is a FieldProblem naming `name`. A `mask` with varying transparency is its alpha channel
    (as the A1111 web UI reads one: painted strokes on a transparent layer)."""
    from PIL import Image, UnidentifiedImageError

    from ldmkit.imageio import to_rgb

    if not isinstance(data, str) or not data:
        raise FieldProblem(name, "expected a base64-encoded image")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise FieldProblem(name, f"image larger than {MAX_IMAGE_BYTES >> 20} MB")
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise FieldProblem(name, "not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise FieldProblem(name, f"{im.width}x{im.height} pixels, more than this server reads "
                                         f"({MAX_IMAGE_PIXELS:,}); downscale it")
            im.load()
            if mask and im.mode in ("RGBA", "LA", "PA", "P"):
                alpha = im.convert("RGBA").getchannel("A")
                if alpha.getextrema() != (255, 255):
                    return alpha.convert("RGB")
            return to_rgb(im)
    except FieldProblem:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise FieldProblem(name, "not an image (PNG, JPEG, WebP...) that can be decoded") from None


def to_tensor(img, size: int | tuple[int, int], channels: int, signed: bool, resize_mode: int = 0) -> torch.Tensor:
    """PIL image → (1, channels, height, width) for `size` = (width, height) (an int: square), fitted as
    A1111's `images.resize_image` fits: 0 resize (stretch), 1 crop and resize (cover, centre crop),
    2 resize and fill (fit inside, the gaps filled by stretching the edge rows/columns); bicubic for
    pictures, nearest for masks; [-1, 1] when `signed`, else [0, 1]."""
    from PIL import Image

    w, h = (size, size) if isinstance(size, int) else size
    img = img.convert("L") if channels == 1 else img.convert("RGB")
    resample = Image.BICUBIC if channels == 3 else Image.NEAREST
    pad = (0, 0, 0, 0)  # left, right, top, bottom
    if resize_mode in (1, 2) and img.width * h != img.height * w:
        scales = (w / img.width, h / img.height)
        s = max(scales) if resize_mode == 1 else min(scales)  # mode 1 covers the box, mode 2 fits inside it
        rw, rh = max(1, round(img.width * s)), max(1, round(img.height * s))
        img = img.resize((rw, rh), resample)
        if resize_mode == 1:
            left, top = (rw - w) // 2, (rh - h) // 2
            img = img.crop((left, top, left + w, top + h))
        else:
            pad = ((w - rw) // 2, w - rw - (w - rw) // 2, (h - rh) // 2, h - rh - (h - rh) // 2)
    elif img.size != (w, h):
        img = img.resize((w, h), resample)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).reshape(img.height, img.width, channels)
    x = x.permute(2, 0, 1)[None]  # (1, C, h', w') in [0, 1]
    if any(pad):
        x = torch.nn.functional.pad(x, pad, mode="replicate")  # (1, C, H, W): A1111 stretches the edge rows
    return x * 2 - 1 if signed else x


def _not_honoured(req: Txt2ImgRequest) -> list[str]:
    extra = req.model_extra or {}
    out = []
    for key, neutral in NOT_HONOURED.items():
        if key in extra and extra[key] is not None:
            ok = neutral if isinstance(neutral, tuple) else (neutral,)
            if extra[key] not in ok and not (isinstance(neutral, list) and not extra[key]):
                out.append(f"{key}: not supported by ldmkit")
    return out


def _control_unit(scripts: dict) -> tuple[str, dict] | None:
    """The first enabled unit of the A1111 ControlNet extension's `alwayson_scripts` entry ("controlnet" or
    "ControlNet"), as (its field path, the unit)."""
    for key, script in scripts.items():
        if key.lower() != "controlnet" or not isinstance(script, dict):
            continue
        args = script.get("args")
        for i, unit in enumerate(args if isinstance(args, list) else []):
            if isinstance(unit, dict) and unit.get("enabled", True) and (unit.get("image") or unit.get("input_image")):
                name = "image" if unit.get("image") else "input_image"
                return f"alwayson_scripts.{key}.args.{i}.{name}", unit
    return None


# A1111's extra-network tag (modules/extra_networks.py `re_extra_net`): <kind:arg1:arg2...>; kind "lora"
# (and "lyco", its older alias) names a LoRA and its weight (1 when left out)
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def _check_lora_tags(prompt: str, networks) -> None:
    """Every <lora:name[:w]> of the prompt names a file of --lora-dir and a weight in range, before the request is
    queued (generation reads the tags; a damaged file is found when it is read, also a 422 in one line)."""
    for kind, args in EXTRA_NETWORK.findall(prompt):
        if kind.lower() not in ("lora", "lyco"):
            continue
        tag = f"<{kind}:{args}>"
        if networks is None:
            raise FieldProblem("prompt", f"{tag}: this server has no LoRA folder; start it with --lora-dir DIR")
        name, _, rest = args.partition(":")
        weight = rest.split(":", 1)[0].strip()
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise FieldProblem("prompt", f"{tag}: the weight {weight!r} is not a number") from None
        if not math.isfinite(w) or abs(w) > networks.max_weight:
            raise FieldProblem("prompt", f"{tag}: the weight must be a number in "
                                         f"[-{networks.max_weight:g}, {networks.max_weight:g}]")
        try:
            networks.path(name.strip())
        except LdmkitError as e:
            raise FieldProblem("prompt", f"{tag}: {e}") from None


def _requested(req: BaseModel, name: str) -> Any:
    """A field's value when the client sent it (not None), else None: defaults that the checkpoint may set."""
    return getattr(req, name) if name in req.model_fields_set else None


def resolve(req: Txt2ImgRequest, store, images: bool) -> Generation:
    """Check `req` against the model it will run on and resolve every value (FieldProblem on the first
    bad field). `images`: an img2img request (init_images, mask, denoising_strength)."""
    entry = store.current
    override = (req.override_settings or {}).get("sd_model_checkpoint")
    if override:
        entry = store.find(override)
        if entry is None:
            raise FieldProblem("override_settings.sd_model_checkpoint",
                               f"no model {override!r}; this server has {', '.join(e.title for e in store.entries)}")
        if entry.caps is None:
            raise FieldProblem("override_settings.sd_model_checkpoint",
                               f"{entry.title} is not loaded yet; switch to it with POST /sdapi/v1/options first")
    caps = entry.caps
    size, g = caps["size"], caps["granularity"]
    top = MAX_SIDE_FACTOR * size
    width = check_side("width", req.width or size, g, top, entry.title)
    height = check_side("height", req.height or size, g, top, entry.title)
    # what the client left unset comes from the checkpoint (meta.sampling: a distilled student's lcm, 4 steps,
    # guidance 1), then from A1111's API defaults
    own = getattr(entry, "sampling", None) or {}
    named = _requested(req, "sampler_name") or _requested(req, "sampler_index")
    sampler_field = "sampler_name" if req.sampler_name else "sampler_index"
    found = find_sampler(named or own.get("sampler"))
    if found is None:
        if not named:
            raise FieldProblem(sampler_field, f"the checkpoint's default sampler {own.get('sampler')!r} is unknown; name one")
        known = ", ".join(A1111_SAMPLERS.get(s, s) for s in SAMPLERS)
        raise FieldProblem(sampler_field, f"unknown sampler {named!r}; choose one of {known}")
    sampler, sigmas = found
    notes = []
    if req.scheduler is not None:
        key = req.scheduler.strip().lower()
        if key in NEAR_UNIFORM:
            key = "uniform"
            notes.append(f"scheduler {req.scheduler}: the model's own timestep spacing is used")
        elif key not in SCHEDULERS:
            raise FieldProblem("scheduler", f"unknown scheduler {req.scheduler!r}; choose automatic, uniform, karras or exponential")
        sigmas = SCHEDULERS[key] or sigmas
    batch, n_iter = req.batch_size or 1, req.n_iter or 1
    if batch * n_iter > MAX_IMAGES_PER_REQUEST:
        raise FieldProblem("n_iter", f"batch_size × n_iter = {batch * n_iter}; at most {MAX_IMAGES_PER_REQUEST} images per request")
    not_honoured = _not_honoured(req) + notes
    prompt, negative = req.prompt or "", req.negative_prompt or None
    if not caps["text"]:
        if prompt:
            not_honoured.append("prompt: this model has no text route (it draws without one)")
        if negative:
            not_honoured.append("negative_prompt: this model has no text route")
        negative = None
    if caps["text"]:
        _check_lora_tags(prompt, getattr(store, "networks", None))
    seed = req.seed if req.seed is not None and req.seed >= 0 else random.randrange(2**32)
    steps = _requested(req, "steps") or int(own.get("steps", A1111_STEPS))
    cfg = _requested(req, "cfg_scale")
    guidance = float(cfg) if cfg is not None else float(own.get("guidance", A1111_CFG))
    eta = req.eta if sampler == "ddim" and req.eta is not None else None
    gen = Generation(entry=entry, prompt=prompt, negative_prompt=negative, seed=seed, steps=steps, sampler=sampler,
                     sigmas=sigmas, guidance=guidance, batch_size=batch, n_iter=n_iter, width=width, height=height,
                     send_images=req.send_images is not False, parameters={}, not_honoured=not_honoured, eta=eta)
    if images:
        _resolve_images(req, gen, caps)
    elif caps["inpainting"] or caps["lowres"]:
        kind = "an inpainting" if caps["inpainting"] else "a super-resolution"
        raise FieldProblem("init_images", f"model {entry.title} is {kind} model: it needs an image; use /sdapi/v1/img2img")
    _resolve_hires(req, gen, g, top, entry.title, images)
    gen.micro = {k: tuple(v) if isinstance(v, list) else v for k in MICRO_NAMES if (v := getattr(req, k)) is not None}
    _resolve_control(req, gen, caps, entry.title)
    gen.parameters = {k: v for k, v in req.model_dump().items() if k not in ("init_images", "mask", "alwayson_scripts")}
    gen.parameters.update(seed=seed, width=width, height=height, steps=steps, cfg_scale=guidance,
                          sampler_name=A1111_SAMPLERS.get(sampler, sampler))
    return gen


def _resolve_hires(req: Txt2ImgRequest, gen: Generation, g: int, top: int, title: str, images: bool) -> None:
    """A1111's hires-fix fields → gen.hires, its target checked against the limits before any work."""
    if not req.enable_hr:
        return
    if images:
        gen.not_honoured.append("enable_hr: hires fix is a txt2img option (as in A1111); ignored for img2img")
        return
    name = (req.hr_upscaler or "Latent").strip()
    upscaler = LATENT_UPSCALERS.get(name.lower(), "bicubic")
    if upscaler == "bicubic" and name.lower() not in EXACT_PIXEL_UPSCALERS:
        gen.not_honoured.append(f"hr_upscaler {name}: upscaled bicubic in pixels (ldmkit has no {name})")
    strength = 0.7 if req.denoising_strength is None else float(req.denoising_strength)
    hires = HiresPass(scale=float(req.hr_scale or 2.0), resize_x=req.hr_resize_x or 0, resize_y=req.hr_resize_y or 0,
                      upscaler=upscaler, second_pass_steps=req.hr_second_pass_steps or 0, denoising_strength=strength)
    h, w = hires.target(gen.height, gen.width, g)  # A1111's rule, in one place (HiresPass.target)
    by = "hr_scale" if not (hires.resize_x or hires.resize_y) else ("hr_resize_x" if hires.resize_x else "hr_resize_y")
    for side, v in (("width", w), ("height", h)):
        if v > top:
            raise FieldProblem(by, f"the hires {side} would be {v} px; at most {top} px for model {title} "
                                   f"({MAX_SIDE_FACTOR} × its size)")
        if v < g:
            raise FieldProblem(by, f"the hires {side} would be {v} px; at least {g} px")
    gen.hires, gen.hires_size = hires, (w, h)


def _resolve_images(req: Img2ImgRequest, gen: Generation, caps: dict) -> None:
    if not req.init_images:
        raise FieldProblem("init_images", "img2img needs one base64 image in init_images")
    if len(req.init_images) > 1:
        gen.not_honoured.append("init_images: only the first image is used (for every image of the batch)")
    mode = req.resize_mode or 0
    if mode == 3:
        gen.not_honoured.append("resize_mode 3 (latent resize): resized in pixels (mode 0)")
        mode = 0
    gen.resize_mode = mode
    box = (gen.width, gen.height)
    gen.init_image = to_tensor(decode_image(req.init_images[0], "init_images.0"), box, 3, True, mode)
    gen.strength = 0.75 if req.denoising_strength is None else float(req.denoising_strength)
    if req.mask:
        if not caps["inpainting"]:
            raise FieldProblem("mask", "this model has no inpainting route (trained without concat.kind=inpaint); "
                                       "send no mask, or switch to an inpainting model")
        m = to_tensor(decode_image(req.mask, "mask", mask=True), box, 1, False, mode).round()  # (1, 1, H, W), 1 = repaint
        gen.mask = 1 - m if req.inpainting_mask_invert else m
        extra = req.model_extra or {}
        blur = extra.get("mask_blur")
        if isinstance(blur, (int, float)) and blur > 0:
            gen.not_honoured.append("mask_blur: the mask is used sharp (the kept pixels are pasted back exactly)")
    elif caps["inpainting"]:
        raise FieldProblem("mask", "this is an inpainting model: send a mask (white = repaint)")


# the ControlNet extension's resize modes (its API takes the names or their index); its default is crop
CONTROL_RESIZE = {"just resize": 0, "crop and resize": 1, "resize and fill": 2, "inner fit (scale to fit)": 1,
                  "outer fit (shrink to fit)": 2, "envelope (outer fit)": 2}


def _resolve_control(req: Txt2ImgRequest, gen: Generation, caps: dict, title: str) -> None:
    scripts = req.alwayson_scripts or {}
    found = _control_unit(scripts)
    others = [k for k, v in scripts.items() if k.lower() != "controlnet" and isinstance(v, dict)
              and isinstance(v.get("args"), list) and any(v["args"])]
    gen.not_honoured += [f"alwayson_scripts.{k}: not supported by ldmkit" for k in others]
    if found is None:
        if caps["control"]:
            raise FieldProblem("alwayson_scripts.controlnet", f"model {title} has a {caps['control']}: send its control map "
                               'as alwayson_scripts = {"controlnet": {"args": [{"image": BASE64, "weight": 1.0}]}}')
        return
    name, unit = found
    if not caps["control"]:
        raise FieldProblem(name, f"model {title} has no ControlNet or adapter; switch to one that has")
    unit_field = name.rsplit(".", 1)[0]
    weight = unit.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -10 <= weight <= 10:
        raise FieldProblem(unit_field + ".weight", "expected a number in [-10, 10]")
    mode = unit.get("resize_mode", 1)
    mode = CONTROL_RESIZE.get(mode.strip().lower()) if isinstance(mode, str) else mode
    if isinstance(mode, bool) or mode not in (0, 1, 2):
        raise FieldProblem(unit_field + ".resize_mode", "expected Just Resize, Crop and Resize, Resize and Fill (or 0, 1, 2)")
    img = decode_image(unit.get("image") or unit.get("input_image"), name)
    gen.control_image = to_tensor(img, (gen.width, gen.height), caps["control_channels"], False, mode)
    gen.control_scale = float(weight)
