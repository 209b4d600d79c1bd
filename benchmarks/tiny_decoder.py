"""Decode time of a tiny decoder (TAESD's architecture) against the full first stage, and, for a distilled one,
its held-out PSNR against the full decoder and the images.

    python benchmarks/tiny_decoder.py --sd                      # SD 1.5's VAE decoder vs TAESD, 512x512, batch 1
    python benchmarks/tiny_decoder.py --autoencoder runs/demo/autoencoder --tiny runs/tiny-decoder \
        --diffusion runs/demo/diffusion                        # + PSNR on the diffusion model's own samples

`--sd` builds both networks with random weights (the real architectures: `ldmkit.interop.presets.vae_sd` and
diffusers' AutoencoderTiny defaults), so nothing is downloaded; time does not depend on the weights. With
`--autoencoder`/`--tiny` (a run of `ldmkit distill-decoder`) the figures are of the trained pair on the first
stage's held-out images, and with `--diffusion` on the latents that model samples for the held-out captions
(25 DPM++ 2M steps, guidance 2: the demo's report), decoded by both. Timings interleave the two decoders (common.interleave) and report the median; FLOPs
are counted by torch's flop counter (convolutions and matmuls only). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, interleave, median  # noqa: E402

from ldmkit.autoencoder import AutoencoderKL  # noqa: E402
from ldmkit.autoencoder.tiny import TinyAutoencoder, TinyAutoencoderConfig  # noqa: E402


def row(name: str, fn, z: torch.Tensor, times: list[float]) -> str:
    flops = count_flops(lambda: fn(z))
    return f"| {name} | {tuple(z.shape)} | {flops / 1e9:.1f} | {1000 * median(times):.1f} |"


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sd", action="store_true", help="SD 1.5's VAE decoder against TAESD (random weights)")
    p.add_argument("--size", type=int, default=512, help="--sd: image side in pixels")
    p.add_argument("--autoencoder", default=None, help="a first stage (ldmkit folder)")
    p.add_argument("--tiny", default=None, help="its tiny decoder (a folder from `ldmkit distill-decoder`)")
    p.add_argument("--diffusion", default=None, help="a diffusion model on the same first stage: PSNR on its samples")
    p.add_argument("--batch", type=int, default=None, help="latents per decode (default: 1 with --sd, else 64)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if a.sd:
        from ldmkit.interop.presets import vae_sd

        full, tiny = AutoencoderKL(vae_sd()).eval(), TinyAutoencoder(TinyAutoencoderConfig()).eval()
        z = torch.randn(a.batch or 1, 4, a.size // 8, a.size // 8)
        names = ("SD 1.5 VAE decoder", "TAESD decoder")
    else:
        import ldmkit
        from ldmkit.evaluate.metrics import psnr
        from ldmkit.train.config import DataConfig
        from ldmkit.train.data import open_val_data

        full, tiny = ldmkit.load(a.autoencoder), ldmkit.load(a.tiny)
        meta = json.loads((ldmkit.checkpoint.resolve(a.tiny) / "config.json").read_text())["meta"]
        x = open_val_data(DataConfig(dataset=meta["dataset"], size=meta["image_size"]), 256, False).images
        z = full.normalize(full.encode(x).mean)  # (N, c, h, w): held-out z'
        big, small = full.decode_latents(z).clamp(-1, 1), tiny.decode_latents(z).clamp(-1, 1)
        print(f"{len(x)} held-out {meta['dataset']} images: tiny vs full decoder {psnr(small, big).mean():.2f} dB, "
              f"tiny vs images {psnr(small, x).mean():.2f} dB, full vs images {psnr(big, x).mean():.2f} dB\n")
        if a.diffusion:
            from ldmkit.generation import GenerationRequest, generate

            val = open_val_data(DataConfig(dataset=meta["dataset"], size=meta["image_size"]), 1024, False)
            prompts = sorted(set(val.texts)) * 2  # every held-out caption, two seeds each
            out = generate(ldmkit.load(a.diffusion), GenerationRequest(prompt=prompts, steps=25, sampler="dpmpp_2m",
                                                                      guidance=2.0, seed=0, batch_size=64), decode=False)
            big, small = full.decode_latents(out.latents).clamp(-1, 1), tiny.decode_latents(out.latents).clamp(-1, 1)
            print(f"{len(prompts)} samples of {a.diffusion}: tiny vs full decoder {psnr(small, big).mean():.2f} dB")
            if meta["dataset"].startswith("shapes"):  # the attribute judge, strict shape included (docs/shape-judge.md)
                from ldmkit.evaluate.attributes import score_captions

                for name, images in (("full", big), ("tiny", small)):
                    r = score_captions(images, prompts, strict=True)
                    print(f"  judged, {name} decoder: colour {100 * r['colour']:.1f} %, position {100 * r['position']:.1f} %, "
                          f"shape {100 * r['shape']:.1f} %, strict shape {100 * r['shape_strict']:.1f} %")
            print()
        z = z[: a.batch or 64]
        names = ("full decoder", "tiny decoder")
    fns = {names[0]: lambda: full.decode_latents(z), names[1]: lambda: tiny.decode_latents(z)}
    times = interleave(fns, a.repeats)
    print("| decoder | latents | GFLOP | ms (median) |\n| --- | --- | --- | --- |")
    for name, fn in zip(names, (full.decode_latents, tiny.decode_latents)):
        print(row(name, fn, z, times[name]))
    print(f"\nspeed-up {median(times[names[0]]) / median(times[names[1]]):.1f}x; parameters "
          f"{sum(q.numel() for q in full.decoder.parameters()) / 1e6:.2f}M vs {sum(q.numel() for q in tiny.parameters()) / 1e6:.2f}M")


if __name__ == "__main__":
    main()
