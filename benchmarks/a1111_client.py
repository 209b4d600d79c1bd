"""The A1111 client check of issue 28: the third-party `webuiapi` client, with its own defaults, against
`ldmkit serve` running a 512-px model; then 768×512 with the hires fix at 1.5×.

The model has SD 1.5's layout where it matters to the server (f = 8, 4 latent channels, four U-Net levels,
so sizes step by 64 px; 512-px training size; the bundled MiniLM text encoder) but narrow random weights,
so the check runs in a minute on a CPU. It prints, for each call, the size asked for, the size of every
image returned, the wall time and the PNG's `parameters` chunk, and exits non-zero if a size or the
parameters are wrong.

    python benchmarks/a1111_client.py            # needs the serve extra and webuiapi (both in dev)
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def build(folder: Path) -> None:
    from ldmkit.autoencoder import AutoencoderConfig
    from ldmkit.checkpoint import save_checkpoint
    from ldmkit.conditioning import ConditionerConfig
    from ldmkit.pipeline import LatentDiffusion, LatentDiffusionConfig
    from ldmkit.unet import UNetConfig

    torch.manual_seed(0)
    ae = AutoencoderConfig(base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4,
                           latent_channels=4, scaling_factor=0.18215)
    unet = UNetConfig(model_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                      num_heads=2, norm_groups=4, context_dim=384)
    cfg = LatentDiffusionConfig(autoencoder=ae, unet=unet, conditioner=ConditionerConfig(text_encoder="minilm"),
                                image_size=512)
    ldm = LatentDiffusion.from_config(cfg)
    save_checkpoint(folder, 1, "latent_diffusion", ldm, ldm.config)


def main() -> int:
    import uvicorn
    import webuiapi

    from ldmkit.serve import create_app

    root = Path(tempfile.mkdtemp(prefix="a1111-client-"))
    build(root / "sd512")
    app = create_app([str(root / "sd512")], queue_size=2)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=7861, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    api = webuiapi.WebUIApi(host="127.0.0.1", port=7861)  # the client's own defaults: 512x512, Euler a, 20 steps
    # (name, the call's arguments, the images' size, what the PNG's parameters must say: A1111 writes the
    # first pass's size and the hires scale)
    cases = [("client defaults", {}, (512, 512), ["Size: 512x512"]),
             ("768x512, hires fix 1.5x", dict(width=768, height=512, enable_hr=True, hr_scale=1.5,
                                             hr_upscaler="Latent", denoising_strength=0.6, steps=10), (1152, 768),
              ["Size: 768x512", "Hires upscale: 1.5", "Hires upscaler: Latent", "Denoising strength: 0.6"])]
    ok = True
    for name, kw, want, says in cases:
        t0 = time.perf_counter()
        r = api.txt2img(prompt="a red (square:1.2) in the top left", seed=3, **kw)
        dt = time.perf_counter() - t0
        sizes = [im.size for im in r.images]
        params = r.image.info.get("parameters", "")
        good = all(s == want for s in sizes) and all(x in params for x in says)
        ok &= good
        print(f"{name}: asked {want[0]}x{want[1]}, got {sizes}, {dt:.1f} s, {'ok' if good else 'WRONG'}")
        print("  parameters: " + params.replace("\n", " | "))
    server.should_exit = True
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
