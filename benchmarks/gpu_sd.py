"""SD-v1 on a GPU: model FLOP utilisation of a U-Net training step and the time of a 512x512 sample,
ldmkit vs diffusers, same architecture and same (random) weights.

1. Peak: dense bf16 (and fp32, each side's default TF32 setting) matmul FLOP/s of this GPU, measured
   now.
2. Training: the SD-v1 U-Net (860M parameters, context 77 x 768) — forward + MSE + backward + AdamW
   — in bf16 autocast with float32 weights, batch 8 of 64x64 latents (512 px). MFU = FLOPs counted
   by `torch.utils.flop_counter` / median step time / measured bf16 peak. Step peak memory = how far
   `torch.cuda.max_memory_allocated` rises during one step above the memory in use before it (both
   sides' weights and AdamW state): activations, gradients and workspaces of that side alone.
   `--gradient-checkpointing` turns on activation checkpointing on both sides.
3. Sampling: a 512x512 image, batch 1, 50 steps, classifier-free guidance 7.5 (batched
   uncond/cond), U-Net and VAE decode in bf16 autocast: ldmkit `LatentDiffusion.sample` vs the
   diffusers loop of benchmarks/sampling.py (`UNet2DConditionModel` + `DPMSolverMultistepScheduler`
   or `DDIMScheduler` + `AutoencoderKL.decode`). TFLOP are those each side executes (ldmkit projects
   the text tokens to cross-attention K/V once per call, not once per step); sample peak memory as
   for training.

Each side alternates with the other (A B, B A, ...); figures are medians. Results are printed as
soon as each part finishes, and a part is skipped once `--time-limit` seconds have passed, so the
run stays inside its budget: 55 s on an H200 (torch 2.11), models built on the GPU; no torch.compile.

    python benchmarks/gpu_sd.py                          # on a CUDA machine
    python benchmarks/gpu_sd.py --dry-run                # CPU smoke test: tiny U-Net, few steps
    python benchmarks/gpu_sd.py --device cpu --tiny      # the same, spelled out
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from ldmkit.generation.compat import sample as ldm_sample  # the old sample keywords as a GenerationRequest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import sampling  # noqa: E402
import train_step  # noqa: E402


def amp(device: str, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)


def peak_growth_gib(device: str, fn) -> float:
    """GiB by which CUDA memory in use peaks above what is in use before `fn()` (both sides' weights and
    optimizer state): activations, gradients, workspaces — each side's own memory, like the CPU figure."""
    if torch.device(device).type != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def empty_cache(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def bench_train(args, name: str, res: int, peak: float) -> list[list[str]]:
    ours, theirs = common.build_unets(name, args.device)
    inputs = train_step.make_inputs(name, args.batch, res, args.device)
    nparams = sum(p.numel() for p in ours.parameters())
    steps, flops = {}, {}
    for side, model in (("ldmkit", ours), ("diffusers", theirs)):
        train_step.set_checkpointing(side, model, args.gradient_checkpointing)
        step, fwd_bwd, opt = train_step.make_step(side, model, inputs, args.train_precision, args.device, False,
                                                  args.same_optimizer)
        flops[side] = common.count_flops(fwd_bwd)
        opt.zero_grad(set_to_none=True)
        steps[side] = step
    # Warm up both (allocates AdamW state), then time alternately; memory per side in separate passes.
    times = common.interleave(steps, args.train_repeats, args.warmup, args.device)
    mem = {side: peak_growth_gib(args.device, step) for side, step in steps.items()}
    rows = []
    for side in steps:
        med = common.median(times[side])
        achieved = flops[side] / med
        rows.append([side, f"{name} ({nparams / 1e6:.0f}M)", f"{args.batch} x {res}x{res}", args.train_precision,
                     f"{1e3 * med:.1f} ±{100 * common.spread(times[side]):.0f}%", f"{args.batch / med:.1f}",
                     f"{flops[side] / 1e12:.2f}", f"{achieved / 1e12:.1f}", f"**{100 * achieved / peak:.1f}%**",
                     f"{mem[side]:.1f}"])  # fmt: skip
    ratio = common.median(times["diffusers"]) / common.median(times["ldmkit"])
    rows.append(["ratio", "", "", "", "", f"**{ratio:.2f}**", "", "", "", ""])
    del steps, ours, theirs
    empty_cache(args.device)
    return rows


def bench_sample(args, name: str, res: int, peak: float) -> list[list[str]]:
    ldm = sampling.build_ldm(name, res, args.device)
    unet, vae, make_scheduler = sampling.diffusers_side(ldm, args.device)
    prompts = sampling.prompts_for(1)
    out = {}

    def ours():
        with amp(args.device, args.sample_precision):
            out["ldmkit"] = ldm_sample(ldm, texts=prompts, steps=args.steps, sampler=args.sampler, guidance=args.guidance)

    def theirs():
        with amp(args.device, args.sample_precision):
            out["diffusers"] = sampling.diffusers_sample(unet, vae, make_scheduler(args.sampler), ldm, prompts,
                                                         args.steps, args.guidance)  # fmt: skip

    fns = {"ldmkit": ours, "diffusers": theirs}
    times = common.interleave(fns, args.sample_repeats, 1, args.device)
    flops = {side: common.count_flops(fn) for side, fn in fns.items()}  # executed FLOPs, whole call
    mem = {side: peak_growth_gib(args.device, fn) for side, fn in fns.items()}
    diff = (out["ldmkit"].float() - out["diffusers"].float()).abs().max().item()
    f = 2 ** (len(ldm.config.autoencoder.channel_mult) - 1)
    rows = []
    for side in fns:
        med = common.median(times[side])
        rows.append([side, f"{res * f}x{res * f}", args.sampler, str(args.steps), args.sample_precision,
                     f"{med:.3f} ±{100 * common.spread(times[side]):.0f}%", f"{args.steps / med:.1f}",
                     f"{flops[side] / 1e12:.1f}", f"{flops[side] / med / 1e12:.1f}",
                     f"**{100 * flops[side] / med / peak:.1f}%**", f"{mem[side]:.1f}"])  # fmt: skip
    ratio = common.median(times["diffusers"]) / common.median(times["ldmkit"])
    rows.append(["ratio", "", "", "", "", f"**{ratio:.2f}**", "", "", "", "", f"max abs pixel diff {diff:.2e}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny U-Net and VAE, 8x8 latents (smoke test)")
    p.add_argument("--dry-run", action="store_true", help="= --device cpu --tiny with very few iterations")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--train-repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing on both sides")
    p.add_argument("--same-optimizer", action="store_true",
                   help="torch.optim.AdamW on both sides (default: ldmkit's fused AdamW against diffusers' examples' AdamW)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--sampler", default="dpmpp_2m", choices=["dpmpp_2m", "ddim"])
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sample-precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--sample-repeats", type=int, default=3)
    p.add_argument("--time-limit", type=float, default=270, help="seconds; later parts are skipped after this")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "sample"])
    args = p.parse_args()
    if args.dry_run:
        args.device, args.tiny = "cpu", True
        args.batch, args.train_repeats, args.warmup, args.steps, args.sample_repeats = 2, 2, 1, 3, 1
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_sd.py needs a CUDA GPU (none visible to torch); for a CPU smoke test run "
                 "`python benchmarks/gpu_sd.py --dry-run`")  # fmt: skip
    if torch.device(args.device).type == "cpu" and not args.tiny:
        sys.exit("on CPU only --tiny (or --dry-run) is supported: SD-v1 training does not fit a CPU benchmark")
    start = time.perf_counter()
    name, res = ("tiny", 8) if args.tiny else ("sd1", 64)

    sizes = (256, 512) if args.tiny else (4096, 8192)
    peaks = {
        "bfloat16": common.measure_peak(torch.bfloat16, args.device, sizes, repeats=3),
        "float32": common.measure_peak(torch.float32, args.device, sizes, repeats=3),
    }
    if "fp16" in (args.train_precision, args.sample_precision):
        peaks["float16"] = common.measure_peak(torch.float16, args.device, sizes, repeats=3)
    print(common.machine_line(args.device))
    print()
    print(common.peak_table(peaks))
    print(flush=True)
    peak = peaks[{"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.train_precision]][0]

    if "train" not in args.skip:
        rows = bench_train(args, name, res, peak)
        print(f"U-Net training step (fwd + bwd + AdamW, {args.train_precision} autocast, fp32 weights), median of "
              f"{args.train_repeats} alternated steps; MFU = counted FLOPs / step time / measured peak; "
              "ratio = diffusers time / ldmkit time (> 1: ldmkit faster)"
              f"{'; gradient checkpointing on both sides' if args.gradient_checkpointing else ''}.")  # fmt: skip
        print()
        print(common.markdown_table(["side", "U-Net", "batch", "prec.", "ms/step", "samples/s", "TFLOP/step",
                                     "TFLOP/s", "MFU", "step peak GiB"], rows))  # fmt: skip
        print(flush=True)
    elapsed = time.perf_counter() - start
    if "sample" not in args.skip and elapsed < args.time_limit:
        sample_peak = peaks[{"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.sample_precision]][0]
        rows = bench_sample(args, name, res, sample_peak)
        print(f"Sampling: batch 1, CFG {args.guidance} (batched), U-Net + VAE decode, {args.sample_precision} "
              f"autocast; median of {args.sample_repeats} alternated runs; ratio = diffusers / ldmkit seconds; "
              "TFLOP = executed FLOPs of the whole call (ldmkit projects the text tokens to K/V once, not per step); "
              f"MFU against the measured {args.sample_precision} peak.")  # fmt: skip
        print()
        print(common.markdown_table(["side", "image", "sampler", "steps", "prec.", "seconds / image", "steps/s",
                                     "TFLOP / image", "TFLOP/s", "MFU", "sample peak GiB"], rows))  # fmt: skip
    elif "sample" not in args.skip:
        print(f"sampling skipped: {elapsed:.0f} s > --time-limit {args.time_limit:.0f} s")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
