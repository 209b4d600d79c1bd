"""Why a VAE and not a plain autoencoder? Train the same network three ways on the same data and
measure reconstruction *and* how usable the latent space is for a second stage.

    python benchmarks/first_stage.py --data shapes --steps 700       # ~3 x 4 min on 2 cores

Kinds: `kl` (KL-regularised, kl_weight 1e-6, the LDM recipe), `ae` (same network, no KL, no
sampling), `kl_gan` (KL + PatchGAN from half-way). For each: held-out PSNR/SSIM, the latent
mean/std before normalisation, and two latent-space probes that need no second stage:

- interpolation roughness: decode 16 steps along the straight line between two images' latents;
  the summed pixel distance between consecutive frames divided by the endpoint distance
  (1.0 = the decoded path moves straight from A to B; larger = detours and artefacts);
- prior-sample realism (shapes only): decode z ~ N(0, I) through the stored scale/shift and let the
  attribute checker say what fraction show one shape in a palette colour.

Prints a Markdown table; every figure comes from this run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ldmkit.evaluate.latent_probes import interpolation_roughness, prior_realism
from ldmkit.evaluate.metrics import psnr
from ldmkit.train.autoencoder import train_autoencoder
from ldmkit.checkpoint import load
from ldmkit.train.config import AUTOENCODER_PRESETS
from ldmkit.data.tensors import materialize
from ldmkit.data import build_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="shapes")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--kinds", nargs="+", default=["kl", "ae", "kl_gan"])
    p.add_argument("--out", default=None, help="keep runs here (default: a temporary folder)")
    args = p.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="ldmkit-first-stage-"))
    rows = []
    for kind in args.kinds:
        cfg = AUTOENCODER_PRESETS[args.data if args.data in AUTOENCODER_PRESETS else "photos"]()
        cfg.data.dataset = args.data
        cfg.optim.steps = args.steps
        cfg.logging.val_every = cfg.logging.ckpt_every = args.steps
        cfg.model.variational = kind != "ae"
        if kind == "kl_gan":
            cfg.loss.disc_enabled = True
            cfg.loss.disc_start = args.steps // 2
        t = time.time()
        folder = train_autoencoder(cfg, root / kind, progress=False)
        seconds = time.time() - t
        ae = load(folder)
        meta = json.loads((folder / "config.json").read_text())["meta"]
        val = materialize(build_dataset(args.data, cfg.data.size, "val"), 64, progress=False).images
        with torch.no_grad():
            rec = ae.decode(ae.encode(val).mean).clamp(-1, 1)
        row = {
            "kind": kind,
            "seconds": round(seconds),
            "psnr": meta["val"]["psnr"],
            "ssim": meta["val"]["ssim"],
            "psnr_check": psnr(rec, val).mean().item(),
            "latent_std": meta["latent_stats"]["std"],
            "kl_per_element": meta["val"]["kl_per_element"],
            "interp_roughness": interpolation_roughness(ae, val),
        }
        if args.data == "shapes":
            row["prior_realism"] = prior_realism(ae)
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    print(f"\nruns kept in {root}")


if __name__ == "__main__":
    main()
