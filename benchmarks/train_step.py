"""U-Net training step, ldmkit vs diffusers, same architecture and same weights.

One step = forward + MSE loss + backward + AdamW step (+ zero_grad), on random latents, timesteps
and text tokens. Each side builds its optimizer as its own training code does: ldmkit's trainers the fused
AdamW kernel (`ldmkit.train.loop.adamw`), diffusers' examples `torch.optim.AdamW` with its defaults
(`--same-optimizer`: the latter on both sides, to compare the models alone). The diffusers model is `to_diffusers(ldmkit_unet)`: a `UNet2DConditionModel` with
the same weights. Each side runs with its defaults (both attend through
`F.scaled_dot_product_attention`: ldmkit's Attention, diffusers' `AttnProcessor2_0`); fp32, and bf16
under `torch.autocast` with float32 weights and optimizer state.

    python benchmarks/train_step.py                                   # default cases, fp32 + bf16
    python benchmarks/train_step.py --cases demo:32:8 mid:4:16 --precisions fp32 --repeats 9
    python benchmarks/train_step.py --cases tiny:2:8 --repeats 2 --no-memory   # smoke test

A case is CONFIG:BATCH:LATENT_RES (configs in benchmarks/common.py: demo, mid, sd1, tiny). The two
sides are timed alternately (A B, B A, ...) and the median step time is reported; `±` is the
half-range of the timings relative to the median. FLOPs are counted once per side with
`torch.utils.flop_counter` (matmul/conv/attention only) and divided by the median step time; the
fraction is of the fp32 or bf16 matmul peak measured at the start of the run. Peak memory is the
growth of the peak resident set over two training steps (the first allocates AdamW state) above
the RSS with the model, optimizer and inputs built, each side in its own fresh process.
`--context-mask` also passes an all-True token mask (ldmkit: `context_mask`, diffusers:
`encoder_attention_mask`), as ldmkit's own training loop does with its text encoders.
`--gradient-checkpointing` turns on activation checkpointing on both sides (ldmkit:
`unet.set_gradient_checkpointing(True)`, diffusers: `enable_gradient_checkpointing()`); the FLOP count
then includes the recomputed forward passes.

Prints Markdown tables; every figure comes from this run.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from ldmkit.train.loop import adamw  # noqa: E402

DEFAULT_CASES = ["demo:8:8", "demo:32:8", "demo:32:16", "mid:2:16", "mid:8:16", "mid:2:32"]


def make_inputs(name: str, batch: int, res: int, device: str, seed: int = 0):
    cfg = common.unet_config(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, res, res, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    ctx = torch.randn(batch, common.CONTEXT_TOKENS[name], cfg.context_dim, generator=g).to(device)
    target = torch.randn(batch, cfg.out_channels, res, res, generator=g).to(device)
    mask = torch.ones(batch, ctx.shape[1], dtype=torch.bool, device=device)
    return x, t, ctx, target, mask


def make_optimizer(side: str, model, same_optimizer: bool) -> torch.optim.Optimizer:
    """Each side's own: ldmkit's trainers build `ldmkit.train.loop.adamw` (PyTorch's fused AdamW kernel);
    diffusers' training examples build `torch.optim.AdamW` with its defaults (the per-tensor loop on CPU).
    `same_optimizer`: torch.optim.AdamW on both sides, to compare the models alone."""
    if side == "ldmkit" and not same_optimizer:
        return adamw(model.parameters(), 1e-4, (0.9, 0.999), 1e-2)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2)


def make_step(side: str, model, inputs, precision: str, device: str, context_mask: bool, same_optimizer: bool = False):
    """A closure running one training step of `model` (ldmkit or diffusers calling convention)."""
    x, t, ctx, target, mask = inputs
    opt = make_optimizer(side, model, same_optimizer)
    amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def forward_backward():
        with amp:
            if side == "ldmkit":
                out = model(x, t, context=ctx, context_mask=mask if context_mask else None)
            else:
                out = model(x, t, encoder_hidden_states=ctx, encoder_attention_mask=mask if context_mask else None).sample
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        return loss

    def step():
        forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, forward_backward, opt


def set_checkpointing(side: str, model, enabled: bool) -> None:
    """Activation (gradient) checkpointing on one side, each through its own switch."""
    if not enabled:
        return
    if side == "ldmkit":
        model.set_gradient_checkpointing(True)
    else:
        model.enable_gradient_checkpointing()


def memory_child(spec: dict) -> None:
    """Fresh process: build one side, then the peak RSS growth over two training steps."""
    torch.set_num_threads(spec["threads"])
    ours, theirs = common.build_unets(spec["config"], "cpu")
    model = ours if spec["side"] == "ldmkit" else theirs
    del ours, theirs  # the other side's weights are freed before the baseline is taken
    set_checkpointing(spec["side"], model, spec.get("checkpointing", False))
    inputs = make_inputs(spec["config"], spec["batch"], spec["res"], "cpu")
    step, _, _ = make_step(spec["side"], model, inputs, spec["precision"], "cpu", spec["context_mask"],
                           spec["same_optimizer"])
    with common.RssPeak() as p:
        step()
        step()
    print(json.dumps({"peak_mib": p.mib}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="CONFIG:BATCH:LATENT_RES ...")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--context-mask", action="store_true", help="pass an all-True token mask to both sides")
    p.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing on both sides")
    p.add_argument("--same-optimizer", action="store_true",
                   help="torch.optim.AdamW (default loop) on both sides instead of each side's own")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    p.add_argument("--peak-sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(json.loads(args.memory_child))
    torch.set_num_threads(args.threads)
    cases = common.parse_cases(args.cases)

    peaks = {
        "fp32": common.measure_peak(torch.float32, args.device, args.peak_sizes),
        "bf16": common.measure_peak(torch.bfloat16, args.device, args.peak_sizes),
    }
    print(common.machine_line(args.device))
    print()
    print(common.peak_table({"float32": peaks["fp32"], "bfloat16": peaks["bf16"]}))
    print()

    rows = []
    for name, batch, res in cases:
        ours, theirs = common.build_unets(name, args.device)
        set_checkpointing("ldmkit", ours, args.gradient_checkpointing)
        set_checkpointing("diffusers", theirs, args.gradient_checkpointing)
        inputs = make_inputs(name, batch, res, args.device)
        nparams = sum(q.numel() for q in ours.parameters())
        for precision in args.precisions:
            steps, flops = {}, {}
            for side, model in (("ldmkit", ours), ("diffusers", theirs)):
                step, fwd_bwd, opt = make_step(side, model, inputs, precision, args.device, args.context_mask,
                                               args.same_optimizer)
                flops[side] = common.count_flops(fwd_bwd)
                opt.zero_grad(set_to_none=True)
                steps[side] = step
            times = common.interleave(steps, args.repeats, args.warmup, args.device)
            mem = {}
            for side in ("ldmkit", "diffusers"):
                if args.no_memory or args.device != "cpu":
                    mem[side] = float("nan")
                    continue
                spec = dict(side=side, config=name, batch=batch, res=res, precision=precision, threads=args.threads,
                            context_mask=args.context_mask, checkpointing=args.gradient_checkpointing,
                            same_optimizer=args.same_optimizer)  # fmt: skip
                mem[side] = common.child_peak_rss(__file__, ["--_memory-child", json.dumps(spec)])
            med = {s: common.median(v) for s, v in times.items()}
            sps = {s: batch / med[s] for s in med}
            peak = peaks[precision][0]
            row = [f"{name} ({nparams / 1e6:.1f}M)", str(batch), f"{res}x{res}", precision]
            for s in ("ldmkit", "diffusers"):
                row.append(f"{sps[s]:.2f} ±{100 * common.spread(times[s]):.0f}%")
            row.append(f"**{sps['ldmkit'] / sps['diffusers']:.2f}**")
            for s in ("ldmkit", "diffusers"):
                achieved = flops[s] / med[s]
                row.append(f"{achieved / 1e9:.1f} ({100 * achieved / peak:.0f}%)")
            row += [f"{mem['ldmkit']:.0f}", f"{mem['diffusers']:.0f}"]
            rows.append(row)
            print(f"  done {name}:{batch}:{res} {precision}", file=sys.stderr, flush=True)
        del ours, theirs
    header = ["U-Net", "batch", "latent", "prec.", "ldmkit samples/s", "diffusers samples/s", "ratio",
              "ldmkit GFLOP/s (% peak)", "diffusers GFLOP/s (% peak)", "ldmkit peak MiB", "diffusers peak MiB"]  # fmt: skip
    print(f"Training step (fwd + bwd + AdamW), median of {args.repeats} alternated steps after {args.warmup} "
          f"warm-up; ratio = ldmkit / diffusers samples/s; peak MiB = peak RSS growth over two steps "
          f"in a fresh process{'; context mask on' if args.context_mask else ''}"
          f"{'; gradient checkpointing on both sides' if args.gradient_checkpointing else ''}"
          f"; optimizer: {'torch.optim.AdamW on both sides' if args.same_optimizer else 'each side its own (ldmkit: fused AdamW, diffusers: torch.optim.AdamW)'}.")  # fmt: skip
    print()
    print(common.markdown_table(header, rows))


if __name__ == "__main__":
    main()
