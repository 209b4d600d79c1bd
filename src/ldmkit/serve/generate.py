"""A checked request (`schema.Generation`) run on the worker thread → A1111's txt2img/img2img response.

Batches are drawn as `ldmkit sample` draws them: one generator per batch seeded with seed + k·batch_size,
so the same request gives the same images, and every PNG carries its `parameters` chunk (`infotext`).
The sampler's callback reports each step to the worker (progress, the preview: the current estimate
x̂0 decoded, every few steps) and raises there after POST /interrupt; an interrupted batch returns its
last x̂0 decoded, as the A1111 web UI returns what it has.
"""

from __future__ import annotations

import base64
import json
import time

import torch

from ldmkit import __version__
from ldmkit.imageio import make_grid, png_bytes, to_uint8
from ldmkit.layers.attention import clear_context_cache
from ldmkit.sample import A1111_SAMPLERS, infotext
from ldmkit.serve.schema import Generation
from ldmkit.serve.worker import Interrupted, Worker

TEXT_CACHE_LIMIT = 4096  # distinct prompts whose encodings are kept (the most recent ones)


def _b64_png(img, text: dict | None = None) -> str:
    """A PIL image or a uint8 (H, W, 3) array → base64 PNG."""
    from PIL import Image

    img = img if isinstance(img, Image.Image) else Image.fromarray(img)
    return base64.b64encode(png_bytes(img, text)).decode("ascii")


def run_generation(gen: Generation, store, worker: Worker) -> dict:
    loaded = store.get(gen.entry)
    ldm = loaded.ldm
    if ldm.conditioner.text_encoder is not None:  # endless distinct prompts: keep the most recent encodings
        ldm.conditioner.text_encoder.cache_limit = TEXT_CACHE_LIMIT
    size, batch = loaded.size, gen.batch_size
    device = next(ldm.unet.parameters()).device
    spatial = {}
    if gen.init_image is not None:
        spatial.update(init_image=gen.init_image.to(device), strength=gen.strength)
    if gen.mask is not None:
        spatial["mask"] = gen.mask.to(device)
    if gen.control_image is not None:
        spatial.update(control=loaded.control, control_image=gen.control_image.to(device), control_scale=gen.control_scale)
    if gen.eta is not None:
        spatial["eta"] = gen.eta
    per_batch = gen.steps_per_batch
    images, seeds, interrupted = [], [], False
    for k in range(gen.n_iter):
        seed = gen.seed + k * batch
        last = {}

        def callback(i, t, x, x0, k=k, last=last):
            last["x0"] = x0
            worker.step(k * per_batch + i + 1, preview=lambda: _b64_png(make_grid(ldm.decode(x0).float().cpu())),
                        text=f"batch {k + 1}/{gen.n_iter}, step {i + 1}/{per_batch}")

        try:
            out = ldm.sample(texts=[gen.prompt] * batch if loaded.text else None, num_samples=batch, steps=gen.steps,
                             sampler=gen.sampler, sigmas=gen.sigmas, guidance=gen.guidance, seed=seed, callback=callback,
                             negative_prompt=gen.negative_prompt, **spatial)
        except Interrupted:
            interrupted = True
            for net in (ldm.unet, loaded.control):
                if isinstance(net, torch.nn.Module):
                    clear_context_cache(net)
            if "x0" not in last:
                break
            out = ldm.decode(last["x0"])
        images += list(out.float().cpu())
        seeds += [seed] * batch
        if interrupted:
            break
    return _response(gen, images, seeds, size, interrupted)


def _response(gen: Generation, images: list[torch.Tensor], seeds: list[int], size: int, interrupted: bool) -> dict:
    entry = gen.entry
    short = entry.sha256[:10] if entry.sha256 else None
    texts, b64 = [], []
    for n, (img, seed) in enumerate(zip(images, seeds)):
        text = infotext(gen.prompt, gen.negative_prompt, gen.steps, gen.sampler, gen.guidance, seed, size,
                        model=entry.title, sigmas=gen.sigmas, strength=gen.strength,
                        batch_size=gen.batch_size, batch_pos=n % gen.batch_size, model_hash=short)
        texts.append(text)
        if gen.send_images:
            b64.append(_b64_png(to_uint8(img), {"parameters": text}))
    info = {
        "prompt": gen.prompt, "all_prompts": [gen.prompt] * len(images), "negative_prompt": gen.negative_prompt or "",
        "all_negative_prompts": [gen.negative_prompt or ""] * len(images), "seed": gen.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(images), "subseed_strength": 0, "width": size, "height": size,
        "sampler_name": A1111_SAMPLERS.get(gen.sampler, gen.sampler), "cfg_scale": gen.guidance, "steps": gen.steps,
        "batch_size": gen.batch_size, "restore_faces": False, "sd_model_name": entry.title, "sd_model_hash": short,
        "denoising_strength": gen.strength, "extra_generation_params": {"Schedule type": gen.sigmas} if gen.sigmas else {},
        "index_of_first_image": 0, "infotexts": texts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1, "is_using_inpainting_conditioning": gen.mask is not None, "version": f"ldmkit {__version__}",
        "interrupted": interrupted, "not_honoured": gen.not_honoured,
    }
    return {"images": b64, "parameters": gen.parameters, "info": json.dumps(info)}
