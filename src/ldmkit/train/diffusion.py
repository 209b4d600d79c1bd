"""`ldmkit train`: the second-stage training loop.

    once:     load the frozen first stage; encode the training set to q(z|x) = N(μ, σ²) and keep
              μ, σ in memory (the latent cache); captions are encoded once by the text encoder cache
    per step: z0 = (μ + σ ε − shift)·scale, conditions dropped per route, L = w(t)‖target − unet‖²
              AdamW with warm-up and cosine decay, gradient clipping, EMA of the U-Net
    periodic: sample grid with the EMA weights, atomic checkpoint (weights, EMA, optimizer, step)

Every random draw of step k comes from a generator seeded by (seed, k), so a resumed run repeats
the uninterrupted run's sequence exactly.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldmkit.autoencoder import AutoencoderKL
from ldmkit.conditioning import Conditioner
from ldmkit.data import build_dataset
from ldmkit.errors import LdmkitError
from ldmkit.imageio import save_grid
from ldmkit.pipeline import LatentDiffusion, LatentDiffusionConfig
from ldmkit.device import autocast
from ldmkit.rng import BatchRandom, step_generator
from ldmkit.checkpoint import (
    EMA_WEIGHTS,
    WEIGHTS,
    load_training_state,
    load_weights,
    read_config,
    resolve,
    save_checkpoint,
)
from ldmkit.train.config import DiffusionTrainConfig, save_config
from ldmkit.data.tensors import TensorData, materialize
from ldmkit.train.latents import cached_latents, encode_batches
from ldmkit.train.distributed import (
    Dist,
    check_in_sync,
    cleanup,
    full_optimizer_state,
    full_state_dict,
    is_sharded,
    load_optimizer_state,
    setup,
    wrap,
)
from ldmkit.train.loop import (
    EMA,
    Stepper,
    TrainLog,
    adamw,
    apply_memory_format,
    batch_indices,
    run_steps,
    start_run,
)


def load_first_stage(path: str) -> tuple[AutoencoderKL, dict]:
    """The trained first stage, checked to carry the latent scale the second stage needs.

    `path` is an ldmkit autoencoder checkpoint, or any autoencoder `ldmkit.load` reads: a diffusers
    `AutoencoderKL` folder (e.g. Stable Diffusion's `vae/`, whose config holds scaling_factor), a
    whole diffusers pipeline folder (its VAE is used) or an original SD single file."""
    if not path:
        raise LdmkitError("no first stage given: set `autoencoder:` in the config (a folder from `ldmkit train-autoencoder`)")
    from ldmkit.interop.convert import detect_format, load_any

    fmt = detect_format(path)
    if fmt == "ldmkit":
        folder, kind, cfg, meta = read_config(path)
        if kind != "autoencoder":
            raise LdmkitError(f"{folder} holds a '{kind}', not an autoencoder; point `autoencoder:` at a first-stage checkpoint")
        if "latent_stats" not in meta and cfg.scaling_factor == 1.0 and cfg.shift_factor == 0.0:
            raise LdmkitError(
                f"{folder} has no measured latent scale (training did not finish); finish it with "
                "`ldmkit train-autoencoder --resume` or set model.scaling_factor by hand"
            )
        model = AutoencoderKL(cfg)
        load_weights(model, folder / (EMA_WEIGHTS if (folder / EMA_WEIGHTS).is_file() else WEIGHTS))
        return model.eval().requires_grad_(False), meta
    module = load_any(path)
    if isinstance(module, LatentDiffusion):
        module = module.autoencoder  # a whole SD pipeline or single file: train on its VAE
    if not isinstance(module, AutoencoderKL):
        raise LdmkitError(f"{path} holds a {type(module).__name__}, not an autoencoder; point `autoencoder:` at a VAE")
    return module.eval().requires_grad_(False), {"source": str(path), "format": fmt}


def resolve_model_config(cfg: DiffusionTrainConfig, ae: AutoencoderKL, conditioner: Conditioner) -> LatentDiffusionConfig:
    """Fill what follows from the parts (latent channels, context width, classes) and check the rest."""
    u = cfg.unet.model_copy()
    c = ae.config.latent_channels
    if u.in_channels != c or u.out_channels != c:
        u = u.model_copy(update={"in_channels": c, "out_channels": c})
    want_concat = cfg.concat.channels(c) if cfg.concat is not None else 0
    if u.concat_channels != want_concat:  # follows from the route and the latent channels
        u = u.model_copy(update={"concat_channels": want_concat})
    if conditioner.context_dim is not None:
        if u.context_dim is None:
            raise LdmkitError("the conditioner has a text encoder but unet.context_dim is unset; set it to "
                              f"{conditioner.context_dim} (the encoder's width)")
        if u.context_dim != conditioner.context_dim:
            raise LdmkitError(f"unet.context_dim is {u.context_dim} but the text encoder gives {conditioner.context_dim}-d tokens")
    elif u.context_dim is not None:
        raise LdmkitError("unet.context_dim is set but conditioner.text_encoder is not; set text_encoder: minilm")
    want_vector = conditioner.context_dim if (cfg.conditioner.pooled_text and conditioner.context_dim) else 0
    if cfg.conditioner.pooled_text and not want_vector:
        raise LdmkitError("conditioner.pooled_text needs a text encoder (conditioner.text_encoder)")
    if u.vector_dim != want_vector:
        raise LdmkitError(f"unet.vector_dim is {u.vector_dim} but the conditioner gives "
                          + (f"{want_vector}-d pooled captions" if want_vector else "no vector; set conditioner.pooled_text"))
    if u.num_classes != cfg.conditioner.num_classes:
        raise LdmkitError(f"unet.num_classes ({u.num_classes}) and conditioner.num_classes ({cfg.conditioner.num_classes}) differ")
    f = ae.downsample_factor
    if cfg.data.size % f or (cfg.data.size // f) % u.size_multiple:
        raise LdmkitError(
            f"image size {cfg.data.size} gives {cfg.data.size // f}x{cfg.data.size // f} latents, not divisible by the "
            f"U-Net's {u.size_multiple}; use a size that is a multiple of {f * u.size_multiple}"
        )
    return LatentDiffusionConfig(autoencoder=ae.config, unet=u, conditioner=cfg.conditioner,
                                 diffusion=cfg.diffusion, image_size=cfg.data.size, concat=cfg.concat)


def encode_dataset(ae: AutoencoderKL, data: TensorData, batch_size: int = 128, progress: bool = True,
                   cache: str | None = None):
    """Posterior mean and std of every training image, (N, c, h, w) each, on the AE's device; read
    from / written to the on-disk latent cache when `cache` names a folder."""
    device = next(ae.parameters()).device
    if data.images.shape[-1] % ae.downsample_factor:
        raise LdmkitError(f"image size {data.images.shape[-1]} is not divisible by the autoencoder's factor "
                          f"{ae.downsample_factor}")
    if cache:
        mean, std = cached_latents(ae, data.images, cache, batch_size=batch_size, progress=progress)
        return mean.to(device), std.to(device)
    with torch.no_grad():
        parts = list(encode_batches(ae, data.images, batch_size, progress))
    return torch.cat([m for m, _ in parts]).to(device), torch.cat([s for _, s in parts]).to(device)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, idx: torch.Tensor, lo: int, hi: int, optim, step: int,
                   shift: float, scale: float) -> tuple[BatchRandom, torch.Tensor, torch.Tensor]:
    """Rows [lo, hi) of step `step`'s global batch `idx`: (the step's BatchRandom, the rows' dataset
    indices, z0 = (z − shift)·scale with z ~ q(z|x) fresh each step). Every draw is made for the whole
    global batch and sliced, so the result does not depend on how many processes / micro-batches share
    the batch; the step's later draws continue from the returned BatchRandom."""
    r = BatchRandom(step_generator(optim.seed, step), optim.batch_size, lo, hi)
    rows = idx[lo:hi]
    rows_d = rows.to(mean.device)
    z = mean[rows_d] + std[rows_d] * r.randn(*mean.shape[1:]).to(mean.device)
    return r, rows, (z - shift) * scale


def sample_prompts(cfg: DiffusionTrainConfig, data: TensorData, n: int) -> tuple[list[str] | None, torch.Tensor | None]:
    """Conditions for periodic sample grids: the configured prompts, else the first distinct ones of the data."""
    texts = labels = None
    if cfg.conditioner.text_encoder:
        texts = list(cfg.sample.prompts or [])
        if not texts:
            seen = dict.fromkeys(data.texts)
            texts = list(seen)[:n]
        texts = (texts * n)[:n]
    if cfg.conditioner.num_classes:
        labels = torch.arange(n) % cfg.conditioner.num_classes
    return texts, labels


def train_diffusion(cfg: DiffusionTrainConfig, out: str | Path, resume: bool = False, progress: bool = True,
                    time_limit: float | None = None) -> Path:
    """Train a LatentDiffusion; returns the final checkpoint folder. `time_limit` (seconds) ends
    training early at a step boundary — the same checkpoint logic applies. Under torchrun every
    process calls this; see `ldmkit.train.distributed`."""
    o = cfg.optim
    dist_info, device = setup(o.device)
    try:
        return _train_diffusion(cfg, Path(out), resume, progress, time_limit, dist_info, device)
    finally:
        cleanup(dist_info)


def _train_diffusion(cfg: DiffusionTrainConfig, out: Path, resume: bool, progress: bool, time_limit: float | None,
                     dist_info: Dist, device: torch.device) -> Path:
    main = dist_info.main
    if main:
        start_run(out, resume)
        save_config(cfg, out / "train_config.yaml")
    dist_info.barrier()
    o = cfg.optim
    torch.manual_seed(o.seed)

    ae, ae_meta = load_first_stage(cfg.autoencoder)
    conditioner = Conditioner(cfg.conditioner)
    model_cfg = resolve_model_config(cfg, ae, conditioner)
    ldm = LatentDiffusion(model_cfg, conditioner=conditioner)
    ldm.autoencoder.load_state_dict(ae.state_dict())

    d = cfg.data
    data = materialize(build_dataset(d.dataset, d.size, "train", seed=d.seed, skip_bad=d.skip_bad_images, length=d.length),
                       desc="train data", progress=progress and main)
    ldm.to(device)
    mean, std = encode_dataset(ldm.autoencoder, data, progress=progress and main, cache=d.latent_cache)
    if cfg.conditioner.num_classes and (data.labels < 0).all():
        raise LdmkitError(f"dataset '{d.dataset}' has no labels, but the config asks for class conditioning")
    if cfg.conditioner.text_encoder and not any(data.texts):
        raise LdmkitError(f"dataset '{d.dataset}' has no captions, but the config asks for text conditioning")
    if cfg.conditioner.text_encoder:  # fill the caption cache once, before the clock starts
        distinct = sorted(set(data.texts) | {""})
        for i in range(0, len(distinct), 512):
            conditioner.text_encoder(distinct[i : i + 512])

    unet = ldm.unet
    start = 0
    state: dict = {}
    if resume:
        folder = resolve(out)
        state = load_training_state(folder)
        load_weights(ldm, folder / WEIGHTS)
        start = int(state["step"])
    ema = EMA(unet, o.ema_decay) if o.ema_decay else None  # from the (resumed) live weights, before sharding
    if resume and ema is not None and (folder / EMA_WEIGHTS).is_file():
        tmp = LatentDiffusion(model_cfg, conditioner=conditioner)
        load_weights(tmp, folder / EMA_WEIGHTS)
        ema.module.load_state_dict(tmp.unet.state_dict())
        ema.load_state_dict(state.get("ema", {"num_updates": start}))
    apply_memory_format(unet, o)
    trained = wrap(unet, dist_info, device, o.distributed)
    if ema is not None and is_sharded(unet):  # the average sharded like the weights: 1/world of it per rank
        wrap(ema.module, dist_info, device, o.distributed)
    opt = adamw(unet.parameters(), o.lr, o.betas, o.weight_decay)
    stepper = Stepper(trained, opt, unet.parameters(), o.grad_clip, o.batch_size, o.grad_accum, dist_info, device,
                      out, o.precision)
    if resume:
        load_optimizer_state(unet, opt, state["optimizer"])
        stepper.load_state_dict(state.get("stepper", {}))
    log = TrainLog(out, enabled=main)
    if resume:
        log.truncate_after(start)

    def with_unet(unet_sd: dict) -> dict:
        sd = {k: v for k, v in ldm.state_dict().items() if not k.startswith("unet.")}
        sd.update({f"unet.{k}": v for k, v in unet_sd.items()})
        return sd

    def checkpoint(step: int, meta: dict | None = None) -> Path:
        # gathering sharded weights/optimizer state is collective: every rank runs this, rank 0 writes
        weights = with_unet(full_state_dict(unet))
        ema_weights = with_unet(full_state_dict(ema.module)) if ema is not None else None
        train_state = {"step": step, "optimizer": full_optimizer_state(unet, opt), "stepper": stepper.state_dict()}
        if ema is not None:
            train_state["ema"] = ema.state_dict()
        folder = out / "checkpoints" / f"step_{step:08d}"
        if main:
            folder = save_checkpoint(out, step, "latent_diffusion", weights, model_cfg, meta=meta or {"step": step},
                                     ema=ema_weights,
                                     training_state=train_state, keep=cfg.logging.keep_checkpoints)
        dist_info.barrier()
        return folder

    def sample_grid(step: int) -> None:
        # a sharded U-Net runs collectively, so then every rank samples (the same images); else rank 0 alone
        net = ema.module if ema is not None else unet
        if not (main or is_sharded(net)):
            return
        n = cfg.sample.num
        texts, labels = sample_prompts(cfg, data, n)
        live, ldm.unet = ldm.unet, net
        try:
            extra = {}
            if cfg.concat is not None:  # the first n images (and their shape masks) as the spatial condition
                extra["init_image"] = data.images[:n].to(device)
                if cfg.concat.kind == "inpaint":
                    extra["mask"] = data.extras["mask"][:n] if "mask" in data.extras else ldm.random_masks(
                        n, d.size, None, torch.Generator().manual_seed(0))
            imgs = ldm.sample(texts=texts, labels=labels, num_samples=n, steps=cfg.sample.steps,
                              sampler=cfg.sample.sampler, guidance=cfg.sample.guidance, seed=0, **extra)
        finally:
            ldm.unet = live
        if main:
            save_grid(imgs, out / "samples" / f"samples_{step:08d}.png", upscale=2)

    use_text, use_labels = bool(cfg.conditioner.text_encoder), bool(cfg.conditioner.num_classes)
    shift, scale = ldm.autoencoder.config.shift_factor, ldm.autoencoder.config.scaling_factor
    ldm.train()
    t0 = time.time()
    bar = tqdm(total=o.steps, initial=start, desc="diffusion", disable=not (progress and main), dynamic_ncols=True)

    def piece_loss_at(step: int):
        idx = batch_indices(step, len(data), o.batch_size, d.seed)  # the global batch

        def piece_loss(lo: int, hi: int) -> torch.Tensor:
            r, rows, z0 = sample_latents(mean, std, idx, lo, hi, o, step, shift, scale)
            batch = data.batch(rows)
            if d.hflip:
                flip = (r.rand() < 0.5).to(z0.device)
                z0 = torch.where(flip[:, None, None, None], z0.flip(-1), z0)
                if cfg.concat is not None:  # the spatial condition flips with its latent
                    fl = flip.cpu()[:, None, None, None]
                    batch["image"] = torch.where(fl, batch["image"].flip(-1), batch["image"])
                    if "mask" in batch:
                        batch["mask"] = torch.where(fl, batch["mask"].flip(-1), batch["mask"])
            if o.channels_last:
                z0 = z0.contiguous(memory_format=torch.channels_last)
            with autocast(o.precision, device):
                return ldm.loss(z0, texts=batch["text"] if use_text else None,
                                labels=batch["label"] if use_labels else None, generator=r,
                                images=batch["image"] if cfg.concat is not None else None, masks=batch.get("mask"),
                                unet=trained)

        return piece_loss

    step = run_steps(start, o, cfg.logging, stepper, opt, piece_loss_at, ema, unet, log, bar, sample_grid, checkpoint,
                     t0, time_limit)
    bar.close()
    sample_grid(step)
    log.plot(["loss"], out / "loss.png")
    meta = {"step": step, "train_seconds": round(time.time() - t0, 1), "dataset": d.dataset,
            "autoencoder": str(cfg.autoencoder), "autoencoder_val": ae_meta.get("val"), "world_size": dist_info.world,
            "rank_weight_sums": check_in_sync(unet, dist_info)}
    return checkpoint(step, meta=meta)
