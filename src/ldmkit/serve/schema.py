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
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from ldmkit.diffusion.samplers import SAMPLERS
from ldmkit.sample import A1111_SAMPLERS

MAX_IMAGE_BYTES = 24 << 20  # per base64 image: a 4096² PNG photo fits, a runaway upload does not
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGES_PER_REQUEST = 64  # batch_size × n_iter


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
    width: int | None = Field(None, ge=8, le=4096, description="must be the model's size (default)")
    height: int | None = Field(None, ge=8, le=4096, description="must be the model's size (default)")
    eta: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="DDIM's η (other samplers ignore it)")
    send_images: bool | None = True
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict,
                                                    description='"controlnet": {"args": [{"image": b64, "weight": 1}]}')
    override_settings: dict[str, Any] | None = Field(default_factory=dict,
                                                     description="sd_model_checkpoint runs this request on that model")


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: txt2img's fields plus the image, the mask and how much to change."""

    init_images: list[str] | None = Field(None, description="base64 images (a data: URL prefix is accepted); the first is used")
    mask: str | None = Field(None, description="base64 mask image, white = repaint (inpainting models)")
    denoising_strength: float | None = Field(0.75, ge=0, le=1, allow_inf_nan=False)
    resize_mode: int | None = Field(0, ge=0, le=3, description="0 stretch to the model's size, 1 crop then resize")
    inpainting_mask_invert: int | None = Field(0, ge=0, le=1, description="1: black = repaint")


# A1111 fields ldmkit does not do, with the value that asks for nothing (anything else is reported)
NOT_HONOURED = {
    "enable_hr": False, "restore_faces": False, "tiling": False, "subseed_strength": 0, "styles": [],
    "script_name": None, "s_churn": 0, "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0),
    "initial_noise_multiplier": 1.0, "save_images": False, "include_init_images": False, "inpaint_full_res": (False, 0),
    "refiner_checkpoint": None, "image_cfg_scale": None,
}


def sampler_names() -> list[dict]:
    """GET /sdapi/v1/samplers: A1111's SamplerItem per ldmkit sampler, its ldmkit name an alias."""
    return [{"name": A1111_SAMPLERS.get(s, s), "aliases": [s, "k_" + s], "options": {}} for s in SAMPLERS]


def find_sampler(name: str | None) -> tuple[str, str | None] | None:
    """(ldmkit sampler, σ spacing) for an A1111 or ldmkit sampler name, case-insensitive; older A1111
    names carry the schedule ("DPM++ 2M Karras"). None: unknown."""
    if not name:
        return "euler_a", None  # A1111's default sampler ("Euler a" in its UI, its API's sampler_index)
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
    not_honoured: list[str] = field(default_factory=list)
    init_image: torch.Tensor | None = None  # (1, 3, S, S) in [-1, 1]
    mask: torch.Tensor | None = None  # (1, 1, S, S) in {0, 1}
    strength: float | None = None
    control_image: torch.Tensor | None = None  # (1, C, S, S) in [0, 1]
    control_scale: float | None = None
    eta: float | None = None

    @property
    def steps_per_batch(self) -> int:
        """Steps the sampler runs per batch: img2img keeps the last round(strength·steps) of them."""
        return self.steps if self.init_image is None else max(1, round(self.strength * self.steps))

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


def to_tensor(img, size: int, channels: int, signed: bool, resize_mode: int = 0) -> torch.Tensor:
    """PIL image → (1, channels, size, size): stretched to the model's size (resize_mode 0), or its centre
    square cropped first (1); bicubic for pictures, nearest for masks; [-1, 1] when `signed`, else [0, 1]."""
    from PIL import Image

    if resize_mode == 1 and img.width != img.height:
        s = min(img.width, img.height)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s))
    img = img.convert("L") if channels == 1 else img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC if channels == 3 else Image.NEAREST)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).reshape(size, size, channels)
    x = x.permute(2, 0, 1)[None]  # (1, C, S, S) in [0, 1]
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
        for i, unit in enumerate(script.get("args") or []):
            if isinstance(unit, dict) and unit.get("enabled", True) and (unit.get("image") or unit.get("input_image")):
                name = "image" if unit.get("image") else "input_image"
                return f"alwayson_scripts.{key}.args.{i}.{name}", unit
    return None


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
    size = caps["size"]
    for name in ("width", "height"):
        v = getattr(req, name)
        if v is not None and v != size:
            raise FieldProblem(name, f"{v} px: model {entry.title} makes {size}x{size} images; send {name}={size} or omit it")
    sampler_field = "sampler_name" if req.sampler_name else "sampler_index"
    found = find_sampler(req.sampler_name or req.sampler_index)
    if found is None:
        known = ", ".join(A1111_SAMPLERS.get(s, s) for s in SAMPLERS)
        raise FieldProblem(sampler_field, f"unknown sampler {req.sampler_name or req.sampler_index!r}; choose one of {known}")
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
    seed = req.seed if req.seed is not None and req.seed >= 0 else random.randrange(2**32)
    steps = req.steps or 50
    guidance = 7.0 if req.cfg_scale is None else float(req.cfg_scale)
    eta = req.eta if sampler == "ddim" and req.eta is not None else None
    gen = Generation(entry=entry, prompt=prompt, negative_prompt=negative, seed=seed, steps=steps, sampler=sampler,
                     sigmas=sigmas, guidance=guidance, batch_size=batch, n_iter=n_iter,
                     send_images=req.send_images is not False, parameters={}, not_honoured=not_honoured, eta=eta)
    if images:
        _resolve_images(req, gen, caps)
    elif caps["inpainting"] or caps["lowres"]:
        kind = "an inpainting" if caps["inpainting"] else "a super-resolution"
        raise FieldProblem("init_images", f"model {entry.title} is {kind} model: it needs an image; use /sdapi/v1/img2img")
    _resolve_control(req, gen, caps, entry.title)
    gen.parameters = {k: v for k, v in req.model_dump().items() if k not in ("init_images", "mask", "alwayson_scripts")}
    gen.parameters.update(seed=seed, width=size, height=size)
    return gen


def _resolve_images(req: Img2ImgRequest, gen: Generation, caps: dict) -> None:
    size = caps["size"]
    if not req.init_images:
        raise FieldProblem("init_images", "img2img needs one base64 image in init_images")
    if len(req.init_images) > 1:
        gen.not_honoured.append("init_images: only the first image is used (for every image of the batch)")
    mode = req.resize_mode or 0
    if mode > 1:
        gen.not_honoured.append(f"resize_mode {mode}: not supported; cropped to a square and resized (mode 1)")
        mode = 1
    gen.init_image = to_tensor(decode_image(req.init_images[0], "init_images.0"), size, 3, True, mode)
    gen.strength = 0.75 if req.denoising_strength is None else float(req.denoising_strength)
    if req.mask:
        if not caps["inpainting"]:
            raise FieldProblem("mask", "this model has no inpainting route (trained without concat.kind=inpaint); "
                                       "send no mask, or switch to an inpainting model")
        m = to_tensor(decode_image(req.mask, "mask", mask=True), size, 1, False, mode).round()  # (1, 1, S, S), 1 = repaint
        gen.mask = 1 - m if req.inpainting_mask_invert else m
        extra = req.model_extra or {}
        if (extra.get("mask_blur") or 0) > 0:
            gen.not_honoured.append("mask_blur: the mask is used sharp (the kept pixels are pasted back exactly)")
    elif caps["inpainting"]:
        raise FieldProblem("mask", "this is an inpainting model: send a mask (white = repaint)")


def _resolve_control(req: Txt2ImgRequest, gen: Generation, caps: dict, title: str) -> None:
    scripts = req.alwayson_scripts or {}
    found = _control_unit(scripts)
    others = [k for k, v in scripts.items() if k.lower() != "controlnet" and isinstance(v, dict) and any(v.get("args") or [])]
    gen.not_honoured += [f"alwayson_scripts.{k}: not supported by ldmkit" for k in others]
    if found is None:
        if caps["control"]:
            raise FieldProblem("alwayson_scripts.controlnet", f"model {title} has a {caps['control']}: send its control map "
                               'as alwayson_scripts = {"controlnet": {"args": [{"image": BASE64, "weight": 1.0}]}}')
        return
    name, unit = found
    if not caps["control"]:
        raise FieldProblem(name, f"model {title} has no ControlNet or adapter; switch to one that has")
    img = decode_image(unit.get("image") or unit.get("input_image"), name)
    gen.control_image = to_tensor(img, caps["size"], caps["control_channels"], False)
    weight = unit.get("weight", 1.0)
    if not isinstance(weight, (int, float)) or not -10 <= weight <= 10:
        raise FieldProblem(name.rsplit(".", 1)[0] + ".weight", "expected a number in [-10, 10]")
    gen.control_scale = float(weight)
