"""Stable Diffusion interoperability: diffusers modules and folders, and the original single file.

    import ldmkit
    from ldmkit.interop import convert, from_diffusers, to_diffusers
    ldm = ldmkit.load("sd-folder")              # diffusers pipeline folder → LatentDiffusion (CLIP)
    ldm = ldmkit.load("v1-5.safetensors", config="sd-folder")   # original single file
    convert("runs/demo/diffusion", "out/sd", "diffusers")

`ldmkit.load` is the one entry for reading a model from a path; for any format but ldmkit's own it
calls `convert.load_any`, which tells the formats apart and calls their readers.

Modules: `diffusers` (modules, model and pipeline folders), `original` (CompVis single-file key
maps), `convert` (format detection, `load_any`, `convert`, `convert_lora_file`), `lora` (LoRA files),
`presets` (SD VAE and full-model configs), `diffusers_unet` (the U-Net's config translation). Names are imported lazily, so
`import ldmkit.interop` stays light and diffusers is only needed when used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "from_diffusers": "ldmkit.interop.diffusers",
    "to_diffusers": "ldmkit.interop.diffusers",
    "load_diffusers_model": "ldmkit.interop.diffusers",
    "save_diffusers_model": "ldmkit.interop.diffusers",
    "load_diffusers_pipeline": "ldmkit.interop.diffusers",
    "save_diffusers_pipeline": "ldmkit.interop.diffusers",
    "load_original": "ldmkit.interop.original",
    "save_original": "ldmkit.interop.original",
    "detect_format": "ldmkit.interop.convert",
    "load_any": "ldmkit.interop.convert",
    "convert": "ldmkit.interop.convert",
    "FORMATS": "ldmkit.interop.convert",
    "SD_PRESETS": "ldmkit.interop.presets",
    "VAE_PRESETS": "ldmkit.interop.presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ldmkit.interop' has no attribute {name!r}")
