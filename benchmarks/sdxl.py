"""One denoising step of the full-size SDXL base U-Net (2.57 B parameters, random weights, the real
architecture: diffusers' stabilityai/stable-diffusion-xl-base-1.0 unet/config.json = ldmkit's `sdxl` preset),
ldmkit against diffusers in the same run: wall time and peak resident memory.

Each side runs in its own fresh process, one after the other (the machine has too little memory for both
models at once in float32, and a fresh process gives an honest peak RSS): build the U-Net on the meta device,
materialise it in the chosen dtype with N(0, 0.02²) weights (the same seed on both sides, so both compute
on the same values), then time `--repeats` forward passes of batch 2 (the conditional and unconditional
halves of classifier-free guidance, as a guided step runs) under `torch.inference_mode`.

    python benchmarks/sdxl.py --latent 64 --dtype bf16          # 512×512 images
    python benchmarks/sdxl.py --latent 128 --dtype bf16         # 1024×1024
    python benchmarks/sdxl.py --order diffusers,ours ...        # the other side first
    python benchmarks/sdxl.py --side ours --latent 64 ...       # one side only (what the parent runs)
    python benchmarks/sdxl.py --part vae --latent 128 --dtype fp32   # the SDXL VAE's decode of one 1024² image

`--part vae` times the SDXL autoencoder's decoder instead (the whole 83.7 M-parameter VAE is built; batch 1: the
image a guided run ends with); give it `--dtype fp32`, as ldmkit and diffusers both decode SDXL latents in float32.

Printed: a markdown table (seconds per step: median of the repeats after one warm-up; peak RSS of the
process, and the rise of the peak above the weights alone, i.e. the step's own working memory).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RssPeak, _status_kb, machine_line, markdown_table, median  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

def _materialise(model: torch.nn.Module, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Meta-device model → real weights N(0, 0.02²) in `dtype`, drawn in state-dict order (the two sides share
    names, so the same seed gives both the same weights)."""
    model = model.to(dtype).to_empty(device="cpu")  # allocated in `dtype` directly: no float32 copy
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.state_dict().items()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval().requires_grad_(False)


def _vae_step(side: str, latent: int, dtype: torch.dtype):
    """The SDXL VAE's decoder on one latent: (module, step)."""
    from ldmkit.autoencoder import AutoencoderKL
    from ldmkit.interop.diffusers import vae_config_to_diffusers
    from ldmkit.interop.presets import vae_sdxl

    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(1)).to(dtype)
    if side == "ours":
        with torch.device("meta"):
            net = AutoencoderKL(vae_sdxl())
        return net, lambda: net.decode(z)
    import diffusers

    with torch.device("meta"):
        net = diffusers.AutoencoderKL(**vae_config_to_diffusers(vae_sdxl()))
    return net, lambda: net.decode(z).sample


def run_side(side: str, latent: int, dtype: torch.dtype, repeats: int, seed: int = 0, part: str = "unet") -> dict:
    from ldmkit.conditioning.conditioner import sdxl_vector

    b = 2
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, latent, latent, generator=g).to(dtype)
    ctx = torch.randn(b, 77, 2048, generator=g).to(dtype)
    pooled = torch.randn(b, 1280, generator=g).to(dtype)
    s = float(latent * 8)
    time_ids = torch.tensor([[s, s, 0.0, 0.0, s, s]] * b)
    t = torch.tensor([500, 500])
    if part == "vae":
        net, step = _vae_step(side, latent, dtype)
    elif side == "ours":
        from ldmkit.unet import UNet, unet_sdxl

        with torch.device("meta"):
            net = UNet(unet_sdxl(zero_init=False))
        vector = sdxl_vector(pooled.float(), time_ids).to(dtype)
        step = lambda: net(x, t, context=ctx, vector=vector)  # noqa: E731
    else:
        import diffusers

        from ldmkit.interop.diffusers_unet import config_to_diffusers
        from ldmkit.unet import unet_sdxl

        # SDXL base's unet/config.json: the preset's translation, which tests/test_sdxl.py pins to the real file
        with torch.device("meta"):
            net = diffusers.UNet2DConditionModel(**config_to_diffusers(unet_sdxl(zero_init=False)))
        added = {"text_embeds": pooled, "time_ids": time_ids.to(dtype)}
        step = lambda: net(x, t, ctx, added_cond_kwargs=added).sample  # noqa: E731
    net = _materialise(net, dtype, seed)
    params = sum(p.numel() for p in net.parameters())
    weights_rss = _status_kb("VmRSS") / 1024
    times = []
    with torch.inference_mode(), RssPeak() as peak:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            out = step()
            if i:  # the first pass warms up (thread pool, kernel choice)
                times.append(time.perf_counter() - t0)
    return {"side": side, "params": params, "seconds": median(times), "times": times,
            "weights_mib": weights_rss, "step_peak_mib": peak.mib, "peak_mib": _status_kb("VmHWM") / 1024,
            "out_std": out.float().std().item(), "out_sum": out.float().sum().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=64, help="latent side (image side / 8): 64 = 512 px, 128 = 1024 px")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--part", choices=["unet", "vae"], default="unet", help="the U-Net's guided step or the VAE's decode")
    ap.add_argument("--side", choices=["ours", "diffusers"], help="run one side in this process (the parent's child)")
    ap.add_argument("--order", default="ours,diffusers", help="which side runs first (on a shared machine, run both "
                    "orders: the load drifts between the two children)")
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.latent, DTYPES[args.dtype], args.repeats, part=args.part)))
        return
    rows, results = [], {}
    for side in args.order.split(","):
        cmd = [sys.executable, __file__, "--side", side, "--latent", str(args.latent), "--dtype", args.dtype,
               "--repeats", str(args.repeats), "--part", args.part]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode:
            raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
        r = results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append([side, f"{r['params'] / 1e9:.3f} B", f"{r['seconds']:.1f}", f"{r['weights_mib']:.0f}",
                     f"{r['step_peak_mib']:.0f}", f"{r['peak_mib']:.0f}"])
    a, b = results["ours"], results["diffusers"]
    what = "VAE decode (batch 1)" if args.part == "vae" else "U-Net, one guided step (batch 2)"
    print(f"SDXL {what}, {args.latent}x{args.latent} latents ({8 * args.latent} px), {args.dtype}; {machine_line()}")
    print(markdown_table(["side", "parameters", "s/step" if args.part == "unet" else "s/decode", "weights RSS MiB", "step peak MiB (above weights)",
                          "process peak MiB"], rows))
    print(f"outputs: std {a['out_std']:.4g} vs {b['out_std']:.4g}, sum {a['out_sum']:.5g} vs {b['out_sum']:.5g}")


if __name__ == "__main__":
    main()
