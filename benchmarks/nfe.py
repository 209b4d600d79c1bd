"""Quality against network evaluations: every sampler at 2 … 50 steps on a trained text model.

For each sampler and number of steps, all 72 shapes captions are sampled at `--seeds` seeds (guidance
batched into one U-Net call per step, so network evaluations = steps) and the independent attribute
checker reads colour, position and shape back. The same noise for every sampler at a given seed.
There is no diffusers column: tests/test_samplers.py holds every sampler to diffusers' scheduler
step for step, so on the same model diffusers' figures are these. Output: a Markdown table on
stdout, results.json and a plot (`--out`).

    python benchmarks/nfe.py --checkpoint runs/demo/diffusion --out docs/nfe        # the demo model
    python benchmarks/nfe.py --checkpoint RUN --steps 4 8 --samplers unipc ddim --seeds 1
    python benchmarks/nfe.py --checkpoint RUN --samplers dpmpp_2m unipc --sigmas karras
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from ldmkit.generation.compat import sample as ldm_sample  # the old sample keywords as a GenerationRequest

STEPS = (2, 4, 6, 8, 12, 25, 50)


def main(argv: list[str] | None = None) -> int:
    import ldmkit
    from ldmkit.data.shapes import all_captions
    from ldmkit.diffusion import SAMPLERS
    from ldmkit.evaluate.attributes import score_captions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a text-to-image run on shapes (e.g. the demo's)")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--steps", nargs="+", type=int, default=list(STEPS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--sigmas", default=None, choices=["karras", "exponential"], help="σ spacing (default: the model's)")
    p.add_argument("--out", default=None, help="folder for results.json and nfe.png")
    args = p.parse_args(argv)

    ldm = ldmkit.load(args.checkpoint)
    caps = all_captions()
    rows = []
    for sampler in args.samplers:
        for steps in args.steps:
            t0 = time.perf_counter()
            images = torch.cat([ldm_sample(ldm, texts=caps, steps=steps, sampler=sampler, guidance=args.guidance,
                                           sigmas=args.sigmas, seed=1000 * s) for s in range(args.seeds)])
            sec = time.perf_counter() - t0
            score = score_captions(images, caps * args.seeds)
            rows.append({"sampler": sampler, "nfe": steps, "seconds": round(sec, 2), **score})
            print(f"{sampler:>9} {steps:>3} NFE: colour {100 * score['colour']:5.1f} %  position "
                  f"{100 * score['position']:5.1f} %  shape {100 * score['shape']:5.1f} %  all {100 * score['all']:5.1f} %"
                  f"  ({sec:.1f} s)", flush=True)

    print(f"\n{len(caps) * args.seeds} samples per cell (72 captions x {args.seeds} seeds), guidance {args.guidance}, "
          f"{args.sigmas or 'timestep'} spacing; 'all' = colour, position and shape right\n")
    print("| sampler | " + " | ".join(f"{n} NFE" for n in args.steps) + " |")
    print("| --- |" + " --- |" * len(args.steps))
    for sampler in args.samplers:
        cells = {r["nfe"]: r for r in rows if r["sampler"] == sampler}
        print(f"| {sampler} | " + " | ".join(f"{100 * cells[n]['all']:.0f} %" for n in args.steps) + " |")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"checkpoint": args.checkpoint, "guidance": args.guidance,
                                                      "sigmas": args.sigmas,
                                                      "seeds": args.seeds, "rows": rows}, indent=2))
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for sampler in args.samplers:
            pts = sorted((r["nfe"], 100 * r["all"]) for r in rows if r["sampler"] == sampler)
            ax.plot(*zip(*pts), marker="o", label=sampler)
        ax.set_xscale("log")
        ax.set_xticks(args.steps, [str(n) for n in args.steps])
        ax.set_xlabel("network evaluations (steps; guidance batched)")
        ax.set_ylabel("captions fully right (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "nfe.png", dpi=120)
        print(f"\nwrote {out / 'results.json'} and {out / 'nfe.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
