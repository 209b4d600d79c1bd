"""Time to quality of `ldmkit demo`: caption accuracy against minutes, for one or more demo recipes.

For each run, every kept checkpoint of the second stage is judged as the demo judges its final model
(all 72 captions at `--seeds` seeds the run never used, the demo's sampler, steps and guidance; the
independent attribute checker) and placed at the demo's minutes up to that point: first-stage training
plus second-stage training to that step. The pace comes from the runs' own checkpoints (seconds per
step of the finished run) unless `--pace` gives a quiet machine's: a run trained on a busy machine
judges quality per step as well as any, but its clock does not. Sampling and evaluation time (about
half a minute) is not on the axis. Output: a Markdown table, curve.json and demo_curve.png in --out.

    python benchmarks/demo_curve.py --run today=runs/demo-today --run fast=runs/demo --out docs/images
    python benchmarks/demo_curve.py --run today=AE_DIR:LDM_DIR --pace today=206:0.12 --out OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from ldmkit.generation.compat import sample as ldm_sample  # the old sample keywords as a GenerationRequest


def _dirs(spec: str) -> tuple[str, Path, Path]:
    name, _, where = spec.partition("=")
    if ":" in where:
        ae, ldm = where.split(":", 1)
        return name, Path(ae), Path(ldm)
    return name, Path(where) / "autoencoder", Path(where) / "diffusion"


def main(argv: list[str] | None = None) -> int:
    import ldmkit
    from ldmkit.checkpoint import read_config
    from ldmkit.data.shapes import all_captions
    from ldmkit.evaluate.attributes import score_captions
    from ldmkit.train.config import ldm_shapes_text

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=DEMO_DIR|NAME=AE_DIR:LDM_DIR")
    p.add_argument("--pace", action="append", default=[], metavar="NAME=AE_SECONDS:SECONDS_PER_STEP",
                   help="place NAME's checkpoints at this pace instead of its own")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the demo's)")
    p.add_argument("--sampler", default=None, help="(default: the demo's)")
    p.add_argument("--guidance", type=float, default=None, help="(default: the demo's)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    demo = ldm_shapes_text().sample
    args.steps, args.sampler = args.steps or demo.steps, args.sampler or demo.sampler
    args.guidance = demo.guidance if args.guidance is None else args.guidance
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paces = {k: tuple(float(x) for x in v.split(":")) for k, v in (s.split("=", 1) for s in args.pace)}
    caps = all_captions()
    curves: dict[str, list[dict]] = {}
    for spec in args.run:
        name, ae_dir, ldm_dir = _dirs(spec)
        ae_meta, ldm_meta = read_config(ae_dir)[3], read_config(ldm_dir)[3]
        if name in paces:
            ae_s, per_step = paces[name]
        else:
            ae_s, per_step = ae_meta["train_seconds"], ldm_meta["train_seconds"] / ldm_meta["step"]
        rows = []
        for ck in sorted((ldm_dir / "checkpoints").glob("step_*")):
            step = int(ck.name.split("_")[1])
            ldm = ldmkit.load(ck)
            kw = dict(steps=args.steps, sampler=args.sampler, guidance=args.guidance)
            imgs = torch.cat([ldm_sample(ldm, texts=caps, seed=7000 + 100 * k, **kw) for k in range(args.seeds)])
            sc = score_captions(imgs, caps * args.seeds, strict=True)  # strict: issue 31's shape rule
            rows.append({"step": step, "minutes": (ae_s + per_step * step) / 60, **sc})
            print(f"{name} step {step}: {rows[-1]['minutes']:.1f} min, colour {sc['colour']:.3f} position "
                  f"{sc['position']:.3f} shape {sc['shape']:.3f} strict shape {sc['shape_strict']:.3f}", flush=True)
        curves[name] = rows
    (out / "curve.json").write_text(json.dumps(curves, indent=1))
    print("\n| recipe | step | minutes | colour | position | shape | strict shape | all (strict) |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, rows in curves.items():
        for r in rows:
            print(f"| {name} | {r['step']} | {r['minutes']:.1f} | {100 * r['colour']:.1f} | {100 * r['position']:.1f} | "
                  f"{100 * r['shape']:.1f} | {100 * r['shape_strict']:.1f} | {100 * r['all_strict']:.1f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4), sharey=True)
    for ax, key, target in zip(axes, ("colour", "position", "shape", "shape_strict"), (0.95, 0.95, 0.95, 0.95)):
        for name, rows in curves.items():
            ax.plot([r["minutes"] for r in rows], [100 * r[key] for r in rows], "o-", label=name)
        ax.axhline(100 * target, color="grey", ls="--", lw=0.8)
        ax.axvline(6, color="grey", ls=":", lw=0.8)
        ax.set_title(f"{key} (target ≥ {100 * target:.0f} %)")
        ax.set_xlabel("demo minutes (training)")
    axes[0].set_ylabel("accuracy on unseen seeds, %")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "demo_curve.png", dpi=110)
    print(f"\nwrote {out / 'demo_curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
