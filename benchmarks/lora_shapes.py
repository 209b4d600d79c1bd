"""Issue 15's measurement: teach a shapes-text model the words `white` and `diamond` by fine-tuning.

    python benchmarks/lora_shapes.py --base runs/demo/diffusion --out runs/lora --mode lora [--decoder-steps 400]

Steps, each timed (wall clock; say how loaded the machine was):

0. (--decoder-steps N > 0) the first stage cannot draw what it never saw: the demo's autoencoder,
   trained on 6 colours x 3 shapes, decodes white as orange-red and a diamond as a teardrop, so no
   U-Net can be judged right on them. This step fine-tunes the *decoder* alone (the encoder, hence
   the latents and their scale, stay as they were) on the extended vocabulary, L2 reconstruction,
   the 72 old combinations rehearsed; the base model is written again with that decoder
   (OUT/base-decoder), and the next step starts from it.
1. `ldmkit train --init-from BASE --config shapes-lora` (or shapes-finetune for --mode unet).
2. Judge: every extended caption x --seeds, 25 dpmpp_2m steps, guidance 2, seeds the training never
   used; the attribute checker's extended vocabulary; the 40 captions with white and/or diamond
   apart from the 72 old ones. Also the first stage's own reconstructions of held-out new-word
   images (the ceiling any U-Net can reach with it).

Prints one JSON object with the figures and times; writes OUT/<mode>-results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ldmkit
from ldmkit.checkpoint import save_checkpoint
from ldmkit.data.shapes import ShapesDataset, all_captions, combos, is_new
from ldmkit.evaluate.attributes import score_captions
from ldmkit.imageio import save_grid
from ldmkit.train.config import DIFFUSION_PRESETS
from ldmkit.train.diffusion import train_diffusion


def images_of(ds, n: int) -> tuple[torch.Tensor, list[str]]:
    items = [ds[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), [it["text"] for it in items]


def ceiling(ae, seed: int = 5, n: int = 448) -> dict:
    """The first stage's reconstructions of held-out images with new words, judged like samples."""
    x, caps = images_of(ShapesDataset(size=32, length=n, seed=seed, split="val", vocabulary="extended"), n)
    keep = [i for i, c in enumerate(caps) if ("white" in c.split() or "diamond" in c.split())]
    with torch.no_grad():
        y = ae.decode(ae.encode(x[keep]).mean).clamp(-1, 1)
    return score_captions(y, [caps[i] for i in keep], "extended")


def finetune_decoder(ldm, steps: int, lr: float = 1e-3, batch: int = 32) -> float:
    """L2 reconstruction on extended shapes, the decoder alone trained; returns seconds."""
    t0 = time.time()
    ae = ldm.autoencoder
    data = ShapesDataset(size=32, seed=11, vocabulary="extended")
    x_all, _ = images_of(data, min(len(data), steps * batch // 4 + batch))  # each image seen ~4 times
    with torch.no_grad():
        posts = [ae.encode(x_all[i : i + 256]) for i in range(0, len(x_all), 256)]
        mean, std = torch.cat([q.mean for q in posts]), torch.cat([q.std for q in posts])
    dec = [p for n, p in ae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))]
    ae.requires_grad_(False)
    for p in dec:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(dec, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    ae.train()
    for step in range(steps):
        idx = torch.randint(len(x_all), (batch,), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)  # z ~ q(z|x), as training sees it
        loss = F.mse_loss(ae.decode(z), x_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for grp in opt.param_groups:  # cosine to 0
            grp["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * (step + 1) / steps))).item()
    ae.eval().requires_grad_(False)
    return time.time() - t0


def judge(ldm, seeds: int, out: Path) -> dict:
    caps = all_captions("extended")
    images = torch.cat([ldm.sample(texts=caps, seed=7000 + 97 * s, steps=25, sampler="dpmpp_2m", guidance=2.0)
                        for s in range(seeds)])
    new = torch.tensor([is_new(c) for c in combos("extended")] * seeds)
    allcaps = caps * seeds
    save_grid(images[: len(caps)], out, nrow=16, upscale=2)
    res = {}
    for key, keep in (("new_words", new), ("original_72", ~new)):
        res[key] = score_captions(images[keep], [c for c, k in zip(allcaps, keep) if k], "extended")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the shapes-text model (a `ldmkit train` run)")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["lora", "unet"], default="lora")
    p.add_argument("--decoder-steps", type=int, default=0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides for step 1")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"mode": args.mode, "base": args.base, "decoder_steps": args.decoder_steps, "threads": args.threads}
    t_all = time.time()
    base = args.base
    if args.decoder_steps:
        ldm = ldmkit.load(base)
        res["first_stage_before"] = ceiling(ldm.autoencoder)
        res["decoder_seconds"] = round(finetune_decoder(ldm, args.decoder_steps), 1)
        res["first_stage_after"] = ceiling(ldm.autoencoder)
        base = str(out / "base-decoder")
        save_checkpoint(base, 0, "latent_diffusion", ldm, ldm.config,
                        meta={"dataset": "shapes", "from": args.base, "decoder_finetuned_steps": args.decoder_steps})
    from ldmkit.train.config import load_config, DiffusionTrainConfig

    preset = "shapes-lora" if args.mode == "lora" else "shapes-finetune"
    cfg = load_config(preset, DiffusionTrainConfig, DIFFUSION_PRESETS, args.overrides)
    cfg.finetune.init_from = base
    run = out / f"{args.mode}{'-dec' if args.decoder_steps else ''}"
    t0 = time.time()
    train_diffusion(cfg, run, progress=False)
    res["train_seconds"] = round(time.time() - t0, 1)
    res["total_train_seconds"] = round(time.time() - t_all, 1)
    res["steps"] = cfg.optim.steps
    t0 = time.time()
    res.update(judge(ldmkit.load(run), args.seeds, run / "judged.png"))
    res["judge_seconds"] = round(time.time() - t0, 1)
    if not args.decoder_steps:
        res["first_stage"] = ceiling(ldmkit.load(base).autoencoder)
    print(json.dumps(res, indent=2))
    (out / f"{run.name}-results.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
