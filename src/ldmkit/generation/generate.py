"""`generate(model, request)`: the only sampling entry point.

    for each batch k (images first..end, generator seeded seed + first):
        z_T ~ N(0, I) of shape (B, c, H/f, W/f)
        z_0 = sampler(Denoiser(CFG(unet [+ control], c, ∅)), z_T, timesteps)       (txt2img)
            or, from an init image x: keep the last int(s·steps) timesteps and start at
            z_{t_s} = α_{t_s} E(x) + σ_{t_s} ε                                      (SDEdit, Meng et al., 2022)
        hires fix: upscale z_0 (latents, or pixels then encode), then an img2img pass at the larger size
        x = D(z_0) (inpainting: the kept pixels pasted back)

img2img keeps int(strength · steps) steps as diffusers' img2img pipelines do (50 × 0.75 → 37), s = 0 returns
the encode-decode of the image and s = 1 starts from pure noise (the image is then ignored unless a
concatenation route reads it).

Inputs of another size than the request's (init image, mask, control maps) are fitted with A1111's
`resize_mode`: 0 stretches, 1 scales to cover and centre-crops, 2 scales to fit and fills the borders by
repeating the edge pixels (A1111 stretches the outermost row/column over the border: the same pixels).
Control maps of another aspect ratio are not stretched (mode 0): they are refused, since a stretched map
misplaces the control; modes 1 and 2 fit them as they fit images.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.control.adapter import Adapter
from ldmkit.conditioning.concat import kept_cells
from ldmkit.conditioning.cond import Cond, cat_conds
from ldmkit.conditioning.text import match_chunk_counts
from ldmkit.control.controlnet import controlled_unet
from ldmkit.diffusion.guidance import batched_classifier_free_guidance
from ldmkit.diffusion.parameterization import Denoiser, KnownRegionDenoiser
from ldmkit.diffusion.samplers import get_sampler
from ldmkit.diffusion.schedules import q_sample, sampler_timesteps
from ldmkit.errors import LdmkitError
from ldmkit.generation.infotext import A1111_UPSCALERS, infotext
from ldmkit.generation.request import GenerationRequest, as_batch, granularity
from ldmkit.layers.attention import clear_context_cache

# A1111's extra-network tag: <lora:NAME>, <lora:NAME:W> or <lora:NAME:W_TEXT:W_UNET> (ldmkit takes W_TEXT for both)
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::([^:>]*))?>")


class Networks(Protocol):
    """A library of LoRAs by name (`ldmkit.interop.lora_library.LoraLibrary` implements it)."""

    def applied(self, model, loras: list[tuple[str, float]]) -> ContextManager[dict[str, str]]:
        """Apply each (name, weight) to `model` for the duration of the `with` block and yield name → short
        hash (for the PNG parameters); on exit the model is as before. Unknown names or damaged files: one
        LdmkitError naming the tag and the file, before anything is applied."""
        ...


class Interrupted(Exception):
    """Raised by a callback to stop generation at this step: `generate` returns what it has (the running
    batch as its current estimate x̂0 decoded, as the A1111 web UI returns), with `Generated.interrupted`."""


@dataclass
class Generated:
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1], CPU float32 (empty when generate(decode=False))
    seeds: list[int]  # the seed of the batch each image was drawn in (its generator's seed)
    parameters: list[str]  # A1111 infotext per image
    latents: torch.Tensor | None = None  # (N, c, H/f, W/f) on the model's device
    interrupted: bool = False
    lora_hashes: dict[str, str] = field(default_factory=dict)


def split_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A prompt → (its text with the <lora:…> tags removed, [(name, weight)]); the weight defaults to 1."""
    found = []
    for m in LORA_TAG.finditer(prompt):
        name, w = m.group(1).strip(), (m.group(2) or "").strip()
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise LdmkitError(f"{m.group(0)}: the weight {w!r} is not a number; write <lora:{name}:0.8>") from None
        found.append((name, weight))
    return LORA_TAG.sub("", prompt), found


def _loras(prompts: list[str] | None, extra: list[tuple[str, float]]) -> tuple[list[str] | None, list[tuple[str, float]]]:
    """The prompts without their tags, and every LoRA of the request once (tags of all prompts + `extra`);
    they apply to the whole request. One name with two weights is refused."""
    weights: dict[str, float] = {}
    texts, pairs = None, []
    if prompts is not None:
        texts = []
        for p in prompts:
            text, found = split_loras(p)
            texts.append(text)
            pairs += found
    pairs += list(extra)
    for name, w in pairs:
        if weights.get(name, w) != w:
            raise LdmkitError(f"LoRA {name!r} is asked with two weights ({weights[name]} and {w}); give one")
        weights[name] = w
    return texts, list(weights.items())


def fit(image: torch.Tensor, height: int, width: int, mode: int, resample: str = "bicubic") -> torch.Tensor:
    """(B, C, h, w) → (B, C, height, width) by A1111's resize_mode: 0 stretch; 1 scale to cover and centre-crop;
    2 scale to fit and fill the borders with the edge pixels repeated. `resample`: "bicubic" (images; clamped
    to the input's range), "bilinear" (control maps) or "nearest" (masks)."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image

    def resize(x: torch.Tensor, hh: int, ww: int) -> torch.Tensor:
        if resample == "nearest":
            return F.interpolate(x, size=(hh, ww), mode="nearest")
        y = F.interpolate(x.float(), size=(hh, ww), mode=resample, align_corners=False,
                          antialias=hh < x.shape[-2] or ww < x.shape[-1])
        return y.clamp(float(x.min()), float(x.max())) if resample == "bicubic" else y

    if mode == 0:
        return resize(image, height, width)
    ratio, src_ratio = width / height, w / h
    if mode == 1:  # crop and resize (A1111 images.resize_image, resize_mode 1)
        sw, sh = (width, max(height, round(h * width / w))) if ratio > src_ratio else (max(width, round(w * height / h)), height)
        top, left = sh // 2 - height // 2, sw // 2 - width // 2
        return resize(image, sh, sw)[..., top : top + height, left : left + width]
    # resize and fill (resize_mode 2)
    sw, sh = (width, min(height, round(h * width / w))) if ratio < src_ratio else (min(width, round(w * height / h)), height)
    top, left = height // 2 - sh // 2, width // 2 - sw // 2
    return F.pad(resize(image, sh, sw), (left, width - sw - left, top, height - sh - top), mode="replicate")


def _control_maps(images, n: int, height: int, width: int, mode: int):
    """Control maps (1 or n, C, h, w), or a list of them, fitted to (height, width) by resize mode 1 or 2.
    Mode 0 (stretch) is not applied to control maps of another aspect ratio: stretching misplaces the
    control (an edge map's circle becomes an ellipse), so `prepare_control_image` refuses them and asks for
    crop-and-resize or fill. Anything else is passed through for it to refuse with its own message."""
    if isinstance(images, (list, tuple)):
        return [_control_maps(i, n, height, width, mode) for i in images]
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4) or not images.is_floating_point():
        return images
    images = images if images.ndim == 4 else images[None]  # (1 or n, C, h, w)
    if mode != 0:  # mode 0 leaves them to `prepare_control_image`: resized at the same aspect, else refused
        images = fit(images, height, width, mode, "bilinear")
    return images.expand(n, -1, -1, -1) if images.shape[0] == 1 else images


def _rows(x, first: int, end: int):
    """Rows first..end of a per-image batch (one of 1 row applies to all); lists item by item."""
    if isinstance(x, (list, tuple)):
        return [_rows(i, first, end) for i in x]
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        return x
    return x.expand(end - first, -1, -1, -1) if x.shape[0] == 1 else x[first:end]


@torch.no_grad()
def generate(model, request: GenerationRequest, callback: Callable | None = None, *, control=None,
             networks: Networks | None = None, decode: bool = True, decoder: Callable | None = None) -> Generated:
    """Images for `request` from `model` (a LatentDiffusion) and, optionally, a ControlNet / MultiControlNet /
    Adapter `control` and a LoRA library `networks` (needed when the request names LoRAs). `callback(i, t, x, x̂0)`
    is called after every sampler step (both passes of a hires fix) and may raise `Interrupted`.
    decode=False skips decoding (latents only); `decoder(z0)` → images in [-1, 1] decodes the final latents
    instead of `model.decode` (a tiny decoder: `ldmkit.generation.decoders.tiny_decoder`; the hires pass's
    bicubic upscale, which encodes its result again, keeps the full first stage)."""
    request.check(model, control)
    get_sampler(request.sampler)  # an unknown sampler is refused before any work
    n = request.count()
    prompts = request.per_image(request.prompt, n)
    texts, loras = _loras(prompts, request.loras)
    if loras and networks is None:
        raise LdmkitError(f"<lora:{loras[0][0]}> needs a LoRA library: give --lora-dir (Python: generate(networks=…))")
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32 - 1)  # A1111's range
    run = _Run(model, request, control, n, texts, decoder or model.decode)
    applied = networks.applied(model, loras) if loras else contextlib.nullcontext({})
    images, latents, seeds, interrupted = [], [], [], False
    with applied as hashes:
        try:
            for first, end, s in request.batches(seed):
                last: dict = {}

                def step(i, t, x, x0, last=last):
                    last["x0"] = x0
                    if callback is not None:
                        callback(i, t, x, x0)

                try:
                    z0, size = run.batch(first, end, s, step)
                except Interrupted:
                    interrupted = True
                    if "x0" not in last:
                        break
                    z0, size = last["x0"], tuple(f * model.config.autoencoder.downsample_factor
                                                 for f in last["x0"].shape[-2:])
                run.clear()
                latents.append(z0)
                if decode:
                    images.append(run.finish(z0, first, end, size).float().cpu())
                seeds += [s] * (end - first)
                if interrupted:
                    break
        finally:
            run.clear()
    parameters = [run.parameters(k, s, hashes) for k, s in enumerate(seeds)]
    return Generated(torch.cat(images) if images else torch.empty(0, 3, *run.final), seeds, parameters,
                     torch.cat(latents) if latents else None, interrupted, dict(hashes))


class _Run:
    """One request's fixed inputs (per-image prompts, labels, fitted images) and its passes."""

    def __init__(self, model, request: GenerationRequest, control, n: int, texts: list[str] | None,
                 decoder: Callable[[torch.Tensor], torch.Tensor]):
        self.model, self.req, self.control, self.n, self.decoder = model, request, control, n, decoder
        self.texts = texts
        self.prompts = request.per_image(request.prompt, n)
        self.negatives = request.per_image(request.negative_prompt, n)
        labels = request.per_image(request.labels, n)
        self.labels = torch.tensor(labels, dtype=torch.long) if labels is not None else None
        self.device = next(model.unet.parameters()).device
        self.image = as_batch(request.init_image, 3, n, "init image") if request.init_image is not None else None
        self.mask = as_batch(request.mask, 1, n, "mask") if request.mask is not None else None
        self.g = granularity(model)
        self.size = request.size(model)
        self.final = request.hires.target(*self.size, self.g) if request.hires is not None else self.size

    def clear(self) -> None:
        """Drop the text tokens' cached keys/values (not needed for decoding)."""
        for net in (self.model.unet, self.control):
            if isinstance(net, nn.Module):
                clear_context_cache(net)

    def inputs(self, first: int, end: int, height: int, width: int):
        """The batch's init image (B, 3, H, W) and mask (B, 1, H, W), fitted to (height, width), on the device."""
        mode = self.req.resize_mode
        image = fit(self.image[first:end], height, width, mode).to(self.device) if self.image is not None else None
        mask = None
        if self.mask is not None:
            mask = fit(self.mask[first:end], height, width, mode, "nearest").to(self.device).clamp(0, 1).round()
        return image, mask

    def batch(self, first: int, end: int, seed: int, callback) -> tuple[torch.Tensor, tuple[int, int]]:
        """z0 (B, c, h, w) of images first..end and its pixel size, hires pass included."""
        req, model = self.req, self.model
        height, width = self.size
        z0 = self.denoise(first, end, seed, height, width, req.steps, req.strength, None, callback)
        hr = req.hires
        if hr is None:
            return z0, (height, width)
        th, tw = self.final
        f = model.config.autoencoder.downsample_factor
        if hr.upscaler == "bicubic":  # pixels: decode, resize, encode
            x = F.interpolate(model.decode(z0).float(), size=(th, tw), mode="bicubic", align_corners=False,
                              antialias=th < height or tw < width).clamp(-1, 1)  # (B, 3, th, tw)
            start = model.encode_mean(x)  # (B, c, th/f, tw/f)
        else:  # A1111 "Latent" (bilinear) / "Latent (nearest)": interpolate the latents themselves
            start = F.interpolate(z0, size=(th // f, tw // f), mode="bilinear" if hr.upscaler == "latent" else "nearest",
                                  **({"align_corners": False} if hr.upscaler == "latent" else {}))
        # A1111's second pass: exactly `second_pass_steps or steps` steps, the last ones of a schedule of
        # int(steps / strength) steps (sd_samplers_common.setup_img2img_steps), noise from the same seed.
        s = hr.second_pass_steps or req.steps
        ds = min(hr.denoising_strength, 0.999)
        if hr.denoising_strength <= 0:
            return start, (th, tw)
        total = min(int(s / ds), model.config.diffusion.num_timesteps)  # a tiny strength cannot ask for more steps than T
        z0 = self.denoise(first, end, seed, th, tw, total, hr.denoising_strength, start, callback, run=min(s, total))
        return z0, (th, tw)

    def denoise(self, first: int, end: int, seed: int, height: int, width: int, steps: int, strength: float,
                start: torch.Tensor | None, callback, run: int | None = None) -> torch.Tensor:
        """One pass at (height, width): from noise, from the init image (strength < 1) or from `start` latents
        (the hires pass), running `run` (default int(strength · steps)) of `steps` steps."""
        model, req, b = self.model, self.req, end - first
        cfg = model.config
        f, c = cfg.autoencoder.downsample_factor, cfg.autoencoder.latent_channels
        hw = (height // f, width // f)
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn((b, c, *hw), generator=g).to(self.device)  # (B, c, H/f, W/f)
        image, mask = self.inputs(first, end, height, width)
        cond, uncond, scale = self.conds(first, end, height, width, image, mask)
        fn = self.model_fn(cond, uncond, first, end, height, width, noise)
        fn = batched_classifier_free_guidance(fn, cond, uncond, scale, rescale=req.guidance_rescale, cat=cat_conds)
        denoiser = Denoiser(fn, model.schedule, cfg.diffusion.prediction_type)
        known = keep = None
        if cfg.concat is not None and cfg.concat.takes_mask and req.keep_known:
            known, keep = model.encode_mean(image), kept_cells(mask, hw)  # (B, c, h, w), (B, 1, h, w)
            denoiser = KnownRegionDenoiser(denoiser, known, keep)
        if start is None and image is not None and strength < 1.0:
            start = model.encode_mean(image)  # (B, c, h, w)
        z, timesteps, levels = self.start(noise, steps, start, strength, run)
        if len(timesteps) == 0:  # img2img at strength 0: the encode-decode of the image
            return z
        opts = {k: v for k, v in req.sampler_options.items() if k != "grid_steps"}  # the grid is the timesteps'
        if req.eta is not None:
            opts["eta"] = req.eta
        if levels is not None:
            opts["alpha_bars"] = levels
        z0 = get_sampler(req.sampler)(denoiser, z, timesteps, generator=g, callback=callback, **opts)
        if known is not None:  # samplers whose last step keeps a little noise end exactly on the known cells
            z0 = torch.lerp(z0, known, keep)
        return z0

    def start(self, noise: torch.Tensor, steps: int, start: torch.Tensor | None, strength: float, run: int | None):
        """(z at the first sampling step, the sampling timesteps, their noise levels ᾱ or None for the
        schedule's own), from `sampler_timesteps` (lcm: its distillation grid, `grid_steps` points: the
        sampler option an ldmkit student's meta.sampling carries; default diffusers' 50). SDEdit: keep the
        last `run` = int(strength · steps) steps (diffusers' img2img) and noise `start` to the first of them;
        lcm runs all its steps on the grid the strength cuts (diffusers' LCM img2img)."""
        model, d, req = self.model, self.model.config.diffusion, self.req
        img2img = start is not None and (run is not None or strength < 1.0)
        grid = req.sampler_options.get("grid_steps")
        if run is not None and not (req.sampler == "lcm" and req.spacing is None):
            # the hires pass: `steps` is the stretched schedule of which the last `run` are kept
            timesteps, levels = sampler_timesteps(model.schedule, req.sampler, steps, d.timestep_spacing,
                                                  d.steps_offset, sigma_spacing=req.spacing)
            timesteps = timesteps[steps - run :] if run else timesteps[:0]
            levels = (levels[steps - run :] if run else levels[:0]) if levels is not None else None
        else:
            timesteps, levels = sampler_timesteps(model.schedule, req.sampler, steps if run is None else run,
                                                  d.timestep_spacing, d.steps_offset, sigma_spacing=req.spacing,
                                                  strength=strength if img2img else 1.0, grid_steps=grid)
        if not img2img:
            return noise, timesteps, levels
        if len(timesteps) == 0:
            return start, timesteps, levels
        if levels is None:
            t = timesteps[:1].expand(noise.shape[0]).to(noise.device)
            return q_sample(model.schedule, start, t, noise), timesteps, levels
        a = float(levels[0])
        return a**0.5 * start + (1 - a) ** 0.5 * noise, timesteps, levels

    def conds(self, first: int, end: int, height: int, width: int, image, mask) -> tuple[Cond, Cond | None, float]:
        """The conditional Cond, the unconditional one when guiding (every route at its null value, the
        caption the negative prompt when one is given), and the scale to guide with: 1 for a w-embedded
        student, which takes the scale as an input (`cond.guidance`) and needs no unconditional branch.
        Micro-conditioned models (SDXL) get the request's micro-conditions, by default original = target =
        (height, width), crop (0, 0) (the refiner: aesthetic scores 6 and 2.5); the unconditional branch its
        negative_* values, so the two branches may differ in their vector route as in their text."""
        model, req, b = self.model, self.req, end - first
        guidance = req.guidance
        texts = self.texts[first:end] if self.texts is not None else None
        labels = self.labels[first:end] if self.labels is not None else None
        pos, neg = req.micro_conditions()
        size_crop = model.conditioner.micro_values(b, height, width, **pos)  # (B, 6), the refiner's (B, 5), or None
        neg_size_crop = model.conditioner.micro_values(b, height, width, **neg)
        cond = model.conditioner(texts=texts, labels=model._conditioner_labels(labels), batch_size=b,
                                 size_crop=size_crop, prompt_syntax=True).to(self.device)
        uncond = None
        if model.config.unet.time_cond_proj_dim:  # guidance enters through the student's w-embedding (LCM)
            cond.guidance = torch.full((b,), float(guidance), device=self.device)
            guidance = 1.0
        if guidance != 1.0:
            if self.negatives is not None:
                uncond = model.conditioner(texts=self.negatives[first:end], labels=None, batch_size=b,
                                           size_crop=neg_size_crop, prompt_syntax=True).to(self.device)
            else:
                uncond = model.conditioner.uncond(b, neg_size_crop).to(self.device)
            # A prompt and a negative prompt of different chunk counts (past the encoder's window): the shorter
            # is padded with the empty prompt's chunk, attended to, as A1111's CFG denoiser does
            cond, uncond = match_chunk_counts(model.conditioner.text_encoder, cond, uncond)
        cc = model.config.concat
        if cc is not None:
            f = model.config.autoencoder.downsample_factor
            cond.concat = model.concat_condition(image, mask, labels=labels,
                                                 latent_hw=(height // f, width // f)).to(self.device)
            if uncond is not None:
                uncond.concat = cc.null(cond.concat)
        return cond, uncond, guidance

    def model_fn(self, cond: Cond, uncond: Cond | None, first: int, end: int, height: int, width: int,
                 z: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]:
        """The model function (z_t, t, cond) with the control network in it; the control acts on both
        branches of guidance (the same maps in the conditional and the unconditional Cond)."""
        control, unet = self.control, self.model.unet
        if control is None:
            return unet
        maps = _rows(_control_maps(self.req.control_image, self.n, height, width, self.req.resize_mode), first, end)
        branches = [c for c in (cond, uncond) if c is not None]
        if isinstance(control, Adapter):
            feats = control(maps, z, self.req.control_scale)  # once per image: the features do not depend on t
            for c in branches:
                c.adapter_residuals = feats
            return unet
        for c in branches:
            c.control = maps
        return controlled_unet(unet, control, self.req.control_scale)

    def finish(self, z0: torch.Tensor, first: int, end: int, size: tuple[int, int]) -> torch.Tensor:
        """Decoded images (B, 3, H, W); inpainting: the kept pixels pasted back."""
        out = self.decoder(z0)
        cc = self.model.config.concat
        if self.mask is not None and self.req.overlay and cc is not None and cc.takes_mask:
            # The decoder spreads every latent cell over ~f pixels and the cells that straddle the hole's
            # edge are regenerated, so kept pixels next to the hole drift (docs/design.md: 2.1 dB under the
            # first stage on shapes-free); the pixels the user asked to keep are pasted back.
            image, mask = self.inputs(first, end, *size)
            out = torch.lerp(image.to(out.dtype), out, mask.to(out.dtype))
        return out

    def parameters(self, k: int, seed: int, hashes: dict[str, str]) -> str:
        """Image k's A1111 infotext."""
        req = self.req
        hires = strength = None
        if req.init_image is not None:
            strength = req.strength
        if req.hires is not None:
            hr = req.hires
            th, tw = self.final
            hires = {"Hires upscale": f"{hr.scale:g}"} if not (hr.resize_x or hr.resize_y) else {"Hires resize": f"{tw}x{th}"}
            hires.update({"Hires steps": hr.second_pass_steps or None,
                          "Hires upscaler": A1111_UPSCALERS.get(hr.upscaler, hr.upscaler)})
            strength = strength if strength is not None else hr.denoising_strength
        first = k - k % req.batch_size  # the batch this image was drawn in
        size = min(req.batch_size, self.n - first)
        return infotext(self.prompts[k] if self.prompts else "", self.negatives[k] if self.negatives else None,
                        req.steps, req.sampler, req.guidance, seed, self.size, req.model_name, req.spacing, strength,
                        batch_size=size, batch_pos=k - first, model_hash=req.model_hash, hires=hires,
                        lora_hashes=hashes or None)
