"""A checked request (`schema.Generation`) run on the worker thread → A1111's txt2img/img2img response.

The request becomes a `GenerationRequest` and runs through `ldmkit.generation.generate`, as `ldmkit sample`
does: one generator per batch seeded with seed + k·batch_size, so the same request gives the same images,
and every PNG carries its `parameters` chunk. The sampler's callback reports each step to the worker
(progress, the preview: the current estimate x̂0 decoded, every few steps, by the tiny decoder when the
server has one) and raises there after
POST /interrupt; an interrupted batch returns its last x̂0 decoded, as the A1111 web UI returns what it has.
"""

from __future__ import annotations

import base64
import json
import time

import torch

from ldmkit import __version__
from ldmkit.generation import A1111_SAMPLERS, GenerationRequest, generate
from ldmkit.imageio import make_grid, png_bytes, to_uint8
from ldmkit.serve.schema import Generation
from ldmkit.serve.worker import Worker

TEXT_CACHE_LIMIT = 4096  # distinct prompts whose encodings are kept (the most recent ones)


def _b64_png(img, text: dict | None = None) -> str:
    """A PIL image or a uint8 (H, W, 3) array → base64 PNG."""
    from PIL import Image

    img = img if isinstance(img, Image.Image) else Image.fromarray(img)
    return base64.b64encode(png_bytes(img, text)).decode("ascii")


def request_of(gen: Generation, loaded) -> GenerationRequest:
    """The server's checked request as a GenerationRequest (size, hires and resize mode where the schema
    gives them; the model's own size otherwise)."""
    entry = gen.entry
    return GenerationRequest(
        prompt=gen.prompt if loaded.text else None, negative_prompt=gen.negative_prompt,
        height=getattr(gen, "height", None) or loaded.size, width=getattr(gen, "width", None) or loaded.size,
        seed=gen.seed, steps=gen.steps, sampler=gen.sampler, spacing=gen.sigmas, eta=gen.eta, guidance=gen.guidance,
        batch_size=gen.batch_size, n_iter=gen.n_iter, init_image=gen.init_image,
        mask=gen.mask, strength=gen.strength if gen.strength is not None else 1.0,
        resize_mode=getattr(gen, "resize_mode", 0) or 0, control_image=gen.control_image,
        control_scale=gen.control_scale, hires=getattr(gen, "hires", None), **getattr(gen, "micro", {}),
        model_name=entry.title, model_hash=entry.sha256[:10] if entry.sha256 else None,
        # a distilled student's timesteps are its distillation grid (lcm's `grid_steps`, from meta.sampling)
        sampler_options={"grid_steps": int(entry.sampling["grid_steps"])} if entry.sampling.get("grid_steps") else {})


def run_generation(gen: Generation, store, worker: Worker) -> dict:
    loaded = store.get(gen.entry)
    ldm = loaded.ldm
    if ldm.conditioner.text_encoder is not None:  # endless distinct prompts: keep the most recent encodings
        ldm.conditioner.text_encoder.cache_limit = TEXT_CACHE_LIMIT
    request = request_of(gen, loaded)
    if request.init_image is not None:
        request.init_image = request.init_image.to(next(ldm.unet.parameters()).device)
    per_batch = max(1, gen.steps_per_batch)
    done = [0]
    tiny = getattr(loaded, "tiny", None)  # `--tiny-decoder`: every preview, and the results with --tiny-final
    preview_decode = tiny or ldm.decode

    def callback(i, t, x, x0):
        done[0] += 1
        k = (done[0] - 1) // per_batch
        worker.step(done[0], preview=lambda: _b64_png(make_grid(preview_decode(x0).float().cpu())),
                    text=f"batch {min(k + 1, gen.n_iter)}/{gen.n_iter}, step {i + 1}/{per_batch}")

    with store.autocast():
        out = generate(ldm, request, callback, control=loaded.control if gen.control_image is not None else None,
                       networks=getattr(loaded, "networks", None) or getattr(store, "networks", None),
                       decoder=tiny if getattr(store, "tiny_final", False) else None)
    return _response(gen, request, list(out.images), out.seeds, out.parameters, out.interrupted)


def _response(gen: Generation, request: GenerationRequest, images: list[torch.Tensor], seeds: list[int],
              texts: list[str], interrupted: bool) -> dict:
    entry = gen.entry
    b64 = [_b64_png(to_uint8(img), {"parameters": text}) for img, text in zip(images, texts)] if gen.send_images else []
    height, width = images[0].shape[-2:] if images else (request.height, request.width)
    info = {
        "prompt": gen.prompt, "all_prompts": [gen.prompt] * len(images), "negative_prompt": gen.negative_prompt or "",
        "all_negative_prompts": [gen.negative_prompt or ""] * len(images), "seed": gen.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * len(images), "subseed_strength": 0, "width": width, "height": height,
        "sampler_name": A1111_SAMPLERS.get(gen.sampler, gen.sampler), "cfg_scale": gen.guidance, "steps": gen.steps,
        "batch_size": gen.batch_size, "restore_faces": False, "sd_model_name": entry.title,
        "sd_model_hash": request.model_hash, "denoising_strength": gen.strength,
        "extra_generation_params": {"Schedule type": gen.sigmas} if gen.sigmas else {},
        "index_of_first_image": 0, "infotexts": texts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1, "is_using_inpainting_conditioning": gen.mask is not None, "version": f"ldmkit {__version__}",
        "interrupted": interrupted, "not_honoured": gen.not_honoured,
    }
    return {"images": b64, "parameters": gen.parameters, "info": json.dumps(info)}
