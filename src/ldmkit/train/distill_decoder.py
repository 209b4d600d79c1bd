"""`ldmkit distill-decoder`: a tiny decoder (TAESD's architecture, `ldmkit.autoencoder.tiny`) trained to
reproduce a first stage's decoder on the latents a diffusion model samples.

    once:     load the first stage (frozen) and encode the training set to q(z|x) (the latent cache)
    per step: z' = (z − shift)·scale with z ~ q(z|x)        the second stage's normalised latents
              L = ‖D_tiny(z') − clamp(D(z/scale + shift))‖²  the full decoder's image is the target
    periodic: held-out PSNR of D_tiny against D and against the images, a grid (images / D / D_tiny)
    end:      the same figures, and the decode time of both on one held-out batch

The target is the full decoder's output, not the image: the tiny decoder stands in for D wherever D would
decode (sampling, previews), so its error is measured against D; against the images it cannot beat D.
It works in the normalised space z' itself (scaling_factor 1, shift 0), as TAESD does for SD's scaled
latents, so `decode_latents(z')` is what `LatentDiffusion.decode(z')` decodes. Latents are posterior samples,
not means: the diffusion model's samples are spread like them. Every random draw of step k comes from a
generator seeded by (seed, k), so a resumed run repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ldmkit.autoencoder import AutoencoderKL
from ldmkit.autoencoder.tiny import TinyAutoencoder, TinyAutoencoderConfig
from ldmkit.device import autocast
from ldmkit.errors import LdmkitError
from ldmkit.evaluate.metrics import psnr
from ldmkit.imageio import save_grid
from ldmkit.train.config import DataConfig, LoggingConfig, OptimConfig, save_config
from ldmkit.train.data import MemoryData, open_train_data, open_val_data, posterior_of
from ldmkit.train.diffusion_task import load_first_stage
from ldmkit.train.latents import encode_dataset, sample_latents
from ldmkit.train.loop import Task, fit


class DecoderDistillConfig(BaseModel):
    """Everything `ldmkit distill-decoder` needs. Saved as OUT/train_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    autoencoder: str = Field("runs/demo/autoencoder", description="the first stage whose decoder is reproduced "
                             "(an ldmkit autoencoder folder, a diffusers AutoencoderKL folder, a pipeline or single file)")
    channels: tuple[int, ...] | None = Field(
        None, description="width of each decoder level, lowest resolution first, one per level of the first stage "
        "(None: TAESD's 64 at every level)")
    blocks: tuple[int, ...] | None = Field(
        None, description="residual blocks of each level, lowest resolution first (None: TAESD's 3, one at full size)")
    data: DataConfig = Field(DataConfig(dataset=""), description="dataset '' is the first stage's own, at its size "
                             "(its checkpoint's meta)")
    optim: OptimConfig = OptimConfig(steps=5000, batch_size=16, lr=1e-3, warmup_steps=100, grad_clip=None)
    logging: LoggingConfig = LoggingConfig(val_every=500, ckpt_every=500)

    def tiny_config(self, ae: AutoencoderKL) -> TinyAutoencoderConfig:
        """The decoder for `ae`: one level per level of its decoder, its latent and image channels."""
        levels = int(math.log2(ae.downsample_factor)) + 1
        channels = self.channels or (64,) * levels
        blocks = self.blocks or (3,) * (levels - 1) + (1,)
        for name, value in (("channels", channels), ("blocks", blocks)):
            if len(value) != levels:
                raise LdmkitError(f"{name} has {len(value)} entries but the first stage (f = {ae.downsample_factor}) has "
                                  f"{levels} levels; give {levels} (--set {name}=[...]) or use --config taesd")
        return TinyAutoencoderConfig(in_channels=ae.config.in_channels, latent_channels=ae.config.latent_channels,
                                     decoder_channels=channels, decoder_blocks=blocks, encoder=False)


def decoder_demo() -> DecoderDistillConfig:
    """The demo's first stage (`train-autoencoder --config demo`: f = 4, 4 channels, 32x32 `shapes`): widths 32, 16,
    16 from the latent up, narrower than TAESD where the pixels are many, as the demo's decoder is. 2,000 steps:
    39.1 dB against the full decoder, 1,000 gave 36.8 dB and a third fewer strict shape passes on the demo's samples
    (docs/benchmarks.md, "A tiny decoder")."""
    return DecoderDistillConfig(channels=(32, 16, 16), blocks=(2, 1, 1), data=DataConfig(dataset="", length=2048),
                                optim=OptimConfig(steps=2000, batch_size=32, lr=2e-3, warmup_steps=50, grad_clip=None),
                                logging=LoggingConfig(val_every=250, ckpt_every=500))


def decoder_taesd() -> DecoderDistillConfig:
    """TAESD's size (width 64, blocks 3, 3, …, 1), for larger first stages and images."""
    return DecoderDistillConfig()


def decoder_tiny() -> DecoderDistillConfig:
    """A seconds-long run for tests."""
    return DecoderDistillConfig(channels=(8, 8, 8), blocks=(1, 1, 1), data=DataConfig(dataset="", length=64, val_images=16),
                                optim=OptimConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=1, grad_clip=None),
                                logging=LoggingConfig(log_every=2, val_every=3, ckpt_every=3))


DECODER_PRESETS: dict[str, Callable[[], DecoderDistillConfig]] = {
    "demo": decoder_demo,
    "taesd": decoder_taesd,
    "tiny": decoder_tiny,
}


@torch.no_grad()
def decoder_figures(ae: AutoencoderKL, tiny: TinyAutoencoder, images: torch.Tensor, batch_size: int = 64) -> dict:
    """Held-out PSNR (dB, mean over images) of the tiny decoder against the full decoder and against the images,
    and of the full decoder against the images, on the posterior means of `images` (N, 3, H, W) in [-1, 1]."""
    device = next(tiny.parameters()).device
    sums = {"psnr_decoder": 0.0, "psnr_images": 0.0, "full_psnr_images": 0.0}
    for x in images.split(batch_size):
        x = x.to(device)
        z = ae.normalize(ae.encode(x).mean)  # (B, c, h, w): z'
        full = ae.decode_latents(z).clamp(-1, 1)  # (B, 3, H, W)
        small = tiny.decode_latents(z).clamp(-1, 1)
        sums["psnr_decoder"] += psnr(small, full).sum().item()
        sums["psnr_images"] += psnr(small, x).sum().item()
        sums["full_psnr_images"] += psnr(full, x).sum().item()
    return {k: v / len(images) for k, v in sums.items()}


@torch.no_grad()
def decode_seconds(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, repeats: int = 5) -> float:
    """Median wall time of decode(z), after one warm-up call."""
    decode(z)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        decode(z)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


class DecoderDistillTask(Task):
    """The tiny decoder for `fit`: trained on the frozen first stage's decodes of posterior samples."""

    name = "distill-decoder"
    kind = "tiny_autoencoder"
    plot_keys = ("loss", "val_psnr_decoder")

    def __init__(self, cfg: DecoderDistillConfig, out: Path, dist, device: torch.device, progress: bool):
        super().__init__(cfg, out, dist, device, progress)
        self.ae, self.ae_meta = load_first_stage(cfg.autoencoder)
        d, o = cfg.data, cfg.optim
        if not d.dataset:  # the first stage's own data, at its size
            if not self.ae_meta.get("dataset"):
                raise LdmkitError(f"{cfg.autoencoder} does not record the data it learned; pass --data NAME_OR_FOLDER")
            d.dataset, d.size = self.ae_meta["dataset"], int(self.ae_meta.get("image_size", d.size))
            if self.main:  # the run's config names the data it read
                save_config(cfg, out / "train_config.yaml")
        if d.size % self.ae.downsample_factor:
            raise LdmkitError(f"data.size {d.size} is not a multiple of the first stage's factor {self.ae.downsample_factor}")
        self.ae.to(device)
        self.source = open_train_data(d, o.batch_size, d.seed, dist, o.grad_accum, self.progress)
        self.val = open_val_data(d, d.val_images, self.progress)
        self.mean = self.std = None
        if isinstance(self.source, MemoryData):
            self.mean, self.std = encode_dataset(self.ae, self.source.data, progress=self.progress, cache=d.latent_cache)
        self.model_config = cfg.tiny_config(self.ae)
        self.module = self.model = TinyAutoencoder(self.model_config).to(device).train()
        self.metrics: dict[str, float] = {}

    def forward_module(self) -> nn.Module:
        return self.model.decoder  # z' → image; encoder-less, so z' is its own latent (scaling 1, shift 0)

    def piece_loss_at(self, step: int):
        o, ae = self.optim, self.ae
        shift, scale = ae.config.shift_factor, ae.config.scaling_factor

        def piece_loss(lo: int, hi: int) -> torch.Tensor:
            batch = self.source.batch(step, lo, hi)
            mean, std = posterior_of(batch, self.mean, self.std, ae, self.device)
            _, z = sample_latents(mean, std, o, step, lo, hi, shift, scale)  # (b, c, h, w): z' of a posterior sample
            with torch.no_grad():
                target = ae.decode_latents(z).clamp(-1, 1)  # (b, 3, H, W): what the full decoder shows
            with autocast(o.precision, self.device):
                pred = self.trained(z)  # (b, 3, H, W)
            return (pred.float() - target).pow(2).mean()

        return piece_loss

    def _eval_model(self) -> TinyAutoencoder:
        return self.ema.module if self.ema is not None else self.model

    def periodic(self, done: int) -> None:
        """Held-out PSNR and a grid (images / full decoder / tiny decoder) every val_every steps and at the end."""
        if not (self.main and (done % self.cfg.logging.val_every == 0 or done == self.optim.steps)):
            return
        model = self._eval_model().eval()
        self.metrics = decoder_figures(self.ae, model, self.val.images)
        self.log.write(done, **{f"val_{k}": v for k, v in self.metrics.items()})
        with torch.no_grad():
            x = self.val.images[:8].to(self.device)  # (8, 3, H, W)
            z = self.ae.normalize(self.ae.encode(x).mean)
            rows = [x, self.ae.decode_latents(z).clamp(-1, 1), model.decode_latents(z).clamp(-1, 1)]
        model.train()
        grid = self.out / "samples" / f"decoders_{done:08d}.png"
        save_grid(torch.cat(rows).cpu(), grid, nrow=len(x), upscale=max(1, 64 // x.shape[-1]))
        self.log.image("images / full decoder / tiny decoder", grid, done)

    def postfix(self) -> dict[str, str]:
        return {"psnr": f"{self.metrics['psnr_decoder']:.1f}"} if self.metrics else {}

    def finish(self, step: int, t0: float) -> dict:
        train_seconds = round(time.time() - t0, 1)
        model = self._eval_model().eval()
        if not self.metrics:  # a run resumed at its last step
            self.metrics = decoder_figures(self.ae, model, self.val.images)
        with torch.no_grad():
            z = self.ae.normalize(self.ae.encode(self.val.images[:64].to(self.device)).mean)
        timing = {"images": len(z), "full_seconds": decode_seconds(self.ae.decode_latents, z),
                  "tiny_seconds": decode_seconds(model.decode_latents, z)}
        model.train()
        self.source.close()
        return {"step": step, "val": self.metrics, "decode_time": timing, "train_seconds": train_seconds,
                "autoencoder": str(Path(self.cfg.autoencoder).resolve()),
                "dataset": self.cfg.data.dataset, "image_size": self.cfg.data.size}


def distill_decoder(cfg: DecoderDistillConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train a tiny decoder for cfg.autoencoder; returns the final checkpoint folder (an ldmkit
    `tiny_autoencoder` folder that `ldmkit sample --tiny-decoder` and `ldmkit serve --tiny-decoder` read)."""
    from ldmkit.train.distributed import cleanup, setup

    dist_info, device = setup(cfg.optim.device)
    try:
        return fit(DecoderDistillTask, cfg, Path(out), resume, progress, None, dist_info, device)
    finally:
        cleanup(dist_info)
