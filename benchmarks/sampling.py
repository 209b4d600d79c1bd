"""Sampling throughput with classifier-free guidance, ldmkit vs diffusers, same weights.

ldmkit: `LatentDiffusion.sample(texts, steps, sampler, guidance)` — conditioner, batched
[uncond; cond] U-Net call, `Denoiser`, the sampler function, then the autoencoder decode.
diffusers: the loop of `StableDiffusionPipeline.__call__` written out — `UNet2DConditionModel`
(`to_diffusers` of the same U-Net) on `torch.cat([latents] * 2)` with `[uncond; cond]` text
embeddings, `noise_uncond + w (noise_cond - noise_uncond)`, `DPMSolverMultistepScheduler` /
`DDIMScheduler` configured like ldmkit's schedule, then `AutoencoderKL.decode` (`to_diffusers` of
the same autoencoder). Both start from the same noise; the table gives the largest pixel
difference of the two sides' images, so "same computation" is checked, not assumed.

Text: a stand-in encoder (benchmarks/common.py `FixedTextEncoder`) gives each caption fixed random
tokens (16 x 384 for demo, 77 x 768 for mid) with an all-True mask, as CLIP's padded 77 tokens.
ldmkit receives that mask through its normal path (the conditioner always builds one); diffusers,
like its pipelines, passes none.

    python benchmarks/sampling.py                                    # default cases
    python benchmarks/sampling.py --cases demo:16:8 --samplers ddim --steps 25 --repeats 5
    python benchmarks/sampling.py --cases tiny:1:8 --steps 3 --repeats 1 --no-memory   # smoke test

A case is CONFIG:BATCH:LATENT_RES; the image is LATENT_RES x f pixels (f = 4 for demo and tiny,
8 for mid). Images/s is the median over alternated repeats; peak MiB is the growth of peak RSS
during one sampling call in a fresh process per side. FLOPs are those each side executes
(`torch.utils.flop_counter`, whole call): ldmkit projects the constant text tokens to cross-attention
K/V once per call instead of once per step, so it executes fewer; the "FLOPs ldmkit / diffusers"
column shows by how much, and GFLOP/s is each side's own executed FLOPs over its own time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from ldmkit.generation.compat import sample as ldm_sample  # the old sample keywords as a GenerationRequest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_CASES = ["demo:1:8", "demo:16:8", "demo:64:8", "mid:1:16", "mid:4:16", "mid:1:32"]


def build_ldm(name: str, res: int, device: str = "cpu", seed: int = 0):
    """A LatentDiffusion with random weights: the benchmark U-Net, a small KL autoencoder, the
    stand-in text encoder, SD's scaled-linear schedule (ε-prediction, trailing spacing)."""
    from ldmkit.autoencoder import AutoencoderConfig
    from ldmkit.conditioning import Conditioner, ConditionerConfig
    from ldmkit.pipeline import DiffusionConfig, LatentDiffusion, LatentDiffusionConfig

    unet = common.unet_config(name)
    if name == "mid":  # f = 8, a quarter-width SD VAE
        ae = AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4,
                               scaling_factor=0.18215)  # fmt: skip
    elif name == "sd1":
        from ldmkit.interop.presets import vae_sd

        ae = vae_sd()
    else:  # f = 4, the demo's autoencoder (ae_shapes)
        ae = AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4,
                               scaling_factor=1.0)  # fmt: skip
    f = 2 ** (len(ae.channel_mult) - 1)
    cfg = LatentDiffusionConfig(
        autoencoder=ae, unet=unet, conditioner=ConditionerConfig(text_encoder=None),
        diffusion=DiffusionConfig(prediction_type="eps", timestep_spacing="trailing"), image_size=res * f,
    )  # fmt: skip
    text = common.FixedTextEncoder(unet.context_dim, common.CONTEXT_TOKENS[name])
    torch.manual_seed(seed)
    with torch.device(device):
        ldm = LatentDiffusion.from_config(cfg, conditioner=Conditioner(cfg.conditioner, text_encoder=text))
    return ldm.eval()


def diffusers_side(ldm, device: str):
    """(unet, vae, make_scheduler) for the diffusers loop, same weights as `ldm`."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from ldmkit.interop.diffusers import to_diffusers

    unet = to_diffusers(ldm.unet).to(device).eval()
    vae = to_diffusers(ldm.autoencoder).to(device).eval()
    d = ldm.config.diffusion
    common_kw = dict(num_train_timesteps=d.num_timesteps, beta_schedule=d.schedule, beta_start=d.beta_start,
                     beta_end=d.beta_end, prediction_type={"eps": "epsilon", "v": "v_prediction"}[d.prediction_type],
                     timestep_spacing=d.timestep_spacing, steps_offset=d.steps_offset)  # fmt: skip

    def make_scheduler(sampler: str):
        if sampler == "ddim":
            return DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common_kw)
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                                           final_sigmas_type="zero", **common_kw)  # fmt: skip

    return unet, vae, make_scheduler


@torch.no_grad()
def diffusers_sample(unet, vae, scheduler, ldm, prompts, steps, guidance, seed=0):
    """StableDiffusionPipeline's denoising loop (diffusers 0.2x-0.4x), written out."""
    device = next(unet.parameters()).device
    text = ldm.conditioner.text_encoder
    cond, _ = text(list(prompts))
    uncond, _ = text([""] * len(prompts))
    emb = torch.cat([uncond, cond]).to(device)  # (2B, M, D)
    g = torch.Generator(device="cpu").manual_seed(seed)
    latents = torch.randn((len(prompts), *ldm.latent_shape), generator=g).to(device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise = unet(inp, t, encoder_hidden_states=emb).sample
        noise_uncond, noise_cond = noise.chunk(2)
        noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    return vae.decode(latents / sf + shift).sample.clamp(-1, 1)


def prompts_for(batch: int) -> list[str]:
    return [f"caption {i}" for i in range(batch)]


def memory_child(spec: dict) -> None:
    """Fresh process: build both sides, drop the other side's networks, then the peak RSS growth
    of one sampling call (both sides are built and dropped alike, so neither measures on the other's
    freed pages; `common.RssPeak` also hands freed memory back to the OS first)."""
    torch.set_num_threads(spec["threads"])
    ldm = build_ldm(spec["config"], spec["res"])
    prompts = prompts_for(spec["batch"])
    unet, vae, make_scheduler = diffusers_side(ldm, "cpu")
    if spec["side"] == "ldmkit":
        del unet, vae
        run = lambda: ldm_sample(ldm, texts=prompts, steps=spec["steps"], sampler=spec["sampler"], guidance=spec["guidance"])  # noqa: E731
    else:
        ldm.unet = ldm.autoencoder = None  # the diffusers loop reads only the text encoder and config of ldm
        run = lambda: diffusers_sample(unet, vae, make_scheduler(spec["sampler"]), ldm, prompts, spec["steps"], spec["guidance"])  # noqa: E731
    ldm.conditioner.text_encoder(prompts + [""])  # encode (cache) captions before measuring
    with common.RssPeak() as p:
        run()
    print(json.dumps({"peak_mib": p.mib}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="CONFIG:BATCH:LATENT_RES ...")
    p.add_argument("--samplers", nargs="+", default=["dpmpp_2m", "ddim"], choices=["dpmpp_2m", "ddim"])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-flops", action="store_true", help="skip counting FLOPs (one extra run per side)")
    p.add_argument("--peak-sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(json.loads(args.memory_child))
    torch.set_num_threads(args.threads)

    peak, peak_n = common.measure_peak(torch.float32, args.device, args.peak_sizes)
    print(common.machine_line(args.device))
    print()
    print(common.peak_table({"float32": (peak, peak_n)}))
    print()

    rows = []
    for name, batch, res in common.parse_cases(args.cases):
        ldm = build_ldm(name, res, args.device)
        unet, vae, make_scheduler = diffusers_side(ldm, args.device)
        prompts = prompts_for(batch)
        for sampler in args.samplers:
            out = {}

            def ours():
                out["ldmkit"] = ldm_sample(ldm, texts=prompts, steps=args.steps, sampler=sampler, guidance=args.guidance)

            def theirs():
                out["diffusers"] = diffusers_sample(unet, vae, make_scheduler(sampler), ldm, prompts, args.steps,
                                                    args.guidance)  # fmt: skip

            fns = {"ldmkit": ours, "diffusers": theirs}
            times = common.interleave(fns, args.repeats, args.warmup, args.device)
            diff = (out["ldmkit"] - out["diffusers"]).abs().max().item()
            flops = {s: float("nan") for s in fns} if args.no_flops else {s: common.count_flops(f) for s, f in fns.items()}
            mem = {}
            for side in fns:
                if args.no_memory or args.device != "cpu":
                    mem[side] = float("nan")
                    continue
                spec = dict(side=side, config=name, batch=batch, res=res, sampler=sampler, steps=args.steps,
                            guidance=args.guidance, threads=args.threads)  # fmt: skip
                mem[side] = common.child_peak_rss(__file__, ["--_memory-child", json.dumps(spec)])
            med = {s: common.median(v) for s, v in times.items()}
            ips = {s: batch / med[s] for s in med}
            f = 2 ** (len(ldm.config.autoencoder.channel_mult) - 1)
            row = [name, sampler, str(batch), f"{res * f}px ({res}x{res})"]
            row += [f"{ips[s]:.2f} ±{100 * common.spread(times[s]):.0f}%" for s in fns]
            row.append(f"**{ips['ldmkit'] / ips['diffusers']:.2f}**")
            row += [f"{flops[s] / med[s] / 1e9:.1f} ({100 * flops[s] / med[s] / peak:.0f}%)" for s in fns]
            row.append(f"{flops['ldmkit'] / flops['diffusers']:.2f}")
            row += [f"{mem[s]:.0f}" for s in fns]
            row.append(f"{diff:.1e}")
            rows.append(row)
            print(f"  done {name}:{batch}:{res} {sampler}", file=sys.stderr, flush=True)
    header = ["U-Net", "sampler", "batch", "image", "ldmkit images/s", "diffusers images/s", "ratio",
              "ldmkit GFLOP/s (% fp32 peak)", "diffusers GFLOP/s (% fp32 peak)", "FLOPs ldmkit / diffusers", "ldmkit peak MiB",
              "diffusers peak MiB", "max |Δ pixel|"]  # fmt: skip
    print(f"Sampling, {args.steps} steps, CFG {args.guidance} (batched uncond/cond), + decode, fp32; median of "
          f"{args.repeats} alternated runs after {args.warmup} warm-up; ratio = ldmkit / diffusers images/s; "
          "peak MiB = peak RSS growth during one sampling call in a fresh process.")  # fmt: skip
    print()
    print(common.markdown_table(header, rows))


if __name__ == "__main__":
    main()
