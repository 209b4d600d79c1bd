"""`ldmkit sample`: draw images from a trained LatentDiffusion and write them as PNGs.

Writes OUT/0000.png, OUT/0001.png, … (one per sample, prompts in order, `num_per_prompt` each)
and OUT/grid.png (DESIGN.md contract). The same seed and arguments give the same images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldmkit.errors import LdmkitError
from ldmkit.generation import A1111_SAMPLERS, GenerationRequest, fit, generate, infotext, tiny_decoder
from ldmkit.imageio import make_dir, open_image, save_grid, save_png, to_rgb, to_uint8

__all__ = ["A1111_SAMPLERS", "infotext", "read_image", "read_prompts_file", "read_tiny_decoder", "sample_to_folder"]


def load_skip(backend: str, path: str | Path, config=None, cache_dir: str | Path | None = None,
              device="cpu", ema: bool = True, precision: str = "auto") -> tuple[str | None, frozenset[str]]:
    """(`source_key`, the parts `ldmkit.load(…, skip=…)` may leave unread) for a model about to be loaded from
    `path` (with `config`, `ema`) and given to `with_backend` unchanged (with `precision`), as `ldmkit sample` and
    `serve` do; (None, nothing) for the torch backend or another device than the CPU."""
    from ldmkit.checkpoint import source_files
    from ldmkit.generation.openvino import cached_parts, source_key

    if backend != "openvino" or torch.device(device).type != "cpu":
        return None, frozenset()
    key = source_key(source_files(path, config), ema)
    return key, cached_parts(cache_dir, key, precision)


def read_prompts_file(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LdmkitError(f"prompts file {path} does not exist") from None
    except UnicodeDecodeError:
        raise LdmkitError(f"prompts file {path} is not UTF-8 text; give one prompt per line") from None
    except OSError as e:
        raise LdmkitError(f"cannot read prompts file {path}: {e.strerror}") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise LdmkitError(f"prompts file {path} has no prompts; write one prompt per line")
    return prompts


def read_tiny_decoder(path: str | Path, model, device: torch.device | str = "cpu", flag: str = "--tiny-decoder"):
    """The decoder `generate(decoder=…)` takes, from a tiny autoencoder folder: a diffusers `AutoencoderTiny`
    folder (TAESD) or an ldmkit one (`ldmkit distill-decoder`), checked to decode `model`'s latents."""
    import ldmkit

    if not Path(path).exists():
        raise LdmkitError(f"{flag} {path} does not exist; give a diffusers AutoencoderTiny folder or a folder from "
                          "`ldmkit distill-decoder`")
    return tiny_decoder(model, ldmkit.load(path, device=device), f"{flag} {path}")


def read_image(path: str | Path, channels: int, size: int | tuple[int, int] | None, name: str, signed: bool,
               resize_mode: int = 0) -> torch.Tensor:
    """A PNG/JPEG/... file → (1, channels, H, W): opened as the image-folder loader opens files
    (`ldmkit.imageio`: EXIF orientation, 16-bit scaled, palette expanded, transparency on white, oversized
    headers refused), as RGB or gray; values in [-1, 1] when `signed`, else [0, 1]. `size` None keeps the
    file's own size (generation fits it to the request with its resize mode); a side or (height, width)
    fits it here with `resize_mode` (`ldmkit.generation.fit`). A file that is not a usable image is refused
    with one LdmkitError naming `name`."""
    import numpy as np

    img = to_rgb(open_image(path, what=name))
    if channels == 1:
        img = img.convert("L")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).reshape(img.height, img.width, channels).permute(2, 0, 1)[None]  # (1, C, H, W) in [0, 1]
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        x = fit(x, h, w, resize_mode, "bicubic" if channels == 3 else "nearest")
    return x * 2 - 1 if signed else x


def sample_to_folder(
    ldm,
    out: str | Path,
    prompts: list[str] | None = None,
    labels: list[int] | None = None,
    num_per_prompt: int = 1,
    num_samples: int | None = None,
    steps: int = 25,
    sampler: str = "dpmpp_2m",
    guidance: float = 1.0,
    seed: int | None = 0,
    batch_size: int = 64,
    guidance_rescale: float = 0.0,
    progress: bool = True,
    negative_prompt: str | None = None,
    model_name: str | None = None,
    model_hash: str | None = None,
    control=None,
    networks=None,
    decoder=None,
    **fields,
) -> list[Path]:
    """Sample and write PNGs, each with its generation parameters in an A1111-style `parameters` text
    chunk (`infotext`); returns the written paths (grid last). `fields`: the other GenerationRequest fields
    (height, width, init_image, mask, strength, resize_mode, control_image, control_scale, hires, loras…;
    `sigmas` is read as `spacing`); `control` a ControlNet/adapter, `networks` a LoRA library for <lora:> tags,
    `decoder` latents → images instead of the model's first stage (`read_tiny_decoder`).
    Batches of `batch_size`, batch k seeded seed + k·batch_size (`GenerationRequest.batches`)."""
    classes = ldm.config.conditioner.num_classes
    bad = [lab for lab in labels or [] if not 0 <= lab < classes]
    if bad:  # refused before any folder is made or any sample is drawn
        raise LdmkitError(f"--label {bad[0]}: this model has no label route" if not classes else
                          f"--label {bad[0]}: this model has {classes} classes, 0..{classes - 1}")
    if prompts and labels and len(prompts) != len(labels):
        raise LdmkitError(f"got {len(prompts)} prompts and {len(labels)} labels; give one label per prompt or none")
    base = len(prompts) if prompts else len(labels) if labels else (num_samples or 1)
    rep = num_per_prompt if (prompts or labels) else 1
    texts = [p for p in prompts for _ in range(rep)] if prompts else None
    labs = [lab for lab in labels for _ in range(rep)] if labels else None
    total = base * rep
    if "sigmas" in fields:
        fields["spacing"] = fields.pop("sigmas")
    request = GenerationRequest(prompt=texts, labels=labs, negative_prompt=negative_prompt, num_images=total,
                                batch_size=min(batch_size, total), steps=steps, sampler=sampler, guidance=guidance,
                                guidance_rescale=guidance_rescale, seed=seed, model_name=model_name,
                                model_hash=model_hash, **fields)
    request.check(ldm, control)  # before any folder is made
    out = make_dir(out)
    bar = tqdm(total=-(-total // request.batch_size) * steps, desc="sampling", disable=not progress, unit="step")
    result = generate(ldm, request, lambda *_: bar.update(1), control=control, networks=networks, decoder=decoder)
    bar.close()
    from PIL import Image

    paths = []
    for k, (img, params) in enumerate(zip(result.images, result.parameters)):
        p = out / f"{k:04d}.png"
        save_png(Image.fromarray(to_uint8(img)), p, text={"parameters": params})
        paths.append(p)
    images = result.images
    save_grid(images, out / "grid.png", nrow=rep if rep > 1 else None, upscale=max(1, 128 // images.shape[-1]))
    paths.append(out / "grid.png")
    return paths
