"""The generation parameters as the A1111 web UI writes them into a PNG's `parameters` text chunk."""

from __future__ import annotations

import sys

# ldmkit sampler → the name the A1111 web UI writes (and its readers expect) in a PNG's parameters
A1111_SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M", "unipc": "UniPC", "euler": "Euler",
                  "euler_a": "Euler a", "lcm": "LCM"}
# ldmkit hires upscaler → A1111's name
A1111_UPSCALERS = {"latent": "Latent", "latent-nearest": "Latent (nearest)", "bicubic": "Bicubic"}


def infotext(prompt: str, negative_prompt: str | None, steps: int, sampler: str, guidance: float, seed: int,
             size: int | tuple[int, int], model: str | None = None, sigmas: str | None = None,
             strength: float | None = None, batch_size: int = 1, batch_pos: int = 0, model_hash: str | None = None,
             hires: dict | None = None, lora_hashes: dict[str, str] | None = None) -> str:
    """The prompt, a "Negative prompt:" line, then "Key: value" pairs, as the A1111 web UI writes them;
    image browsers and web UIs read them back. Seed is the batch's (one generator draws the whole batch),
    with its size and the position. `size`: a side, or (height, width) — written "Size: WxH" as A1111 does.
    `hires`: {"Hires upscale" or "Hires resize", "Hires steps", "Hires upscaler"}; `lora_hashes`: name → short
    hash, written `Lora hashes: "name: hash, …"`."""
    h, w = (size, size) if isinstance(size, int) else size
    fields = {"Steps": steps, "Sampler": A1111_SAMPLERS.get(sampler, sampler),
              "Schedule type": sigmas.capitalize() if sigmas else None, "CFG scale": f"{guidance:g}", "Seed": seed,
              "Size": f"{w}x{h}", "Model hash": model_hash, "Model": model, "Denoising strength": strength,
              "Batch size": batch_size if batch_size > 1 else None, "Batch pos": batch_pos if batch_size > 1 else None,
              **(hires or {}),
              "Lora hashes": '"' + ", ".join(f"{k}: {v}" for k, v in lora_hashes.items()) + '"' if lora_hashes else None}
    # the root package is imported before any of its modules; read its version without importing it upward
    version = sys.modules["ldmkit"].__version__
    pairs = ", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None) + f", Version: ldmkit {version}"
    return "\n".join([prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else []) + [pairs])
