"""The second-stage training task (`DiffusionTask`, run by `ldmkit train` through `train.diffusion`).

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

from ldmkit.autoencoder import AutoencoderKL
from ldmkit.conditioning import Conditioner
from ldmkit.errors import LdmkitError
from ldmkit.imageio import save_grid
from ldmkit.pipeline import LatentDiffusion, LatentDiffusionConfig
from ldmkit.device import autocast
from ldmkit.checkpoint import WEIGHTS, load_weights, read_config
from ldmkit.train.config import DiffusionTrainConfig
from ldmkit.data.tensors import TensorData
from ldmkit.train.data import MemoryData, check_buckets, check_lazy_source, open_train_data, posterior_of
from ldmkit.train.latents import CAPTION_CACHE, encode_dataset, sample_latents, warm_caption_cache
from ldmkit.train.distributed import check_in_sync, full_state_dict, is_sharded
from ldmkit.train.loop import Task
from ldmkit.generation import GenerationRequest, generate


def load_first_stage(path: str) -> tuple[AutoencoderKL, dict]:
    """The trained first stage, checked to carry the latent scale the second stage needs.

    `path` is an ldmkit autoencoder checkpoint, or any autoencoder `ldmkit.load` reads: a diffusers
    `AutoencoderKL` folder (e.g. Stable Diffusion's `vae/`, whose config holds scaling_factor), a
    whole diffusers pipeline folder (its VAE is used) or an original SD single file."""
    if not path:
        raise LdmkitError("no first stage given: set `autoencoder:` in the config (a folder from `ldmkit train-autoencoder`)")
    import ldmkit
    from ldmkit.interop.convert import detect_format

    fmt = detect_format(path)
    meta = {"source": str(path), "format": fmt}
    if fmt == "ldmkit":  # checked before the weights are read: the kind, and a finished first stage
        folder, kind, cfg, meta = read_config(path)
        if kind != "autoencoder":
            raise LdmkitError(f"{folder} holds a '{kind}', not an autoencoder; point `autoencoder:` at a first-stage checkpoint")
        if "latent_stats" not in meta and cfg.scaling_factor == 1.0 and cfg.shift_factor == 0.0:
            raise LdmkitError(
                f"{folder} has no measured latent scale (training did not finish); finish it with "
                "`ldmkit train-autoencoder --resume` or set model.scaling_factor by hand"
            )
        path = folder
    module = ldmkit.load(path)  # EMA weights where the checkpoint has them
    if isinstance(module, LatentDiffusion):
        module = module.autoencoder  # a whole SD pipeline or single file: train on its VAE
    if not isinstance(module, AutoencoderKL):
        raise LdmkitError(f"{path} holds a {type(module).__name__}, not an autoencoder; point `autoencoder:` at a VAE")
    return module.eval().requires_grad_(False), meta


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
    if cfg.conditioner.pooled_text and not conditioner.context_dim:
        raise LdmkitError("conditioner.pooled_text needs a text encoder (conditioner.text_encoder)")
    want_vector = conditioner.vector_dim
    if cfg.conditioner.micro_conditioning and u.vector_dim != want_vector:  # follows from the routes, as concat does
        u = u.model_copy(update={"vector_dim": want_vector})
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
    elif cfg.concat is not None and cfg.concat.reads_labels:
        labels = torch.arange(n) % cfg.concat.num_labels
    return texts, labels


class DiffusionTask(Task):
    """The second stage for `fit`: the U-Net of a LatentDiffusion on the frozen first stage's cached
    latents, conditioned per the config's routes; sample grids with the EMA weights."""

    name = "diffusion"
    kind = "latent_diffusion"

    def __init__(self, cfg: DiffusionTrainConfig, out: Path, dist, device: torch.device, progress: bool):
        super().__init__(cfg, out, dist, device, progress)
        self.ae_meta = self._build_model(cfg)
        d, o = cfg.data, cfg.optim
        self.source = open_train_data(d, o.batch_size, d.seed, dist, o.grad_accum, self.progress, masked_loss=True)
        self.data = self.source.preview  # in memory: every item; lazy: the first few (conditions for sample grids)
        self.ldm.to(device)
        self.mean = self.std = None
        if isinstance(self.source, MemoryData):
            self.mean, self.std = encode_dataset(self.ldm.autoencoder, self.data, progress=self.progress, cache=d.latent_cache)
        else:
            f = self.ldm.autoencoder.downsample_factor
            check_buckets(self.source, f * self.model_config.unet.size_multiple, f"the first stage's factor {f} times "
                          f"the U-Net's {self.model_config.unet.size_multiple}")
            if d.latent_cache and d.buckets:
                raise LdmkitError("data.latent_cache stores one latent shape; turn it off with data.buckets")
            if d.latent_cache and cfg.concat is None:
                from ldmkit.train.encode import cached_latent_source

                self.source = cached_latent_source(self.ldm.autoencoder, d, o.batch_size, dist, o.grad_accum, self.progress)
            check_lazy_source(self.source, self.ldm, cfg)
        if cfg.conditioner.num_classes and (self.data.labels < 0).all():
            raise LdmkitError(f"dataset '{d.dataset}' has no labels, but the config asks for class conditioning")
        if cfg.conditioner.text_encoder and not any(self.data.texts):
            raise LdmkitError(f"dataset '{d.dataset}' has no captions, but the config asks for text conditioning")
        if cfg.conditioner.text_encoder and self.caches_captions():  # fill the caption cache once, before the clock starts
            if isinstance(self.source, MemoryData):
                warm_caption_cache(self.conditioner.text_encoder, self.data.texts)
            else:  # a collection's captions are encoded as they come; the cache keeps the most recent
                self.conditioner.text_encoder.cache_limit = CAPTION_CACHE
            # a caption met during training (tags shuffled or dropped, a lazily read collection) is encoded alone,
            # so its tokens are a function of the caption and --resume repeats the run exactly
            self.conditioner.text_encoder.encode_alone = True
        self.module = self.ldm.unet
        self.ldm.train()

    def _build_model(self, cfg: DiffusionTrainConfig) -> dict:
        """The LatentDiffusion around the trained first stage; returns the first stage's meta."""
        ae, ae_meta = load_first_stage(cfg.autoencoder)
        self.conditioner = Conditioner(cfg.conditioner)
        self.model_config = resolve_model_config(cfg, ae, self.conditioner)
        self.ldm = LatentDiffusion.from_config(self.model_config, conditioner=self.conditioner)
        self.ldm.autoencoder.load_state_dict(ae.state_dict())
        return ae_meta

    # hooks a fine-tune (train/finetune.py) changes where the text encoder or an embedding's vectors train

    def caches_captions(self) -> bool:
        """Whether captions are encoded once and cached (a frozen encoder); else they are encoded every step."""
        return True

    def loss_unet(self):
        """The U-Net the loss calls (per piece): the trained module as the stepper runs it (wrapped for DDP/FSDP)."""
        return self.trained

    def sampling_unet(self):
        """The U-Net sample grids use: the EMA's where there is one."""
        return self.ema.module if self.ema is not None else self.module

    def load_weights(self, folder: Path) -> None:
        load_weights(self.ldm, folder / WEIGHTS)  # the whole LatentDiffusion, as the checkpoint holds it

    def load_ema(self, ema_module, path: Path) -> None:
        tmp = LatentDiffusion.from_config(self.model_config, conditioner=self.conditioner)
        load_weights(tmp, path)
        ema_module.load_state_dict(tmp.unet.state_dict())

    def _with_unet(self, unet_sd: dict) -> dict:
        """The LatentDiffusion's weights with the U-Net's replaced by `unet_sd` (gathered, or the EMA)."""
        sd = {k: v for k, v in self.ldm.state_dict().items() if not k.startswith("unet.")}
        sd.update({f"unet.{k}": v for k, v in unet_sd.items()})
        return sd

    def weights(self) -> dict:
        return self._with_unet(full_state_dict(self.module))

    def ema_weights(self) -> dict:
        return self._with_unet(full_state_dict(self.ema.module))

    def piece_loss_at(self, step: int):
        cfg, o, d = self.cfg, self.optim, self.cfg.data
        use_text = bool(cfg.conditioner.text_encoder)
        # labels feed the label route, or the onehot concatenation route
        use_labels = bool(cfg.conditioner.num_classes) or (cfg.concat is not None and cfg.concat.reads_labels)
        shift, scale = self.ldm.autoencoder.config.shift_factor, self.ldm.autoencoder.config.scaling_factor
        latents = self.ldm.config.diffusion.latents  # a fine-tune's from the model it starts from

        def piece_loss(lo: int, hi: int) -> torch.Tensor:
            batch = self.source.batch(step, lo, hi)
            r, z0 = sample_latents(*self._posterior(batch), o, step, lo, hi, shift, scale, latents)  # z0: (b, c, h, w)
            if d.hflip:
                flip = (r.rand() < 0.5).to(z0.device)
                z0 = torch.where(flip[:, None, None, None], z0.flip(-1), z0)
                if "loss_mask" in batch:  # the loss mask flips with its latent (data.mask)
                    fl = flip.cpu()[:, None, None, None]
                    batch["loss_mask"] = torch.where(fl, batch["loss_mask"].flip(-1), batch["loss_mask"])
                if cfg.concat is not None:  # the spatial condition flips with its latent
                    fl = flip.cpu()[:, None, None, None]
                    batch["image"] = torch.where(fl, batch["image"].flip(-1), batch["image"])
                    if "mask" in batch:
                        batch["mask"] = torch.where(fl, batch["mask"].flip(-1), batch["mask"])
            if o.channels_last:
                z0 = z0.contiguous(memory_format=torch.channels_last)
            with autocast(o.precision, self.device):
                return self.ldm.loss(z0, texts=batch["text"] if use_text else None,
                                     labels=batch["label"] if use_labels else None, generator=r,
                                     images=batch["image"] if cfg.concat is not None else None,
                                     masks=batch.get("mask"), unet=self.loss_unet(), size_crop=self._size_crop(batch, z0),
                                     loss_mask=batch.get("loss_mask"))

        return piece_loss

    def _size_crop(self, batch: dict, z0: torch.Tensor) -> torch.Tensor | None:
        """(b, 6) micro-conditions: each item's recorded original size and crop, and the batch's size (None:
        the model has none, or the source records none, and the loss takes an uncropped image of its size)."""
        if not self.cfg.conditioner.micro_conditioning or "original_size_crop" not in batch:
            return None
        f = self.ldm.autoencoder.downsample_factor
        target = torch.tensor([z0.shape[2] * f, z0.shape[3] * f]).expand(z0.shape[0], -1)
        return torch.cat([batch["original_size_crop"], target], 1).float()

    def _posterior(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return posterior_of(batch, self.mean, self.std, self.ldm.autoencoder, self.device)

    def sample_grid(self, step: int) -> None:
        # a sharded U-Net runs collectively, so then every rank samples (the same images); else rank 0 alone
        cfg, ldm = self.cfg, self.ldm
        net = self.sampling_unet()
        if not (self.main or is_sharded(net)):
            return
        n = cfg.sample.num
        texts, labels = sample_prompts(cfg, self.data, n)
        extra = {}
        if cfg.concat is not None:  # the first n images (and their shape masks) as the spatial condition
            extra["init_image"] = self.data.images[:n].to(self.device)  # (n, C, H, W)
            if cfg.concat.kind == "map":  # the data's own maps
                extra["mask"] = self.data.extras["mask"][:n]
            elif cfg.concat.kind == "inpaint":
                extra["mask"] = self.data.extras["mask"][:n] if "mask" in self.data.extras else ldm.random_masks(
                    n, cfg.data.size, None, torch.Generator().manual_seed(0))
        labels = labels.tolist() if isinstance(labels, torch.Tensor) else labels
        request = GenerationRequest(prompt=texts, labels=labels, num_images=n, batch_size=n, steps=cfg.sample.steps,
                                    sampler=cfg.sample.sampler, guidance=cfg.sample.guidance, seed=0, **extra)
        imgs = generate(ldm.with_unet(net), request).images  # the EMA (or the wrapped) U-Net
        if self.main:
            grid = self.out / "samples" / f"samples_{step:08d}.png"
            save_grid(imgs, grid, upscale=2)
            self.log.image("samples", grid, step)

    def finish(self, step: int, t0: float) -> dict:
        self.sample_grid(step)
        return {"step": step, "train_seconds": round(time.time() - t0, 1), "dataset": self.cfg.data.dataset,
                "autoencoder": str(self.cfg.autoencoder), "autoencoder_val": self.ae_meta.get("val"),
                "world_size": self.dist.world, "rank_weight_sums": check_in_sync(self.module, self.dist),
                **({"vocabulary": self.cfg.data.vocabulary} if self.cfg.data.vocabulary != "basic" else {}),
                **({"mask": self.cfg.data.mask} if self.cfg.data.mask != "none" else {})}  # evaluate scores it masked
