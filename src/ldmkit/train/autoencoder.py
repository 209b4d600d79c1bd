"""`ldmkit train-autoencoder`: the first-stage training loop.

    for step: x → q(z|x) → z ~ q → x̂;  L = rec + kl_weight·KL (+ GAN)  → AdamW
    every val_every:  held-out PSNR / SSIM, reconstruction grid PNG
    every ckpt_every: atomic checkpoint (weights, optimizer, step, RNG)
    at the end:       latent mean/std over many batches → scaling_factor / shift_factor
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ldmkit.autoencoder import AutoencoderKL
from ldmkit.autoencoder.losses import AutoencoderLoss
from ldmkit.device import autocast
from ldmkit.evaluate.autoencoder import reconstruction_figures
from ldmkit.imageio import save_grid
from ldmkit.rng import BatchRandom, step_generator
from ldmkit.train.config import AutoencoderTrainConfig, save_config
from ldmkit.data.tensors import TensorData
from ldmkit.train.data import MemoryData, TrainData, check_buckets, open_train_data, open_val_data
from ldmkit.train.loop import Task, adamw, batch_indices, fit
from ldmkit.train.stepper import Stepper


class _Reconstruct(nn.Module):
    """x → q(z|x) → z = μ + σ·ε → x̂ with the noise ε given, as one module for DDP to wrap: the
    trainer draws ε for the global batch (`BatchRandom`), so the run does not depend on the split."""

    def __init__(self, ae: AutoencoderKL):
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor, noise: torch.Tensor):
        post = self.ae.encode(x)
        z = post.mean + post.std * noise if self.ae.config.variational else post.mode()  # reparameterisation
        return self.ae.decode(z), post


@torch.no_grad()
def validate(model: AutoencoderKL, val: TensorData, batch_size: int = 64) -> dict[str, float]:
    """Held-out PSNR/SSIM of posterior-mode reconstructions, the same for bicubic down/up at the
    model's factor (the trivial codec to beat), and KL per latent element."""
    model.eval()
    figures, _ = reconstruction_figures(model, val.images, batch_size)
    model.train()
    return {k: figures[k] for k in ("psnr", "ssim", "kl_per_element", "bicubic_psnr")}


@torch.no_grad()
def latent_statistics(model: AutoencoderKL, batches: Iterable[torch.Tensor], seed: int) -> dict:
    """Per-channel and global mean/std of z ~ q(z|x) over many training batches (images (B, C, H, W) each).

    The second stage wants unit-variance latents (Rombach et al., 2022, §4.3.2 and App. G):
    scaling_factor = 1/std and shift_factor = mean, stored in the checkpoint config.
    """
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    zs = [model.encode(x.to(device)).sample(g).cpu() for x in batches]
    z = torch.cat(zs)  # (N, c, h, w)
    per_mean = z.mean(dim=(0, 2, 3))
    per_std = z.std(dim=(0, 2, 3))
    return {
        "mean": z.mean().item(),
        "std": z.std().item(),
        "channel_mean": per_mean.tolist(),
        "channel_std": per_std.tolist(),
        "num_latents": z.shape[0],
    }


def statistic_batches(source: TrainData, batches: int, batch_size: int, seed: int, rows: tuple[int, int]):
    """The image batches `latent_statistics` reads: whole seeded batches of an in-memory set (as ever), else
    this process's rows of the first `batches` steps of the source's order."""
    if isinstance(source, MemoryData):
        data = source.data
        for b in range(min(batches, max(1, len(data) // batch_size))):
            yield data.images[batch_indices(b, len(data), min(batch_size, len(data)), seed)]
        return
    for b in range(batches):
        yield source.batch(b, *rows)["image"]


class AutoencoderTask(Task):
    """The first stage for `fit`: x → q(z|x) → z → x̂ under `AutoencoderLoss`, with the optional GAN
    discriminator trained by its own optimizer after each generator step (Esser et al., 2021), held-out
    validation, and at the end the latent statistics that give scaling_factor / shift_factor."""

    name = kind = "autoencoder"
    fsdp_refusal = "optim.distributed=fsdp is for the second stage; an autoencoder fits one device, use ddp"
    saves_rng = True
    plot_keys = ("loss", "rec", "kl", "val_psnr", "val_ssim")

    def __init__(self, cfg: AutoencoderTrainConfig, out: Path, dist, device: torch.device, progress: bool):
        super().__init__(cfg, out, dist, device, progress)
        d, o = cfg.data, cfg.optim
        self.source = open_train_data(d, o.batch_size, d.seed, dist, o.grad_accum, self.progress)
        self.val = open_val_data(d, d.val_images, self.progress)
        self.module = self.model = AutoencoderKL(cfg.model).to(device)
        check_buckets(self.source, self.model.downsample_factor, "the first stage's downsampling factor")
        self.model_config = cfg.model  # the same object `finish` fills with the latent scale
        self.loss_fn = AutoencoderLoss(cfg.loss, cfg.model.in_channels).to(device)
        self.disc = self.loss_fn.discriminator  # stays the bare module for checkpoints
        self.d_opt: torch.optim.Optimizer | None = None
        self.d_stepper: Stepper | None = None
        self.latent_shape: torch.Size | None = None
        self.logs: dict[str, float] = {}  # Σ value · rows over this rank's pieces; `global_means` at log time
        self.pieces: list[tuple[torch.Tensor, torch.Tensor]] = []  # (x, x̂) per piece, for the discriminator
        self.metrics: dict[str, float] = {}
        self.model.train()

    def forward_module(self) -> nn.Module:
        return _Reconstruct(self.model)

    def attach(self, state: dict) -> None:
        """The discriminator: its optimizer (resumed), DDP wrapper and stepper."""
        if self.disc is None:
            return
        from ldmkit.train.distributed import wrap

        o = self.optim
        self.d_opt = adamw(self.disc.parameters(), self.cfg.loss.disc_lr or o.lr, (0.5, 0.9), 0.01)  # torch's default decay
        if "disc_optimizer" in state:
            self.disc.load_state_dict(state["discriminator"])
            self.d_opt.load_state_dict(state["disc_optimizer"])
        self.loss_fn.discriminator = wrap(self.disc, self.dist, self.device)
        self.d_stepper = Stepper(self.loss_fn.discriminator, self.d_opt, self.disc.parameters(), None, o.batch_size,
                                 o.grad_accum, self.dist, self.device, self.out, o.precision)

    def extra_state(self) -> dict:
        if self.d_opt is None:
            return {}
        return {"discriminator": self.disc.state_dict(), "disc_optimizer": self.d_opt.state_dict()}

    def _add_logs(self, piece_logs: dict[str, float], n: int) -> None:
        for k, v in piece_logs.items():
            self.logs[k] = self.logs.get(k, 0.0) + v * n

    def piece_loss_at(self, step: int):
        o, cfg = self.optim, self.cfg
        self.logs, self.pieces = {}, []

        def piece_loss(lo: int, hi: int) -> torch.Tensor:
            r = BatchRandom(step_generator(o.seed, step), o.batch_size, lo, hi)
            x = self.source.batch(step, lo, hi)["image"].to(self.device)  # (b, C, H, W)
            if cfg.data.hflip:
                flip = (r.rand() < 0.5).to(self.device)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            if o.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.latent_shape is None:
                with torch.no_grad():
                    self.latent_shape = self.model.encode(x[:1]).mean.shape[1:]
            noise = r.randn(*self.latent_shape).to(self.device)  # (b, c, h, w)
            with autocast(o.precision, self.device):
                x_hat, post = self.trained(x, noise)
            x_hat = x_hat.float()
            loss, piece_logs = self.loss_fn.generator_loss(x, x_hat, post.kl().float(), step,
                                                           self.model.last_layer_weight())
            self._add_logs(piece_logs, hi - lo)
            self.pieces.append((x, x_hat.detach()))
            return loss

        return piece_loss

    def after_update(self, step: int) -> None:
        """The discriminator's step on this step's (x, x̂) pieces, once `loss.disc_start` is reached."""
        if self.d_stepper is None or step < self.cfg.loss.disc_start:
            return

        def d_piece_loss(lo: int, hi: int) -> torch.Tensor:
            d_loss, d_logs = self.loss_fn.discriminator_loss(*self.pieces.pop(0))
            self._add_logs(d_logs, hi - lo)
            return d_loss

        self.d_stepper(step, d_piece_loss)

    def log_values(self) -> dict[str, float]:
        from ldmkit.train.distributed import global_means, micro_batches

        rows = sum(hi - lo for lo, hi in micro_batches(self.optim.batch_size, self.dist, self.optim.grad_accum))
        return global_means(self.logs, rows, self.dist, self.device)  # collective

    def periodic(self, done: int) -> None:
        """Held-out metrics and a reconstruction grid every val_every steps and at the last one."""
        if self.main and (done % self.cfg.logging.val_every == 0 or done == self.optim.steps):
            eval_model = self.ema.module if self.ema is not None else self.model
            self.metrics = validate(eval_model, self.val)
            self.log.write(done, **{f"val_{k}": v for k, v in self.metrics.items()})
            with torch.no_grad():
                xv = self.val.images[:16].to(self.device)  # (16, C, H, W)
                rec = eval_model.decode(eval_model.encode(xv).mode()).clamp(-1, 1)
            grid = self.out / "samples" / f"recon_{done:08d}.png"
            save_grid(torch.cat([xv, rec]).cpu(), grid, nrow=16, upscale=2)
            self.log.image("reconstructions", grid, done)

    def postfix(self) -> dict[str, str]:
        return {"psnr": f"{self.metrics['psnr']:.1f}"} if "psnr" in self.metrics else {}  # none before the first validation

    def finish(self, step: int, t0: float) -> dict:
        """Latent statistics → scaling_factor / shift_factor in the model config (and train_config.yaml)."""
        cfg, o = self.cfg, self.optim
        final_model = self.ema.module if self.ema is not None else self.model
        from ldmkit.train.distributed import micro_batches

        pieces = micro_batches(o.batch_size, self.dist, o.grad_accum)
        place = self.source.state_dict()  # a stream's place after the last step: the statistics do not move it
        with torch.no_grad():
            stats = latent_statistics(final_model, statistic_batches(self.source, cfg.latent_stat_batches, o.batch_size,
                                                                     cfg.data.seed, (pieces[0][0], pieces[-1][1])),
                                      cfg.data.seed)
        self.source.load_state_dict(place)
        self.source.close()
        # z' = (z − shift)·scale has zero mean and unit variance over the training set.
        cfg.model.shift_factor = stats["mean"]
        cfg.model.scaling_factor = 1.0 / max(stats["std"], 1e-8)
        self.model.config = cfg.model
        if self.ema is not None:
            self.ema.module.config = cfg.model
        if self.main:
            save_config(cfg, self.out / "train_config.yaml")
        if not self.metrics:
            self.metrics = validate(final_model, self.val)
        return {
            "step": o.steps,
            "latent_stats": stats,
            "val": self.metrics,
            "train_seconds": round(time.time() - t0, 1),
            "dataset": cfg.data.dataset,
            "image_size": cfg.data.size,
        }


def train_autoencoder(cfg: AutoencoderTrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train, validate, checkpoint, measure latent statistics. Returns the final checkpoint folder.
    Under torchrun every process calls this (see `ldmkit.train.distributed`)."""
    from ldmkit.train.distributed import cleanup, setup

    dist_info, device = setup(cfg.optim.device)
    try:
        return fit(AutoencoderTask, cfg, Path(out), resume, progress, None, dist_info, device)
    finally:
        cleanup(dist_info)
