"""DreamBooth's prior preservation (Ruiz et al. 2023, "DreamBooth", eq. 2):

    L = E ‖x̂_θ(α_t x + σ_t ε, t, c) − x‖²  +  λ · E ‖x̂_θ(α_t' x_pr + σ_t' ε', t', c_pr) − x_pr‖²
        (instance images x, their captions c)     (class images x_pr the *starting* model drew from class prompts c_pr)

The second term keeps the class (`a dog`, `a square`) meaning what it meant while the first teaches the instance
(`a sks dog`): without it, fine-tuning on a few images drags the whole class toward them ("language drift").

- Class images: `finetune.prior.images` N of them, image i drawn from class prompt i mod P by the model training
  starts from, before any step (and before `finetune.decoder_steps`). They are generated in fixed blocks of `BLOCK`
  (block k one `generate` call seeded `prior.seed` + k·BLOCK, so an image depends on its index alone, never on where
  a killed run stopped), written atomically one PNG + one caption file each, and skipped when present: a run killed
  mid-way resumes the generation; `--resume`, and a second run pointing `prior.cache` at the same folder, generate
  nothing. The folder is CACHE/KEY (CACHE: `prior.cache`, default OUT/class_images), KEY a digest of the model's
  weights (first stage, U-Net, text encoder), the prompts, N, the seed and the sampling settings, so another model
  or other prompts never reuse images; CACHE/KEY/key.json says what the digest covers.
- Unconditional images: `finetune.prior.unconditional` more drawn the same way from the empty prompt (guidance 1),
  in a cache folder of their own, follow the class images: the class rows train them with the empty prompt, and the
  decoder steps rehearse them. The class prompts name one class; these stand for the rest of what the model draws.
- Batches: each step trains its B instance rows and B class rows (the batch doubled: half instance, half class, as
  diffusers' train_dreambooth.py concatenates them); class row j of step k is class image perm_e[(k·B + j) mod N]
  with a fresh permutation per pass e over the class images, a function of (seed, k, j), so `--resume` stays exact.
  Class rows draw their noise and timesteps from a generator of their own, not the instance rows' (`prior_random`).
- The step's loss is instance + λ·prior (each the mean over its rows); both are logged (`instance_loss`, `prior_loss`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmkit.errors import LdmkitError
from ldmkit.generation import GenerationRequest, generate
from ldmkit.imageio import atomic_write, open_image, save_png, to_uint8
from ldmkit.rng import BatchRandom
from ldmkit.train.latents import _sha256_tensors

BLOCK = 8  # class images per `generate` call (fixed blocks: an image depends on its index only)
CLASS_DIR = "class_images"


def read_prompts(path: str) -> list[str]:
    """The class prompts of FILE, one a line (blank lines skipped); one line saying what is wrong otherwise."""
    p = Path(path)
    if not p.is_file():
        raise LdmkitError(f"finetune.prior.prompts: {path} is not a file; give a text file of class prompts, one a line")
    try:
        prompts = [line.strip() for line in p.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise LdmkitError(f"finetune.prior.prompts: {path} is not UTF-8 text") from None
    if not prompts:
        raise LdmkitError(f"finetune.prior.prompts: {path} holds no prompt")
    return prompts


def cache_key(ldm, prompts: list[str], n: int, seed: int, steps: int, guidance: float, size: int) -> tuple[str, dict]:
    """(folder name, what it is a digest of): the model's weights (the text encoder's too, which its state dict
    leaves out), the prompts and the generation settings."""
    sd = ldm.state_dict()
    enc = ldm.conditioner.text_encoder
    if enc is not None and isinstance(getattr(enc, "model", None), torch.nn.Module):
        sd.update({f"text_encoder.{k}": v for k, v in enc.model.state_dict().items()})
    ingredients = {"format": 1, "model_sha256": _sha256_tensors((k, sd[k]) for k in sorted(sd)),
                   "prompts": prompts, "images": n, "seed": seed, "steps": steps, "guidance": guidance, "size": size}
    text = json.dumps(ingredients, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24], ingredients


def class_images(ldm, prompts: list[str], n: int, seed: int, steps: int, guidance: float, size: int,
                 cache: Path) -> tuple[torch.Tensor, list[str], Path, int]:
    """The N class images (N, 3, size, size) in [-1, 1] as read back from their PNGs, their prompts, their folder,
    and how many `generate` calls this made (0 when the cache held them all)."""
    key, ingredients = cache_key(ldm, prompts, n, seed, steps, guidance, size)
    folder = cache / key
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "key.json").is_file():
        atomic_write(folder / "key.json", (json.dumps(ingredients, indent=1) + "\n").encode())
    calls = 0
    for first in range(0, n, BLOCK):
        rows = range(first, min(n, first + BLOCK))
        if all(_png(folder, i).is_file() for i in rows):
            continue
        texts = [prompts[i % len(prompts)] for i in rows]
        request = GenerationRequest(prompt=texts, num_images=len(texts), batch_size=len(texts), seed=seed + first,
                                    steps=steps, guidance=guidance, height=size, width=size)
        images = generate(ldm, request).images  # (b, 3, size, size) in [-1, 1]
        calls += 1
        for i, img, text in zip(rows, images, texts):
            if not _png(folder, i).is_file():  # the caption first, the PNG last: a PNG present is a finished image
                atomic_write(folder / f"{i:05d}.txt", text.encode())
                save_png(Image.fromarray(to_uint8(img)), _png(folder, i), {"parameters": f"{text}\nSeed: {seed + first}"})
    images, texts = [], []
    for i in range(n):
        im = open_image(_png(folder, i), what="class image").convert("RGB")
        images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1)  # (3, H, W)
        texts.append((folder / f"{i:05d}.txt").read_text(encoding="utf-8"))
    return torch.stack(images), texts, folder, calls


def _png(folder: Path, i: int) -> Path:
    return folder / f"{i:05d}.png"


def class_rows(step: int, lo: int, hi: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Indices of the class images in rows [lo, hi) of step `step`'s class batch: position p = step·B + j of an
    endless stream of passes over the N images, each pass a permutation seeded by (seed, pass)."""
    perms: dict[int, torch.Tensor] = {}
    out = []
    for j in range(lo, hi):
        epoch, k = divmod(step * batch_size + j, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + 7_919 * epoch + 1))
        out.append(int(perms[epoch][k]))
    return torch.tensor(out, dtype=torch.long)


def prior_random(seed: int, step: int, batch_size: int, lo: int, hi: int) -> BatchRandom:
    """The class rows' draws (latent sample, noise, timesteps, caption dropout) for step `step`: a generator of their
    own, seeded by a hash of (seed, step) so its stream is not the instance rows' (`rng.step_generator`)."""
    digest = hashlib.blake2b(f"ldmkit prior {seed} {step}".encode(), digest_size=8).digest()
    return BatchRandom(torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1), batch_size, lo, hi)
