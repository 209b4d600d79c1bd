"""Issue 15's measurement: teach a shapes-text model the words `white` and `diamond` by fine-tuning.

    ldmkit --threads 1 train --init-from runs/demo/diffusion --config shapes-lora --out runs/lora/shapes-lora
    python benchmarks/lora_shapes.py --run runs/lora/shapes-lora --base runs/demo/diffusion

Judges a finished `--init-from` run on every caption of the extended vocabulary x --seeds (25 dpmpp_2m
steps, guidance 2, sampling seeds the training never drew from) with the attribute checker's extended
words, the 40 captions with white and/or diamond apart from the 72 old ones; and the same for the base
model, whose first stage and U-Net never saw the new words. Also the first stages' own reconstructions
of held-out new-word images: the ceiling any U-Net can reach with that decoder (the demo's decodes
white as orange-red and a diamond as a teardrop, which is why shapes-lora fine-tunes the decoder first).

Each score has the strict shape rate beside the class ones (`shape_strict`, `all_strict`: the shape also drawn
right, docs/shape-judge.md). Prints one JSON object and writes RUN/judged.json and RUN/judged.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import ldmkit
from ldmkit.checkpoint import read_config
from ldmkit.data.shapes import ShapesDataset, all_captions, combos, is_new
from ldmkit.evaluate.attributes import score_captions
from ldmkit.imageio import save_grid
from ldmkit.generation.compat import sample as ldm_sample  # the old sample keywords as a GenerationRequest


def first_stage_ceiling(ae, seed: int = 5, n: int = 448) -> dict:
    """The first stage's reconstructions of held-out images with new words, judged like samples."""
    ds = ShapesDataset(size=32, length=n, seed=seed, split="val", vocabulary="extended")
    items = [ds[i] for i in range(n)]
    keep = [it for it in items if {"white", "diamond"} & set(it["text"].split())]
    x = torch.stack([it["image"] for it in keep])
    with torch.no_grad():
        y = ae.decode(ae.encode(x).mean).clamp(-1, 1)
    return score_captions(y, [it["text"] for it in keep], "extended", strict=True)


def judge(ldm, seeds: int, grid: Path | None = None) -> dict:
    caps = all_captions("extended")
    images = torch.cat([ldm_sample(ldm, texts=caps, seed=7000 + 97 * s, steps=25, sampler="dpmpp_2m", guidance=2.0)
                        for s in range(seeds)])
    new = torch.tensor([is_new(c) for c in combos("extended")] * seeds)
    every = caps * seeds
    if grid is not None:
        save_grid(images[: len(caps)], grid, nrow=16, upscale=2)
    return {key: score_captions(images[keep], [c for c, k in zip(every, keep) if k], "extended", strict=True)
            for key, keep in (("new_words", new), ("original_72", ~new))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the fine-tuned run (`ldmkit train --init-from ...`)")
    p.add_argument("--base", default=None, help="the model it started from, judged the same way")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    _, _, _, meta = read_config(run)
    res: dict = {"run": str(run), "finetune": meta.get("finetune"), "train_seconds": meta.get("train_seconds"),
                 "decoder": meta.get("decoder"), "lora": meta.get("lora")}
    t0 = time.time()
    model = ldmkit.load(run)
    res["run_scores"] = judge(model, args.seeds, run / "judged.png")
    res["run_first_stage"] = first_stage_ceiling(model.autoencoder)
    if args.base:
        base = ldmkit.load(args.base)
        res["base_scores"] = judge(base, args.seeds)
        res["base_first_stage"] = first_stage_ceiling(base.autoencoder)
    res["judge_seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=2))
    (run / "judged.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
