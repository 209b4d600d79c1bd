"""`ldmkit sample`: draw images from a trained LatentDiffusion and write them as PNGs.

Writes OUT/0000.png, OUT/0001.png, … (one per sample, prompts in order, `num_per_prompt` each)
and OUT/grid.png (DESIGN.md contract). The same seed and arguments give the same images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldmkit.errors import LdmkitError
from ldmkit.imageio import make_dir, open_image, save_grid, save_png, to_rgb, to_uint8


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


def read_image(path: str | Path, channels: int, size: int, name: str, signed: bool) -> torch.Tensor:
    """A PNG/JPEG/... file → (1, channels, size, size): opened as the image-folder loader opens files
    (`ldmkit.imageio`: EXIF orientation, 16-bit scaled, palette expanded, transparency on white, oversized
    headers refused), as RGB or gray, resized (bicubic for images, nearest for masks) when its size
    differs; values in [-1, 1] when `signed`, else [0, 1]. A file that is not a usable image or not square
    is refused with one LdmkitError naming `name`."""
    import numpy as np
    from PIL import Image

    img = to_rgb(open_image(path, what=name))
    if channels == 1:
        img = img.convert("L")
    if img.width != img.height:
        raise LdmkitError(f"{name} {path} is {img.width}x{img.height}; the model needs a square {size}x{size} image "
                          "(crop it first: resizing would distort it)")
    if img.width != size:
        img = img.resize((size, size), Image.BICUBIC if channels == 3 else Image.NEAREST)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).reshape(size, size, channels).permute(2, 0, 1)[None]  # (1, C, S, S) in [0, 1]
    return x * 2 - 1 if signed else x


# ldmkit sampler → the name the A1111 web UI writes (and its readers expect) in a PNG's parameters
A1111_SAMPLERS = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M", "unipc": "UniPC", "euler": "Euler",
                  "euler_a": "Euler a", "lcm": "LCM"}


def infotext(prompt: str, negative_prompt: str | None, steps: int, sampler: str, guidance: float, seed: int,
             size: int, model: str | None = None, sigmas: str | None = None, strength: float | None = None,
             batch_size: int = 1, batch_pos: int = 0, model_hash: str | None = None) -> str:
    """The generation parameters as the A1111 web UI writes them into a PNG's `parameters` chunk: the
    prompt, a "Negative prompt:" line, then "Key: value" pairs; image browsers and web UIs read it
    back. Seed is the batch's (one generator draws the whole batch), with its size and the position."""
    fields = {"Steps": steps, "Sampler": A1111_SAMPLERS.get(sampler, sampler),
              "Schedule type": sigmas.capitalize() if sigmas else None, "CFG scale": f"{guidance:g}", "Seed": seed,
              "Size": f"{size}x{size}", "Model hash": model_hash, "Model": model, "Denoising strength": strength,
              "Batch size": batch_size if batch_size > 1 else None, "Batch pos": batch_pos if batch_size > 1 else None}
    from ldmkit import __version__

    pairs = ", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None) + f", Version: ldmkit {__version__}"
    return "\n".join([prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else []) + [pairs])


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
    seed: int = 0,
    batch_size: int = 64,
    guidance_rescale: float = 0.0,
    progress: bool = True,
    negative_prompt: str | None = None,
    model_name: str | None = None,
    model_hash: str | None = None,
    **spatial,
) -> list[Path]:
    """Sample and write PNGs, each with its generation parameters in an A1111-style `parameters` text
    chunk (`infotext`); returns the written paths (grid last). `spatial`: init_image, mask, strength,
    control, control_image, control_scale, sigmas as `LatentDiffusion.sample` takes them (tensors
    with a batch of 1 apply to every sample)."""
    classes = ldm.config.conditioner.num_classes
    bad = [lab for lab in labels or [] if not 0 <= lab < classes]
    if bad:  # refused before any folder is made or any sample is drawn
        raise LdmkitError(f"--label {bad[0]}: this model has no label route" if not classes else
                          f"--label {bad[0]}: this model has {classes} classes, 0..{classes - 1}")
    out = make_dir(out)
    if prompts and labels and len(prompts) != len(labels):
        raise LdmkitError(f"got {len(prompts)} prompts and {len(labels)} labels; give one label per prompt or none")
    base = len(prompts) if prompts else len(labels) if labels else (num_samples or 1)
    rep = num_per_prompt if (prompts or labels) else 1
    texts = [p for p in prompts for _ in range(rep)] if prompts else None
    labs = [lab for lab in labels for _ in range(rep)] if labels else None
    total = base * rep
    images = []
    bar = tqdm(total=total, desc="sampling", disable=not progress, unit="img")
    for i in range(0, total, batch_size):
        j = min(total, i + batch_size)
        # One seed per batch, derived from --seed: the same arguments give the same images.
        imgs = ldm.sample(
            texts=texts[i:j] if texts else None,
            labels=labs[i:j] if labs else None,
            num_samples=j - i,
            steps=steps, sampler=sampler, guidance=guidance, guidance_rescale=guidance_rescale, seed=seed + i,
            negative_prompt=negative_prompt, **spatial,
        )
        images.append(imgs.float().cpu())
        bar.update(j - i)
    bar.close()
    images = torch.cat(images)
    from PIL import Image

    paths = []
    strength = spatial.get("strength", 1.0) if spatial.get("init_image") is not None else None
    for k, img in enumerate(images):
        p = out / f"{k:04d}.png"
        first = k - k % batch_size  # the batch this image was drawn in, and its seed
        params = infotext(texts[k] if texts else "", negative_prompt, steps, sampler, guidance, seed + first,
                          ldm.config.image_size, model_name, spatial.get("sigmas"), strength,
                          batch_size=min(batch_size, total - first), batch_pos=k - first, model_hash=model_hash)
        save_png(Image.fromarray(to_uint8(img)), p, text={"parameters": params})
        paths.append(p)
    save_grid(images, out / "grid.png", nrow=rep if rep > 1 else None, upscale=max(1, 128 // images.shape[-1]))
    paths.append(out / "grid.png")
    return paths
