"""`ldmkit train --init-from MODEL`: fine-tuning a model that exists, whole or with LoRA.

    MODEL (ldmkit run | diffusers pipeline folder | original SD single file) ──load_any──> LatentDiffusion
        its model config (first stage, U-Net, text encoder) replaces the training config's model sections;
        its U-Net weights start training; its first stage (and, unless trained, text encoder) stay frozen
    finetune.decoder_steps > 0  first the first stage's decoder learns to draw the training images (encoder frozen,
                                so the latents stay): a first stage cannot decode what it never saw
    finetune.train = unet       every U-Net weight trained, as in `ldmkit train`
                     unet+text  the U-Net and the text encoder's transformer
                     lora       peft adapters on `lora.targets` (ldmkit.interop.lora); only A, B trained

The run is a normal `ldmkit train` folder: its checkpoints hold the whole model (for LoRA, the base
with the adapter folded in at scale 1), so `sample`, `convert` and `serve` read it as they read any
run. A LoRA run also writes the adapter alone as OUT/lora.safetensors (diffusers' `load_lora_weights`
layout, or kohya's with `lora.format: kohya`), and keeps the adapter (live and EMA) in the training
state, from which `--resume` restores it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ldmkit.checkpoint import load_training_state
from ldmkit.conditioning import Conditioner
from ldmkit.errors import LdmkitError
from ldmkit.interop import lora as lora_io
from ldmkit.pipeline import LatentDiffusion
from ldmkit.train.config import DiffusionTrainConfig
from ldmkit.train.diffusion import DiffusionTask

LORA_FILE = "lora.safetensors"


def load_init_model(cfg: DiffusionTrainConfig) -> LatentDiffusion:
    """The LatentDiffusion training starts from: MODEL's weights (EMA where it has them), its model config
    with the training config's image size and condition-dropout rates, on the CPU in train mode."""
    from ldmkit.interop.convert import load_any

    path = cfg.finetune.init_from
    src = load_any(path, ema=True)
    if not isinstance(src, LatentDiffusion):
        raise LdmkitError(f"--init-from {path} holds a {type(src).__name__}, not a diffusion model; give an "
                          "`ldmkit train` run, a diffusers pipeline folder or a Stable Diffusion single file")
    mc = src.config
    if cfg.concat is not None and cfg.concat != mc.concat:
        raise LdmkitError(f"the config's concat route ({cfg.concat.kind}) is not the one {path} was trained with "
                          f"({mc.concat.kind if mc.concat else 'none'}); fine-tuning keeps the model's inputs")
    cond_cfg = mc.conditioner.model_copy(update={"drop_text": cfg.conditioner.drop_text,
                                                 "drop_label": cfg.conditioner.drop_label,
                                                 "drop_all": cfg.conditioner.drop_all})
    mc = mc.model_copy(update={"image_size": cfg.data.size, "conditioner": cond_cfg})
    conditioner = Conditioner(cond_cfg, text_encoder=src.conditioner.text_encoder)
    ldm = LatentDiffusion.from_config(mc, conditioner=conditioner)
    ldm.load_state_dict(src.state_dict())
    ldm.autoencoder.eval().requires_grad_(False)
    return ldm


class LoraCheckpoints:
    """Checkpoints of a task whose trained U-Net (`self.module`) may carry LoRA adapters (`self.lora`): the
    weights hold the plain model (the adapter folded in at scale 1), so `sample`, `convert` and `serve` read
    the run as any other; the training state holds the adapter alone (live and EMA), which `--resume`
    restores; `save_lora_file` writes it as OUT/lora.safetensors. Mixed in before the task class."""

    lora: bool

    def weights(self) -> dict:
        if not self.lora:
            return super().weights()
        return self._with_unet(lora_io.plain_state_dict(self.module))

    def ema_weights(self) -> dict:
        if not self.lora:
            return super().ema_weights()
        return self._with_unet(lora_io.plain_state_dict(self.ema.module))

    def extra_state(self) -> dict:
        if not self.lora:
            return super().extra_state()
        state = {"lora": _plain(lora_io.adapter_of(self.module))}
        if self.ema is not None:
            state["lora_ema"] = _plain(lora_io.adapter_of(self.ema.module))
        return state

    def load_weights(self, folder: Path) -> None:
        if not self.lora:
            return super().load_weights(folder)
        lora_io.load_adapter_(self.module, _adapters(load_training_state(folder)["lora"]))

    def load_ema(self, ema_module, path: Path) -> None:
        if not self.lora:
            return super().load_ema(ema_module, path)
        state = load_training_state(path.parent)
        lora_io.load_adapter_(ema_module, _adapters(state.get("lora_ema", state["lora"])))

    def save_lora_file(self, lora_cfg, t0: float) -> dict:
        """Write the adapter (of the EMA where there is one) as OUT/lora.safetensors; its meta entry."""
        net = self.ema.module if self.ema is not None else self.module
        lora_io.save_lora(lora_io.adapter_of(net), self.out / LORA_FILE, lora_cfg.format)
        return {"file": LORA_FILE, "format": lora_cfg.format, "rank": lora_cfg.rank, "alpha": lora_cfg.alpha or lora_cfg.rank,
                "targets": lora_cfg.targets,
                "trained_parameters": sum(p.numel() for p in self.module.parameters() if p.requires_grad),
                "seconds": round(time.time() - t0, 1)}


class FinetuneTask(LoraCheckpoints, DiffusionTask):
    """`DiffusionTask` started from `finetune.init_from`, training the U-Net, U-Net + text encoder, or LoRA."""

    name = "finetune"
    fsdp_refusal = "fine-tuning runs under DDP; set optim.distributed=ddp"

    def __init__(self, cfg: DiffusionTrainConfig, out: Path, dist, device: torch.device, progress: bool):
        ft = cfg.finetune
        if ft.train == "lora" and cfg.lora.text_encoder:
            raise LdmkitError("lora.text_encoder: adapting the text encoder is not supported yet (its captions are "
                              "encoded once and cached); set lora.text_encoder=false")
        if ft.train == "unet+text":
            raise LdmkitError("finetune.train: unet+text is not supported yet (the text encoder's captions are "
                              "encoded once and cached); use unet or lora")
        super().__init__(cfg, out, dist, device, progress)
        self.decoder_seconds = None
        if ft.decoder_steps:
            if self.mean is None:
                raise LdmkitError("finetune.decoder_steps needs the training set in memory (a built-in set or a small "
                                  "folder; set data.in_memory=true), or set finetune.decoder_steps=0")
            self.decoder_seconds = finetune_decoder(self.ldm.autoencoder, self.data.images, self.mean, self.std,
                                                    ft.decoder_steps, ft.decoder_lr, cfg.optim.batch_size, cfg.optim.seed)
        if ft.train == "lora":
            lo = cfg.lora
            lora_io.add_adapter(self.ldm.unet, lo.rank, lo.alpha, lo.dropout, lo.targets)
            self.ldm.unet.to(device)  # the new adapter layers
            self.ldm.train()

    def _build_model(self, cfg: DiffusionTrainConfig) -> dict:
        if not cfg.finetune.init_from:
            if cfg.finetune.train == "lora":
                raise LdmkitError("finetune.train: lora needs a model to adapt: pass --init-from MODEL")
            return super()._build_model(cfg)
        self.ldm = load_init_model(cfg)
        self.conditioner = self.ldm.conditioner
        self.model_config = mc = self.ldm.config
        # the model's sections replace the config's, so the routes trained are the model's own
        cfg.unet, cfg.conditioner, cfg.concat = mc.unet, mc.conditioner, mc.concat
        return {"source": str(cfg.finetune.init_from)}

    @property
    def lora(self) -> bool:
        return self.cfg.finetune.train == "lora"

    def finish(self, step: int, t0: float) -> dict:
        meta = super().finish(step, t0)
        ft = self.cfg.finetune
        meta.update({"init_from": ft.init_from, "finetune": ft.train, "autoencoder": ft.init_from or meta["autoencoder"]})
        if self.decoder_seconds is not None:
            meta["decoder"] = {"steps": ft.decoder_steps, "seconds": round(self.decoder_seconds, 1)}
        if self.lora and self.main:
            meta["lora"] = self.save_lora_file(self.cfg.lora, t0)
        return meta


def finetune_decoder(ae, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, steps: int, lr: float,
                     batch_size: int, seed: int) -> float:
    """Teach the first stage's decoder to draw the training images from their latents z ~ q(z|x) = N(mean, std²)
    (the cached posteriors): L2 reconstruction, AdamW with cosine decay, the encoder untouched, so the latents the
    U-Net learns and their measured scale stay what they were. Returns the seconds it took."""
    t0 = time.time()
    params = [p for n, p in ae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))]
    ae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    ae.train()
    for step in range(steps):
        rows = torch.randint(len(images), (batch_size,), generator=g)
        rows_d = rows.to(mean.device)
        z = mean[rows_d] + std[rows_d] * torch.randn(mean[rows_d].shape, generator=g).to(mean.device)  # (B, c, h, w)
        loss = F.mse_loss(ae.decode(z), images[rows].to(mean.device))  # images (B, 3, H, W) in [-1, 1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    ae.eval().requires_grad_(False)
    return time.time() - t0


def _plain(lora: lora_io.Lora) -> dict:
    """An adapter as nested dicts of tensors and floats (what `torch.load(weights_only=True)` reads back)."""
    return {path: {"down": a.down, "up": a.up, "alpha": a.alpha} for path, a in lora.items()}


def _adapters(state: dict) -> lora_io.Lora:
    return {path: lora_io.Adapter(d["down"], d["up"], float(d["alpha"])) for path, d in state.items()}


def needs_finetune(cfg: DiffusionTrainConfig) -> bool:
    ft = cfg.finetune
    return bool(ft.init_from) or ft.train != "unet" or ft.decoder_steps > 0
