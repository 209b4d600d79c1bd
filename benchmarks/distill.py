"""A distilled student against its teacher: fidelity and images/s on the 72 shapes captions.

The student (`ldmkit distill`) samples with lcm at guidance 1 (the guidance is folded in) at 1, 2 and 4
steps; the teacher with its usual sampler and guidance at 25 steps and at the student's step counts (equal
steps), and with lcm at guidance 1 (the same sampler without distillation: the control). All 72 captions are drawn at `--seeds` seeds (1000·s, the seeds `ldmkit evaluate`
uses: none of them is a training draw) and the independent attribute checker reads colour, position and
shape back. Images/s is the whole `sample` call (text encoding, U-Net steps, decoding) for a batch of 72,
best of `--repeat` timings taken round-robin over the rows; a guided step runs the doubled batch, so it costs the teacher about two
student evaluations. "ODE PSNR" is each row's agreement, in pixels, with the teacher's guided probability-flow
ODE from the same noise (DDIM, 50 steps, the distillation's guidance), the map consistency distillation learns. Output: a Markdown table on stdout and results.json (`--out`).

    python benchmarks/distill.py --student runs/distill --teacher runs/demo/diffusion --out docs/distill
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from ldmkit.generation.compat import sample as ldm_sample  # the old sample keywords as a GenerationRequest


def main(argv: list[str] | None = None) -> int:
    import ldmkit
    from ldmkit.data.shapes import all_captions
    from ldmkit.evaluate.attributes import score_captions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", required=True, help="a run of `ldmkit distill`")
    p.add_argument("--teacher", required=True, help="the model it was distilled from")
    p.add_argument("--student-steps", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--teacher-steps", nargs="+", type=int, default=[25, 4, 2, 1])
    p.add_argument("--control-steps", nargs="*", type=int, default=[1, 2, 4], help="the teacher with lcm, guidance 1")
    p.add_argument("--teacher-sampler", default="dpmpp_2m")
    p.add_argument("--guidance", type=float, default=None, help="the teacher's guidance scale (default: the "
                   "distillation's, from the student's meta)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=5, help="timings of one batch of 72 (the best is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--out", default=None, help="folder for results.json and grid.png (a row of 12 samples per "
                   "model and setting, the teacher's ODE first)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from ldmkit.checkpoint import read_config

    caps = all_captions()
    meta = read_config(args.student)[3]
    w = args.guidance or meta.get("distillation", {}).get("guidance", 2.5)
    runs = [("student", args.student, "lcm", s, 1.0) for s in args.student_steps]
    runs += [("teacher", args.teacher, args.teacher_sampler, s, w) for s in args.teacher_steps]
    runs += [("teacher", args.teacher, "lcm", s, 1.0) for s in args.control_steps]
    models = {"student": ldmkit.load(args.student), "teacher": ldmkit.load(args.teacher)}
    ode = torch.cat([ldm_sample(models["teacher"], texts=caps, seed=1000 * s, steps=50, sampler="ddim", guidance=w)
                     for s in range(args.seeds)])  # (72·seeds, 3, H, W) in [-1, 1]
    rows, strips = [], [ode[:12]]
    for who, path, sampler, steps, guidance in runs:
        ldm = models[who]
        kw = dict(steps=steps, sampler=sampler, guidance=guidance)
        images = torch.cat([ldm_sample(ldm, texts=caps, seed=1000 * s, **kw) for s in range(args.seeds)])
        score = score_captions(images, caps * args.seeds)
        mse = (images - ode).pow(2).mean((1, 2, 3)).clamp_min(1e-10)  # per image; peak-to-peak 2
        score["ode_psnr"] = float((10 * torch.log10(4 / mse)).mean())
        row = {"model": who, "checkpoint": str(path), "sampler": sampler, "steps": steps, "guidance": guidance,
               "unet_evals_per_image": steps * (2 if guidance != 1 else 1), **score}
        rows.append(row)
        strips.append(images[:12])
        print(f"{who} {sampler} {steps:>2} steps, guidance {guidance:g}: colour {100 * score['colour']:5.1f} %  position "
              f"{100 * score['position']:5.1f} %  shape {100 * score['shape']:5.1f} %  all {100 * score['all']:5.1f} %  "
              f"ODE PSNR {score['ode_psnr']:.1f} dB", flush=True)
    # timings round-robin over the rows, so a busy spell of a shared machine hits every row alike
    best = [float("inf")] * len(rows)
    for _ in range(args.repeat):
        for i, r in enumerate(rows):
            ldm = models[r["model"]]
            t0 = time.perf_counter()
            ldm_sample(ldm, texts=caps, seed=0, steps=r["steps"], sampler=r["sampler"], guidance=r["guidance"])
            best[i] = min(best[i], time.perf_counter() - t0)
    for r, sec in zip(rows, best):
        r["images_per_s"] = round(len(caps) / sec, 1)

    base = next((r for r in rows if r["model"] == "teacher" and r["steps"] == max(args.teacher_steps)), None)
    print(f"\n{len(caps) * args.seeds} samples per row (72 captions x {args.seeds} unseen seeds); images/s for a batch of "
          f"72, best of {args.repeat}\n")
    print("| model | sampler | steps | guidance | U-Net evaluations / image | colour | position | shape | ODE PSNR | "
          "images/s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        speed = f"{r['images_per_s'] / base['images_per_s']:.1f}x" if base else "–"
        print(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['unet_evals_per_image']} | "
              f"{100 * r['colour']:.1f} % | {100 * r['position']:.1f} % | {100 * r['shape']:.1f} % | "
              f"{r['ode_psnr']:.1f} dB | {r['images_per_s']} | {speed} |")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"seeds": args.seeds, "threads": torch.get_num_threads(), "teacher_guidance": w, "rows": rows}
        (out / "results.json").write_text(json.dumps(doc, indent=2))
        from ldmkit.imageio import save_grid

        save_grid(torch.cat(strips), out / "grid.png", nrow=12, upscale=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
