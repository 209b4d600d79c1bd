"""Issue 30's masked-loss target on `shapes`: images whose unmasked part is noise train as well as clean images.

    python benchmarks/masked_loss.py --base runs/demo/diffusion --out runs/masked-loss

Data: 144 `shapes` drawings (each of the 72 captions twice, jittered), captioned as the bundled set is. The noisy
copy replaces every pixel outside the shape's mask dilated by `--dilate` pixels with uniform noise (0-255 per
channel); that dilated mask is written beside each noisy image as NAME_mask.png. Three full U-Net fine-tunes of the
same starting model (`--base`), the same steps, batch and seed:

    clean            the clean images (no mask)
    noisy + mask     the noisy images, data.mask=files: only the latent cells the mask covers train
    noisy, no mask   the noisy images, the whole image trained

The metric, on the 72 captions x `--seeds` unseen sampling seeds (25 dpmpp_2m steps, guidance 2):
- strict all: the extended judge reads the caption's colour, position and shape, and the shape is drawn right
  (`score_captions(strict=True)["all_strict"]`), beside colour / position / strict shape;
- background: the mean brightness (max over RGB, 0-255) of the pixels outside the caption's nominal shape dilated
  by 3 pixels, averaged over samples (clean shapes: ~0; uniform noise: ~191), and the share of samples whose
  background is clean (mean below 8).
"Matches clean training" means: noisy + mask within a few points of clean on strict all, and a clean background.
Prints a markdown table and the wall times; writes OUT/results.json and a grid per model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from common import draw, markdown_table, pct, shapes_image, train_once, write_folder


def folders(out: Path, n: int, dilate: int) -> dict[str, Path]:
    from scipy import ndimage

    from ldmkit.data.shapes import COMBOS, caption

    clean, noisy, masked = [], [], []
    rng = np.random.default_rng(0)
    for i in range(n):
        shape, colour, position = COMBOS[i % len(COMBOS)]
        image, mask = shapes_image(shape, colour, position, seed=300 + i)
        keep = ndimage.binary_dilation(mask, iterations=dilate)  # (H, W): the shape and a margin around it
        dirty = np.where(keep[..., None], image, rng.integers(0, 256, image.shape, dtype=np.uint8))
        text = caption(shape, colour, position)
        clean.append((image, text))
        noisy.append((dirty.astype(np.uint8), text))
        masked.append((dirty.astype(np.uint8), text, (keep * 255).astype(np.uint8)))
    paths = {"clean": out / "data-clean", "masked": out / "data-noisy-masked", "noisy": out / "data-noisy"}
    for key, items in (("clean", clean), ("masked", masked), ("noisy", noisy)):
        write_folder(paths[key], items)
    return paths


def background(images: torch.Tensor, captions: list[str]) -> tuple[float, float]:
    """(mean background brightness 0-255, share of samples whose background is clean): pixels outside the
    caption's nominal (jitter-free) shape dilated by 3 pixels."""
    from scipy import ndimage

    from ldmkit.data.shapes import parse_caption, render_shape

    levels = []
    for img, text in zip(images, captions):
        shape, colour, position = parse_caption(text)
        _, mask, _ = render_shape(shape, colour, position, img.shape[-1])
        outside = ~ndimage.binary_dilation(mask, iterations=3)
        pixels = ((img.clamp(-1, 1) + 1) * 127.5).amax(0).numpy()  # (H, W) brightness
        levels.append(float(pixels[outside].mean()))
    return float(np.mean(levels)), float(np.mean([lv < 8 for lv in levels]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the starting model (e.g. runs/demo/diffusion)")
    p.add_argument("--out", default="runs/masked-loss", help="data, runs and results go here")
    p.add_argument("--images", type=int, default=144)
    p.add_argument("--dilate", type=int, default=2, help="mask margin around the shape, pixels")
    p.add_argument("--steps", type=int, default=500, help="fine-tuning steps of each arm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seeds", type=int, default=3, help="sampling seeds of the judge")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run of the whole script")
    args = p.parse_args()
    if args.quick:
        args.images, args.steps, args.batch, args.seeds, args.sample_steps = 16, 2, 4, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import ldmkit
    from ldmkit.data.shapes import all_captions
    from ldmkit.evaluate.attributes import score_captions
    from ldmkit.imageio import save_grid

    out = Path(args.out)
    data = folders(out, args.images, args.dilate)
    common = ["data.vocabulary=basic", "data.hflip=false", "finetune.decoder_steps=0", f"optim.steps={args.steps}",
              f"optim.batch_size={args.batch}", f"optim.lr={args.lr}", "optim.warmup_steps=0",
              "logging.val_every=100000", "logging.ckpt_every=100000"]
    arms = {"clean": [f"data.dataset={data['clean']}"],
            "noisy + mask": [f"data.dataset={data['masked']}", "data.mask=files"],
            "noisy, no mask": [f"data.dataset={data['noisy']}"]}
    t0 = time.time()
    runs, seconds = {}, {}
    for name, sets in arms.items():
        runs[name] = out / ("run-" + name.replace(" + ", "-").replace(", ", "-").replace(" ", "-"))
        seconds[name] = train_once(runs[name], args.base, "shapes-finetune", common + sets, args.threads)
    t1 = time.time()
    results: dict = {"args": vars(args), "train_wall_seconds": {k: round(v, 1) for k, v in seconds.items()}}
    rows = []
    for name, path in (("base", args.base), *runs.items()):
        images, caps = draw(ldmkit.load(path), all_captions("basic"), args.seeds, args.sample_steps)
        s = score_captions(images, caps, "extended", strict=True)
        level, clean_share = background(images, caps)
        results[name] = {**s, "background": level, "clean_background": clean_share}
        save_grid(images[:72], out / f"judged_{name.replace(' ', '_').replace(',', '').replace('+', 'and')}.png",
                  nrow=12, upscale=2)
        rows.append([name if name != "base" else "starting model", pct(s["all_strict"]),
                     " / ".join(pct(s[k]) for k in ("colour", "position", "shape_strict")), f"{level:.1f}",
                     pct(clean_share), "–" if name == "base" else f"{seconds[name]:.0f} s"])
    results["judge_wall_seconds"] = round(time.time() - t1, 1)
    results["total_wall_seconds"] = round(time.time() - t0, 1)
    print(markdown_table(["trained on", "strict all", "colour / position / strict shape", "background (0-255)",
                          "clean backgrounds", "train wall"], rows))
    print(f"n = {results['base']['n']} samples per model (72 captions x {args.seeds} seeds); judging "
          f"{results['judge_wall_seconds']} s, whole script {results['total_wall_seconds']} s")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
