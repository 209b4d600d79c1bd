"""Images in seconds on a CPU (issue 31, part 2): an SD 1.5-sized model, 512x512, LCM 4 steps, batch 1, text
encoder included, ldmkit's CPU paths against diffusers (same weights, same steps).

The model is the real architecture with random weights: diffusers' SD 1.5 U-Net (from ldmkit's preset through
`config_to_diffusers`), SD's VAE, a CLIP ViT-L-sized text transformer, and a CLIP BPE tokenizer built in memory
(printable ASCII, as tests/test_interop.py builds it: nothing is downloaded), saved once as a diffusers pipeline
folder that both sides load. Every row runs in its own process, so its peak RSS is its own (weights included).

Rows (warm: one image first, then the median of --repeats): diffusers fp32 `StableDiffusionPipeline` with
`LCMScheduler`; ldmkit fp32; ldmkit `--precision auto` (bf16 autocast on a CPU with AVX512-BF16/AMX, the U-Net
only); ldmkit `--backend openvino`; optimum-intel's `OVStableDiffusionPipeline` where it imports. Then the U-Net
alone: its FLOPs per step (torch.utils.flop_counter), seconds per call in fp32 / bf16 / OpenVINO, the achieved
GFLOP/s and its ratio to a bf16 matmul peak measured in the same run (a 4096² torch.mm). Then whole processes:
`ldmkit sample` against a diffusers script doing the same, the second run of each timed (loading included).
Then 25-step DPM++ with guidance 7.5 (batch 2 through the U-Net). The "TAESD decoder" rows decode with a
random-weight `AutoencoderTiny` of TAESD's architecture (saved in the folder as `taesd/`): time, not quality.

    python benchmarks/cpu_speed.py                 # the full run (SD 1.5 size; about 10 min on 2 cores)
    python benchmarks/cpu_speed.py --quick         # smoke size: a quarter-width model at 128x128
    python benchmarks/cpu_speed.py --part whole --folder runs/cpu/sd --cache runs/cpu/ov   # whole processes only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, markdown_table, median  # noqa: E402

PROMPT = "a cat sitting on a red sofa"
OPTIMUM_NOTE = ("optimum-intel not installed: `pip install optimum-intel` (2.2.0) would replace torch 2.13 (CPU) by "
                "torch 2.14.1 with its CUDA libraries and transformers 5.25 by 5.5.4")


def tokenizer():
    import transformers

    chars = [chr(i) for i in range(33, 127)]
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=77)


def build_folder(folder: Path, quick: bool) -> Path:
    """A diffusers SD 1.5-sized pipeline with random weights (quick: a quarter-width one)."""
    import diffusers
    import transformers

    from ldmkit.interop.diffusers_unet import config_to_diffusers
    from ldmkit.unet import unet_sd1

    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(0)
    tok = tokenizer()
    width, layers = (256, 2) if quick else (768, 12)  # CLIP ViT-L/14's text transformer: 768 wide, 12 layers
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_attention_heads=width // 64,
        num_hidden_layers=layers, max_position_embeddings=77, bos_token_id=len(tok) - 2, eos_token_id=len(tok) - 1,
        pad_token_id=len(tok) - 1))  # fmt: skip
    unet_cfg = unet_sd1(zero_init=False, **({"model_channels": 64, "num_heads": 4, "context_dim": width} if quick else {}))
    unet = diffusers.UNet2DConditionModel(**config_to_diffusers(unet_cfg))
    ch = (32, 64, 128, 128) if quick else (128, 256, 512, 512)
    vae = diffusers.AutoencoderKL(block_out_channels=ch, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                                  norm_num_groups=32, sample_size=512)
    sched = diffusers.LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    pipe = diffusers.StableDiffusionPipeline(vae=vae.eval(), text_encoder=te.eval(), tokenizer=tok, unet=unet.eval(),
                                             scheduler=sched, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    # TAESD's architecture (diffusers' AutoencoderTiny defaults: widths 64, 3 blocks a level) with random weights:
    # the tiny decoder FastSD CPU pairs with LCM; its time does not depend on the weights
    diffusers.AutoencoderTiny(**({"decoder_block_out_channels": (16, 16, 16, 16), "encoder_block_out_channels": (16, 16, 16, 16)}
                                 if quick else {})).save_pretrained(str(folder / "taesd"))
    return folder


def peak_mib() -> float:
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024


# ---- one row, in its own process


def row(kind: str, folder: str, size: int, steps: int, guidance: float, sampler: str, repeats: int, cache: str) -> dict:
    if kind == "optimum":
        try:
            from optimum.intel import OVStableDiffusionPipeline
        except ImportError:
            return {"unavailable": OPTIMUM_NOTE}
        pipe = OVStableDiffusionPipeline.from_pretrained(folder, export=True)
        run = lambda: pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size)  # noqa: E731
    elif kind == "diffusers":
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        if sampler != "lcm":
            pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        run = lambda: pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size)  # noqa: E731
    else:
        import ldmkit
        from ldmkit.device import autocast
        from ldmkit.generation import GenerationRequest, generate
        from ldmkit.generation.openvino import with_backend

        from ldmkit.sample import read_tiny_decoder

        kind, tiny = kind.removesuffix("+taesd"), kind.endswith("+taesd")
        ldm = ldmkit.load(folder)
        decoder = read_tiny_decoder(Path(folder) / "taesd", ldm) if tiny else None
        precision = "fp32" if kind == "ldmkit-fp32" else "auto"
        ldm = with_backend(ldm, "openvino" if kind == "openvino" else "torch", precision, cache)
        amp = autocast(precision if kind != "openvino" else "fp32", "cpu")

        def run():
            with amp:
                return generate(ldm, GenerationRequest(prompt=[PROMPT], steps=steps, sampler=sampler, guidance=guidance,
                                                       height=size, width=size, seed=0), decoder=decoder)
    t0 = time.perf_counter()
    run()  # warm-up (OpenVINO: compiles this shape)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"seconds": median(times), "first": first, "peak_mib": peak_mib()}


def unet_row(folder: str, size: int, cache: str) -> dict:
    """The U-Net alone at batch 1: FLOPs, seconds per call (fp32, bf16 autocast, OpenVINO bf16) and the bf16
    matmul peak of this machine, measured in the same process."""
    from torch.utils.flop_counter import FlopCounterMode

    import ldmkit
    from ldmkit.device import resolve_precision
    from ldmkit.generation.openvino import openvino_model

    ldm = ldmkit.load(folder)
    x, t = torch.randn(1, 4, size // 8, size // 8), torch.tensor([500.0])
    ctx = torch.randn(1, 77, ldm.config.unet.context_dim)

    def timed(fn, n=2):
        fn()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return median(out)

    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            ldm.unet(x, t, context=ctx.clone())
        flops = fc.get_total_flops()
        res = {"flops": flops, "fp32": timed(lambda: ldm.unet(x, t, context=ctx.clone()))}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res["bf16"] = timed(lambda: ldm.unet(x, t, context=ctx.clone()))
        ov = openvino_model(ldm, cache, "auto")
        res["openvino"] = timed(lambda: ov.unet(x, t, context=ctx))
        res["openvino_hint"] = "bf16" if resolve_precision("auto") == "bf16" else "f32"
        a = torch.randn(4096, 4096, dtype=torch.bfloat16)
        res["mm_peak"] = 2 * 4096**3 / timed(lambda: torch.mm(a, a), 3)
    return res


DIFFUSERS_SCRIPT = """
import sys, diffusers
pipe = diffusers.StableDiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)
pipe.set_progress_bar_config(disable=True)
pipe(sys.argv[3], num_inference_steps=4, guidance_scale=1.0, height=int(sys.argv[4]), width=int(sys.argv[4])).images[0].save(sys.argv[2])
"""


def whole(cmd: list[str]) -> float:
    """Seconds of the second of two runs of `cmd` (the first fills the OS file cache and any converted models)."""
    for k in range(2):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if k:
            return time.perf_counter() - t0
    raise AssertionError


def child(args, what: str) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--folder", str(args.folder), "--size", str(args.size),
           "--repeats", str(args.repeats), "--cache", str(args.cache), "--dpm-steps", str(args.dpm_steps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"unavailable": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def whole_rows(args, tmp: Path) -> None:
    """Whole processes, each run twice and the second timed: a diffusers script against `ldmkit sample`."""
    out = tmp / "out"
    py = [sys.executable, "-c", DIFFUSERS_SCRIPT, str(args.folder), str(tmp / "d.png"), PROMPT, str(args.size)]
    ldm_cmd = [sys.executable, "-m", "ldmkit.cli", "sample", "--checkpoint", str(args.folder), "--prompt", PROMPT,
               "--steps", "4", "--sampler", "lcm", "--guidance", "1", "--width", str(args.size), "--height", str(args.size),
               "--device", "cpu", "--quiet", "--out", str(out)]
    d = whole(py)
    wrows = [["diffusers script (fp32)", f"{d:.1f}", "1.00x"]]
    ov = ["--backend", "openvino", "--backend-cache", str(args.cache)]
    for label, extra in (("ldmkit sample (auto)", []), ("ldmkit sample --backend openvino", ov),
                         ("ldmkit sample --backend openvino --tiny-decoder (TAESD)", ov + ["--tiny-decoder", str(args.folder / "taesd")])):
        s = whole(ldm_cmd + extra)
        wrows.append([label, f"{s:.1f}", f"{d / s:.2f}x"])
    print("\n## Whole processes, second run, loading included\n")
    print(markdown_table(["", "s", "vs diffusers"], wrows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke size: a quarter-width model at 128x128, DPM++ 3 steps")
    p.add_argument("--folder", type=Path, default=None, help="where the random pipeline is saved (default: a temp dir)")
    p.add_argument("--cache", type=Path, default=None, help="OpenVINO cache (default: a temp dir, so conversion is counted once)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--dpm-steps", type=int, default=None)
    p.add_argument("--dpm-diffusers", action="store_true", help="also time diffusers fp32 on the DPM++ row (about 5 min more)")
    p.add_argument("--part", choices=("all", "whole"), default="all",
                   help="whole: only the whole-process rows (diffusers script against `ldmkit sample`), about 3 min")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child == "unet":
            res = unet_row(str(args.folder), args.size, str(args.cache))
        else:
            kind, _, dpm = args.child.partition(":")
            res = row(kind, str(args.folder), args.size, args.dpm_steps if dpm else 4, 7.5 if dpm else 1.0,
                      "dpmpp_2m" if dpm else "lcm", args.repeats, str(args.cache))
        print(json.dumps(res))
        return
    args.size = args.size or (128 if args.quick else 512)
    args.dpm_steps = args.dpm_steps or (3 if args.quick else 25)
    tmp = Path(tempfile.mkdtemp(prefix="ldmkit-cpu-speed-"))
    args.folder = build_folder(args.folder or tmp / "sd", args.quick)
    args.cache = args.cache or tmp / "openvino"
    print(machine_line("cpu"), f"threads {torch.get_num_threads()}", flush=True)
    if args.part == "whole":
        whole_rows(args, tmp)
        return

    rows, base = [], None
    for kind, label in (("diffusers", "diffusers fp32"), ("ldmkit-fp32", "ldmkit fp32"), ("ldmkit-auto", "ldmkit auto (bf16 where native)"),
                        ("openvino", "ldmkit --backend openvino"), ("ldmkit-auto+taesd", "ldmkit auto, TAESD decoder"),
                        ("openvino+taesd", "ldmkit --backend openvino, TAESD decoder"),
                        ("optimum", "optimum-intel OVStableDiffusionPipeline")):
        r = child(args, kind)
        if "unavailable" in r:
            rows.append([label, "unavailable", "", "", r["unavailable"]])
        else:
            base = base or r["seconds"]
            rows.append([label, f"{r['seconds']:.1f}", f"{base / r['seconds']:.2f}x", f"{r['peak_mib']:.0f}", f"first {r['first']:.1f} s"])
        print(rows[-1], flush=True)
    print(f"\n## {args.size}x{args.size}, LCM 4 steps, batch 1, text encoder included (warm, per image)\n")
    print(markdown_table(["", "s / image", "vs diffusers", "peak RSS MiB", "note"], rows))

    u = child(args, "unet")
    if "unavailable" not in u:
        peak = u["mm_peak"]
        urows = [[name, f"{u[name]:.2f}", f"{u['flops'] / u[name] / 1e9:.0f}", f"{u['flops'] / u[name] / peak:.0%}"]
                 for name in ("fp32", "bf16", "openvino")]
        print(f"\n## U-Net, one call at batch 1, {args.size // 8}x{args.size // 8} latents: {u['flops'] / 1e12:.3f} TFLOP; "
              f"bf16 matmul peak (4096² torch.mm) {peak / 1e9:.0f} GFLOP/s; OpenVINO hint {u['openvino_hint']}\n")
        print(markdown_table(["", "s / call", "GFLOP/s", "of bf16 peak"], urows))
    else:
        print("U-Net row failed:", u["unavailable"])

    whole_rows(args, tmp)


    drows, dbase = [], None
    for kind, label in ([("diffusers", "diffusers fp32")] if args.dpm_diffusers else []) + [
            ("ldmkit-auto", "ldmkit auto"), ("openvino", "ldmkit --backend openvino")]:
        r = child(args, kind + ":dpm")
        if "unavailable" in r:
            drows.append([label, "unavailable", "", r["unavailable"]])
            continue
        dbase = dbase or r["seconds"]
        drows.append([label, f"{r['seconds']:.1f}", f"{r['peak_mib']:.0f}", f"{dbase / r['seconds']:.2f}x vs first row"])
    print(f"\n## DPM++ 2M, {args.dpm_steps} steps, guidance 7.5 (warm, per image)\n")
    print(markdown_table(["", "s / image", "peak RSS MiB", "note"], drows))


if __name__ == "__main__":
    main()
