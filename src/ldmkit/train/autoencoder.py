"""`ldmkit train-autoencoder`: the first-stage training loop.

    for step: x → q(z|x) → z ~ q → x̂;  L = rec + kl_weight·KL (+ GAN)  → AdamW
    every val_every:  held-out PSNR / SSIM, reconstruction grid PNG
    every ckpt_every: atomic checkpoint (weights, optimizer, step, RNG)
    at the end:       latent mean/std over many batches → scaling_factor / shift_factor
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ldmkit.autoencoder import AutoencoderKL
from ldmkit.autoencoder.losses import AutoencoderLoss
from ldmkit.data import build_dataset
from ldmkit.device import autocast
from ldmkit.errors import LdmkitError
from ldmkit.evaluate.metrics import psnr, ssim
from ldmkit.imageio import save_grid
from ldmkit.rng import BatchRandom, step_generator
from ldmkit.checkpoint import load_training_state, load_weights, resolve, save_checkpoint, EMA_WEIGHTS, WEIGHTS
from ldmkit.train.config import AutoencoderTrainConfig, save_config
from ldmkit.data.tensors import TensorData, materialize
from ldmkit.train.loop import (
    EMA,
    GracefulInterrupt,
    Stepper,
    TrainLog,
    adamw,
    apply_memory_format,
    batch_indices,
    lr_at,
    rng_state,
    start_run,
    stop_if_requested,
)


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


def load_splits(cfg: AutoencoderTrainConfig, progress: bool = True) -> tuple[TensorData, TensorData]:
    d = cfg.data
    train_ds = build_dataset(d.dataset, d.size, "train", seed=d.seed, skip_bad=d.skip_bad_images, length=d.length)
    val_ds = build_dataset(d.dataset, d.size, "val", seed=d.seed, skip_bad=d.skip_bad_images)
    return materialize(train_ds, desc="train data", progress=progress), materialize(val_ds, d.val_images, "val data", progress)


@torch.no_grad()
def validate(model: AutoencoderKL, val: TensorData, batch_size: int = 64) -> dict[str, float]:
    """Held-out PSNR/SSIM of posterior-mode reconstructions and KL per latent element."""
    model.eval()
    device = next(model.parameters()).device
    ps, ss, kls, n_el = [], [], [], 0
    for i in range(0, len(val), batch_size):
        x = val.images[i : i + batch_size].to(device)
        post = model.encode(x)
        x_hat = model.decode(post.mode()).clamp(-1, 1)
        ps.append(psnr(x_hat, x))
        ss.append(ssim(x_hat, x))
        kls.append(post.kl())
        n_el = post.mean[0].numel()
    model.train()
    return {
        "psnr": torch.cat(ps).mean().item(),
        "ssim": torch.cat(ss).mean().item(),
        "kl_per_element": (torch.cat(kls).mean() / n_el).item(),
    }


@torch.no_grad()
def latent_statistics(model: AutoencoderKL, data: TensorData, batches: int, batch_size: int, seed: int) -> dict:
    """Per-channel and global mean/std of z ~ q(z|x) over many training batches.

    The second stage wants unit-variance latents (Rombach et al., 2022, §4.3.2 and App. G):
    scaling_factor = 1/std and shift_factor = mean, stored in the checkpoint config.
    """
    model.eval()
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    zs = []
    for b in range(min(batches, max(1, len(data) // batch_size))):
        idx = batch_indices(b, len(data), min(batch_size, len(data)), seed)
        x = data.images[idx].to(next(model.parameters()).device)
        zs.append(model.encode(x).sample(g).cpu())
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


def train_autoencoder(cfg: AutoencoderTrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Train, validate, checkpoint, measure latent statistics. Returns the final checkpoint folder.
    Under torchrun every process calls this (see `ldmkit.train.distributed`)."""
    from ldmkit.train.distributed import cleanup, setup

    dist_info, device = setup(cfg.optim.device)
    try:
        return _train_autoencoder(cfg, Path(out), resume, progress, dist_info, device)
    finally:
        cleanup(dist_info)


def _train_autoencoder(cfg: AutoencoderTrainConfig, out: Path, resume: bool, progress: bool, dist_info, device) -> Path:
    from ldmkit.train.distributed import global_means, wrap

    main = dist_info.main
    if main:
        start_run(out, resume)
        save_config(cfg, out / "train_config.yaml")
    dist_info.barrier()
    o = cfg.optim
    if o.distributed == "fsdp" and dist_info.enabled:
        raise LdmkitError("optim.distributed=fsdp is for the second stage; an autoencoder fits one device, use ddp")
    torch.manual_seed(o.seed)

    train, val = load_splits(cfg, progress and main)
    model = AutoencoderKL(cfg.model).to(device)
    loss_fn = AutoencoderLoss(cfg.loss, cfg.model.in_channels).to(device)
    disc = loss_fn.discriminator
    opt = adamw(model.parameters(), o.lr, o.betas, o.weight_decay)
    d_opt = None
    if disc is not None:
        d_opt = adamw(disc.parameters(), cfg.loss.disc_lr or o.lr, (0.5, 0.9), 0.01)  # torch.optim.AdamW's default decay
    ema = None
    log = TrainLog(out, enabled=main)

    start = 0
    state: dict = {}
    if resume:
        folder = resolve(out)
        state = load_training_state(folder)
        load_weights(model, folder / WEIGHTS)
        opt.load_state_dict(state["optimizer"])
        if d_opt is not None and "disc_optimizer" in state:
            disc.load_state_dict(state["discriminator"])
            d_opt.load_state_dict(state["disc_optimizer"])
        start = int(state["step"])
        log.truncate_after(start)
    if o.ema_decay is not None:
        ema = EMA(model, o.ema_decay)
        if resume and (resolve(out) / EMA_WEIGHTS).is_file():
            load_weights(ema.module, resolve(out) / EMA_WEIGHTS)
            ema.load_state_dict(state.get("ema", {"num_updates": start}))
    apply_memory_format(model, o)
    trained = wrap(_Reconstruct(model), dist_info, device)
    if disc is not None:
        loss_fn.discriminator = wrap(disc, dist_info, device)  # `disc` stays the bare module for checkpoints
    stepper = Stepper(trained, opt, model.parameters(), o.grad_clip, o.batch_size, o.grad_accum, dist_info, device,
                      out, o.precision)
    d_stepper = Stepper(loss_fn.discriminator, d_opt, disc.parameters(), None, o.batch_size, o.grad_accum, dist_info,
                        device, out, o.precision) if disc is not None else None
    if resume:
        stepper.load_state_dict(state.get("stepper", {}))

    def checkpoint(step: int, meta: dict | None = None, final: bool = False) -> Path:
        folder = out / "checkpoints" / f"step_{step:08d}"
        if main:
            state = {"step": step, "optimizer": opt.state_dict(), "rng": rng_state(), "stepper": stepper.state_dict()}
            if d_opt is not None:
                state.update(discriminator=disc.state_dict(), disc_optimizer=d_opt.state_dict())
            if ema is not None:
                state["ema"] = ema.state_dict()
            folder = save_checkpoint(
                out, step, "autoencoder", model, cfg.model, meta=meta or {"step": step},
                ema=ema.module if ema else None, training_state=state, keep=cfg.logging.keep_checkpoints,
            )
        dist_info.barrier()
        return folder

    model.train()
    last_layer = model.last_layer_weight()
    latent_shape = None
    bar = tqdm(total=o.steps, initial=start, desc="autoencoder", disable=not (progress and main), dynamic_ncols=True)
    t0 = time.time()
    metrics: dict[str, float] = {}
    with GracefulInterrupt() as stop:
        for step in range(start, o.steps):
            idx = batch_indices(step, len(train), o.batch_size, cfg.data.seed)  # the global batch
            logs: dict[str, float] = {}  # Σ value · rows over this rank's pieces; `global_means` at log time
            pieces: list[tuple[torch.Tensor, torch.Tensor]] = []

            def add_logs(piece_logs: dict[str, float], n: int) -> None:
                for k, v in piece_logs.items():
                    logs[k] = logs.get(k, 0.0) + v * n

            def piece_loss(lo: int, hi: int, step: int = step, idx: torch.Tensor = idx) -> torch.Tensor:
                nonlocal latent_shape
                r = BatchRandom(step_generator(o.seed, step), o.batch_size, lo, hi)
                x = train.images[idx[lo:hi]].to(device)
                if cfg.data.hflip:
                    flip = (r.rand() < 0.5).to(device)
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                if o.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if latent_shape is None:
                    with torch.no_grad():
                        latent_shape = model.encode(x[:1]).mean.shape[1:]
                noise = r.randn(*latent_shape).to(device)
                with autocast(o.precision, device):
                    x_hat, post = trained(x, noise)
                x_hat = x_hat.float()
                loss, piece_logs = loss_fn.generator_loss(x, x_hat, post.kl().float(), step, last_layer)
                add_logs(piece_logs, hi - lo)
                pieces.append((x, x_hat.detach()))
                return loss

            for group in opt.param_groups:
                group["lr"] = lr_at(step, o.lr, o.warmup_steps, o.steps, o.schedule)
            loss, (interrupted,) = stepper(step, piece_loss, (stop.requested,))
            if d_stepper is not None and step >= cfg.loss.disc_start:
                def d_piece_loss(lo: int, hi: int) -> torch.Tensor:
                    d_loss, d_logs = loss_fn.discriminator_loss(*pieces.pop(0))
                    add_logs(d_logs, hi - lo)
                    return d_loss

                d_stepper(step, d_piece_loss)
            if ema is not None:
                ema.update(model)

            done = step + 1
            if done % cfg.logging.log_every == 0 or done == o.steps:
                log.write(done, loss=loss.item(), lr=opt.param_groups[0]["lr"],
                          **global_means(logs, sum(hi - lo for lo, hi in stepper.pieces), dist_info, device))  # collective
            if main and (done % cfg.logging.val_every == 0 or done == o.steps):
                eval_model = ema.module if ema is not None else model
                metrics = validate(eval_model, val)
                log.write(done, **{f"val_{k}": v for k, v in metrics.items()})
                with torch.no_grad():
                    xv = val.images[:16].to(device)
                    rec = eval_model.decode(eval_model.encode(xv).mode()).clamp(-1, 1)
                save_grid(torch.cat([xv, rec]).cpu(), out / "samples" / f"recon_{done:08d}.png", nrow=16, upscale=2)
            if done % cfg.logging.ckpt_every == 0 and done != o.steps:
                checkpoint(done)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{metrics.get('psnr', float('nan')):.1f}")
            stop_if_requested(interrupted, bar, done, checkpoint)
    bar.close()

    final_model = ema.module if ema is not None else model
    stats = latent_statistics(final_model, train, cfg.latent_stat_batches, o.batch_size, cfg.data.seed)
    # z' = (z − shift)·scale has zero mean and unit variance over the training set.
    cfg.model.shift_factor = stats["mean"]
    cfg.model.scaling_factor = 1.0 / max(stats["std"], 1e-8)
    model.config = cfg.model
    if ema is not None:
        ema.module.config = cfg.model
    if main:
        save_config(cfg, out / "train_config.yaml")
    if not metrics:
        metrics = validate(final_model, val)
    meta = {
        "step": o.steps,
        "latent_stats": stats,
        "val": metrics,
        "train_seconds": round(time.time() - t0, 1),
        "dataset": cfg.data.dataset,
        "image_size": cfg.data.size,
    }
    log.plot(["loss", "rec", "kl", "val_psnr", "val_ssim"], out / "loss.png")
    return checkpoint(o.steps, meta=meta, final=True)
