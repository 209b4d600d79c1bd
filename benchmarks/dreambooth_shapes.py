"""Issue 30's DreamBooth target on `shapes`: a new subject bound to a rare word, with and without prior preservation.

    python benchmarks/dreambooth_shapes.py --base runs/demo/diffusion --out runs/dreambooth-shapes
    python benchmarks/dreambooth_shapes.py --base runs/demo/diffusion --out runs/dreambooth-vocab \
        --class-prompts vocabulary --no-baseline

Instance data: 8 white diamonds (the extended vocabulary's; a square turned 45°), two per quadrant, in a kohya
folder `10_sks square/` captioned `a sks square in the {position}`. Two LoRA runs over the base (`shapes-lora`
at rank 8; the decoder first learns the images in 1,000 steps, as the demo's decoder cannot draw white or a
diamond): one with DreamBooth's prior preservation, one without. The class prompts: the issue's
`a {colour} square in the {position}` (6 basic colours x 4 positions, 96 images), or with `--class-prompts
vocabulary` every caption the base knows (the 72, 144 images), so the prior rehearses circles and triangles too.
Class images are drawn once by the base at the judge's guidance, with (squares' prompts) 64 more from the empty
prompt (`finetune.prior.unconditional`: the rest of what the base draws); the decoder keeps drawing from their
latents what it drew before (`finetune.finetune_decoder`'s rehearsal rows). `--targets` sets `lora.targets`.

Judged at unseen sampling seeds (25 dpmpp_2m steps, guidance 2), base and both runs, by the extended judge
(`ldmkit.evaluate.attributes`):
- `a sks square in the {position}` -> a white diamond in the named quadrant (strict: also drawn right,
  `shape_fidelity(...).passed`); target >= 85 %;
- the 72 original captions: colour / position / shape / strict shape (`score_captions(strict=True)`), target: each
  within 3 points of the base;
- `a {colour} square in the {position}` (the class): share of samples that come out white or turned (a diamond),
  target <= 5 %.
Prints a markdown table and the wall times; writes OUT/results.json and a grid per model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import draw, judged, markdown_table, pct, shapes_image, train_once, write_folder

POSITIONS = ("top left", "top right", "bottom left", "bottom right")
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta")
WORD = "sks"


def instance_folder(root: Path) -> Path:
    """8 white diamonds (2 per quadrant) in ROOT/10_sks square/, captioned `a sks square in the {position}`."""
    items = []
    for i in range(8):
        position = POSITIONS[i % 4]
        image, _ = shapes_image("diamond", "white", position, seed=100 + i)
        items.append((image, f"a {WORD} square in the {position}"))
    held_out = (shapes_image("diamond", "white", "top left", seed=99)[0], f"a {WORD} square in the top left")
    write_folder(root / f"10_{WORD} square", items, held_out, root=root)  # all 8 train; a 9th is held out
    return root


def judge(ldm, seeds: int, steps: int) -> tuple[dict, torch.Tensor]:
    from ldmkit.data.shapes import all_captions
    from ldmkit.evaluate.attributes import check_attributes, score_captions

    kw = dict(seeds=seeds, steps=steps)
    sks = [f"a {WORD} square in the {p}" for p in POSITIONS] * 4  # 16 a seed
    images, caps = draw(ldm, sks, **kw)
    res = {"sks": judged(images, [("white", "diamond", c.split(" in the ")[1]) for c in caps])}
    grid = images[:16]
    images, caps = draw(ldm, all_captions("basic"), **kw)
    res["original_72"] = score_captions(images, caps, "extended", strict=True)
    classes = [f"a {c} square in the {p}" for c in COLOURS for p in POSITIONS]
    images, _ = draw(ldm, classes, **kw)
    found = [check_attributes(img, "extended") for img in images]
    res["class_drift"] = {"white_or_turned": sum(f["colour"] == "white" or f["shape"] == "diamond" for f in found)
                          / len(found), "n": len(found)}
    return res, torch.cat([grid, images[:24]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the model to start from (e.g. runs/demo/diffusion)")
    p.add_argument("--out", default="runs/dreambooth-shapes", help="data, runs and results go here")
    p.add_argument("--steps", type=int, default=1000, help="LoRA steps of each run")
    p.add_argument("--batch", type=int, default=8, help="instance rows a step (the prior adds as many class rows)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--decoder-steps", type=int, default=1000, help="finetune.decoder_steps before the LoRA steps")
    p.add_argument("--decoder-lr", type=float, default=1e-3,
                   help="finetune.decoder_lr (5e-4 measured too: its diamonds fell to 79.7 %% strict on a second seed; "
                        "docs/finetune.md)")
    p.add_argument("--class-images", type=int, default=None,
                   help="finetune.prior.images (default: 96 for the squares' prompts, 144 for the vocabulary's)")
    p.add_argument("--prior-weight", type=float, default=1.0)
    p.add_argument("--class-guidance", type=float, default=2.0,
                   help="finetune.prior.guidance: the class images drawn as the judge samples (its default, 5, drew "
                        "the demo's triangles with rounder corners: 94.4 %% strict against 98.6 %% at 2)")
    p.add_argument("--class-prompts", choices=("squares", "vocabulary"), default="squares",
                   help="squares: the issue's `a {colour} square in the {position}` (24); vocabulary: every caption "
                        "the base knows (the 72 of `shapes`), so the prior rehearses circles and triangles too")
    p.add_argument("--unconditional", type=int, default=None,
                   help="finetune.prior.unconditional: empty-prompt images rehearsed beside the class images "
                        "(default: the config's 64 with the squares' prompts, 0 with the vocabulary's, which cover "
                        "everything the base draws already)")
    p.add_argument("--targets", default=None,
                   help="lora.targets, comma-separated layer-name suffixes (default: the config's; e.g. attn2.to_k,attn2.to_v)")
    p.add_argument("--seed", type=int, default=0, help="optim.seed of the runs (LoRA init, batches, decoder rows)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="one more training setting for both runs, as `ldmkit train --set` takes it (repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="skip the run without prior preservation")
    p.add_argument("--seeds", type=int, default=4, help="sampling seeds of the judge")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run of the whole script")
    args = p.parse_args()
    if args.quick:
        args.steps, args.batch, args.decoder_steps, args.class_images, args.seeds, args.sample_steps = 2, 2, 2, 8, 1, 2
    if args.class_images is None:
        args.class_images = 96 if args.class_prompts == "squares" else 144
    if args.threads:
        torch.set_num_threads(args.threads)
    import ldmkit

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = instance_folder(out / "instance")
    from ldmkit.data.shapes import all_captions

    classes = ([f"a {c} square in the {p}" for c in COLOURS for p in POSITIONS] if args.class_prompts == "squares"
               else all_captions("basic"))
    (out / "class_prompts.txt").write_text("".join(f"{c}\n" for c in classes))
    sets = [f"data.dataset={data}", "data.vocabulary=basic", "data.hflip=false", f"optim.steps={args.steps}",
            f"optim.batch_size={args.batch}", f"optim.seed={args.seed}", f"optim.lr={args.lr}", "optim.warmup_steps=0",
            f"lora.rank={args.rank}", f"lora.alpha={args.rank}", f"finetune.decoder_steps={args.decoder_steps}",
            f"finetune.decoder_lr={args.decoder_lr}",
            "logging.val_every=100000", "logging.ckpt_every=100000", f"sample.prompts=[a {WORD} square in the top left]"]
    if args.unconditional is None and args.class_prompts == "vocabulary":
        args.unconditional = 0
    if args.unconditional is not None:
        sets.append(f"finetune.prior.unconditional={args.unconditional}")
    if args.targets:
        sets.append(f"lora.targets=[{args.targets}]")
    sets += args.overrides
    prior = [f"finetune.prior.prompts={out / 'class_prompts.txt'}", f"finetune.prior.images={args.class_images}",
             f"finetune.prior.weight={args.prior_weight}",
             f"finetune.prior.guidance={args.class_guidance}", f"finetune.prior.cache={out / 'class_images'}"]
    t0 = time.time()
    runs = {"prior": out / "with-prior", "no_prior": out / "without-prior"}
    if args.no_baseline:
        del runs["no_prior"]
    seconds = {"prior": train_once(runs["prior"], args.base, "shapes-lora", sets + prior, args.threads)}
    if "no_prior" in runs:
        seconds["no_prior"] = train_once(runs["no_prior"], args.base, "shapes-lora", sets, args.threads)
    results: dict = {"args": vars(args), "train_wall_seconds": {k: round(v, 1) for k, v in seconds.items()}}
    from ldmkit.imageio import save_grid

    t1 = time.time()
    for name, path in (("base", args.base), *runs.items()):
        res, grid = judge(ldmkit.load(path), args.seeds, args.sample_steps)
        results[name] = res
        save_grid(grid, out / f"judged_{name}.png", nrow=8, upscale=2)
    results["judge_wall_seconds"] = round(time.time() - t1, 1)
    results["total_wall_seconds"] = round(time.time() - t0, 1)
    base72 = results["base"]["original_72"]
    rows = []
    for name, label in (("base", "base model"), ("prior", "LoRA + prior preservation"), ("no_prior", "LoRA, no prior")):
        if name not in results:
            continue
        r = results[name]
        o = r["original_72"]
        drop = max(100 * (base72[k] - o[k]) for k in ("colour", "position", "shape", "shape_strict"))
        rows.append([label, f"{pct(r['sks']['all'])} ({pct(r['sks']['strict'])})",
                     " / ".join(pct(o[k]) for k in ("colour", "position", "shape", "shape_strict")),
                     "–" if name == "base" else f"{drop:.1f}", pct(r["class_drift"]["white_or_turned"]),
                     "–" if name == "base" else f"{seconds[name]:.0f} s"])
    print(markdown_table(["model", f"`a {WORD} square …` → white diamond in place (strict)",
                          "72 captions colour / position / shape / strict shape", "largest drop (points)",
                          "class prompts white or turned", "train wall"], rows))
    print(f"n: {results['base']['sks']['n']} sks samples, {base72['n']} original, "
          f"{results['base']['class_drift']['n']} class samples per model; judging {results['judge_wall_seconds']} s, "
          f"whole script {results['total_wall_seconds']} s")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
