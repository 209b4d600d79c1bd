"""Issue 30's textual-inversion target on `shapes`: a new word learned with every weight of the model frozen.

    python benchmarks/inversion_shapes.py --base runs/demo/diffusion --out runs/inversion-shapes

Data: 8 yellow triangles, two per quadrant, captioned `a <word> in the {position}` (WORD: `--word`, default
"sks"). `finetune.train=embedding` learns WORD's vectors (`--vectors`, initialised from `--init`); the U-Net, first
stage and text encoder stay as they are. Judged at unseen sampling seeds (25 dpmpp_2m steps, guidance 2):
- `a WORD in the {position}` with the learned embedding -> a yellow triangle in the named quadrant (and strict:
  drawn right, `shape_fidelity(...).passed`), beside the base without it; target >= 80 %;
- the 72 original captions give the same images for the same seed with and without the embedding: asserted,
  max abs pixel difference 0, and their strict scores printed.
Prints a markdown table and the wall times; writes OUT/results.json and OUT/judged.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import draw, judged, markdown_table, pct, shapes_image, train_once, write_folder

POSITIONS = ("top left", "top right", "bottom left", "bottom right")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the frozen model (e.g. runs/demo/diffusion)")
    p.add_argument("--out", default="runs/inversion-shapes", help="data, the run and results go here")
    p.add_argument("--word", default="sks", help="finetune.embedding.token: the placeholder the captions use")
    p.add_argument("--init", default="shape", help="finetune.embedding.init: the word its vectors start from")
    p.add_argument("--vectors", type=int, default=2, help="finetune.embedding.vectors")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seeds", type=int, default=4, help="sampling seeds of the judge")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run of the whole script")
    args = p.parse_args()
    if args.quick:
        args.steps, args.batch, args.seeds, args.sample_steps = 2, 4, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import ldmkit
    from ldmkit.conditioning.embeddings import attach_embeddings
    from ldmkit.data.shapes import all_captions
    from ldmkit.evaluate.attributes import score_captions
    from ldmkit.imageio import save_grid

    out = Path(args.out)
    items = []
    for i in range(8):
        image, _ = shapes_image("triangle", "yellow", POSITIONS[i % 4], seed=200 + i)
        items.append((image, f"a {args.word} in the {POSITIONS[i % 4]}"))
    # a kohya repeat folder: 10 passes over the 8 images make an epoch, so a batch of 16 fits it (a plain folder of
    # 8 images holds fewer than one batch and is refused)
    write_folder(out / "data" / f"10_{args.word}", items, root=out / "data")
    t0 = time.time()
    run = out / "run"
    seconds = train_once(run, args.base, "shapes-lora", [
        f"data.dataset={out / 'data'}", "data.vocabulary=basic", "data.hflip=false", "finetune.train=embedding",
        "finetune.decoder_steps=0", f"finetune.embedding.token={args.word}", f"finetune.embedding.init={args.init}",
        f"finetune.embedding.vectors={args.vectors}", f"optim.steps={args.steps}", f"optim.batch_size={args.batch}",
        f"optim.lr={args.lr}", "optim.warmup_steps=0", "optim.weight_decay=0", "logging.val_every=100000",
        "logging.ckpt_every=100000", f"sample.prompts=[a {args.word} in the top left]"], args.threads)
    t1 = time.time()
    prompts = [f"a {args.word} in the {p}" for p in POSITIONS] * 4  # 16 a seed
    want = [("yellow", "triangle", c.split(" in the ")[1]) for c in prompts] * args.seeds
    base = ldmkit.load(args.base)
    without, _ = draw(base, prompts, args.seeds, args.sample_steps)
    original = all_captions("basic")
    before, caps = draw(base, original, args.seeds, args.sample_steps)
    attach_embeddings(base.conditioner, run / "embeddings")  # the base, now reading WORD as its vectors
    learned, _ = draw(base, prompts, args.seeds, args.sample_steps)
    after, _ = draw(base, original, args.seeds, args.sample_steps)
    diff = (before - after).abs().max().item()
    assert diff == 0, f"the 72 original captions changed with the embedding loaded: max abs difference {diff}"
    results = {"args": vars(args), "train_wall_seconds": round(seconds, 1),
               "word_with_embedding": judged(learned, want), "word_without_embedding": judged(without, want),
               "original_72": score_captions(before, caps, "extended", strict=True), "original_72_max_abs_diff": diff,
               "judge_wall_seconds": round(time.time() - t1, 1), "total_wall_seconds": round(time.time() - t0, 1)}
    save_grid(torch.cat([learned[:16], without[:16]]), out / "judged.png", nrow=8, upscale=2)
    rows = [[f"`a {args.word} in the …` + learned embedding", pct(results["word_with_embedding"]["all"]),
             pct(results["word_with_embedding"]["strict"])],
            [f"`a {args.word} in the …`, base alone", pct(results["word_without_embedding"]["all"]),
             pct(results["word_without_embedding"]["strict"])]]
    print(markdown_table(["prompt", "yellow triangle in the named quadrant", "strict (drawn right)"], rows))
    o = results["original_72"]
    print(f"72 original captions x {args.seeds} seeds: identical images with and without the embedding (max abs "
          f"difference {diff}); colour / position / shape / strict shape {pct(o['colour'])} / {pct(o['position'])} / "
          f"{pct(o['shape'])} / {pct(o['shape_strict'])}")
    print(f"n = {results['word_with_embedding']['n']} word samples; train {seconds:.0f} s wall, judging "
          f"{results['judge_wall_seconds']} s, whole script {results['total_wall_seconds']} s")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
