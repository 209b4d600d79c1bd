"""`ldmkit train --init-from MODEL`: fine-tuning a model that exists, whole or with LoRA.

    MODEL (ldmkit run | diffusers pipeline folder | original SD single file) ─ldmkit.load─> LatentDiffusion
        its model config (first stage, U-Net, text encoder) replaces the training config's model sections;
        its U-Net weights start training; its first stage (and, unless trained, text encoder) stay frozen
    finetune.decoder_steps > 0  first the first stage's decoder learns to draw the training images (encoder frozen,
                                so the latents stay): a first stage cannot decode what it never saw; with
                                finetune.prior, it also keeps drawing from the class images' latents what it drew
                                before (the decoder's own prior preservation)
    finetune.train = unet       every U-Net weight trained, as in `ldmkit train`
                     unet+text  the U-Net and the text encoder's transformer
                     lora       peft adapters on `lora.targets` (ldmkit.interop.lora); only A, B trained;
                                `lora.text_encoder` adds adapters on the encoder's attention projections
                     embedding  textual inversion: a new word's vectors, all else frozen (train/inversion.py)

The run is a normal `ldmkit train` folder: its checkpoints hold the whole model (for LoRA, the base
with the adapter folded in at scale 1), so `sample`, `convert` and `serve` read it as they read any
run. A LoRA run also writes the adapter alone as OUT/lora.safetensors (diffusers' `load_lora_weights`
layout, or kohya's with `lora.format: kohya`), and keeps the adapter (live and EMA) in the training
state, from which `--resume` restores it.

Where the text encoder trains (unet+text, lora.text_encoder), its captions are not cached: each step encodes its
batch anew with gradients (`CachedTextEncoder.encode_trainable`), and the trained module is the U-Net and the
encoder's transformers model together (`TrainedParts`: one optimizer, one EMA, one gradient clip). Each checkpoint
folder holds the encoder as a folder of its own (CHECKPOINT/text_encoder, + tokenizer/ for CLIP; the EMA's where
there is an EMA, as `ldmkit.load` pairs it with the EMA U-Net; a LoRA folded in) and its config names it there;
the training state holds the live encoder (or its adapter) and the EMA's, from which `--resume` restores them.
The encoder stays on the CPU, as every text encoder in ldmkit does (the Conditioner keeps it out of `.to()`).

Under torchrun, DDP wraps the U-Net alone (one wrapper cannot hold a GPU U-Net and a CPU encoder: its buckets are
reduced by one backend, and NCCL reduces only GPU tensors); the encoder's gradients (or its adapter's) are averaged
after the step's last backward by `distributed.average_gradients`, so every rank clips and updates with the global
batch's gradient and the replicas stay equal. Textual inversion's vectors are a module of their own, which DDP wraps
(the loss reaches them through its forward).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from ldmkit.checkpoint import load_training_state
from ldmkit.conditioning import Conditioner
from ldmkit.errors import LdmkitError
from ldmkit.interop import lora as lora_io
from ldmkit.layers.sharing import with_children
from ldmkit.pipeline import LatentDiffusion
from ldmkit.train.config import DiffusionTrainConfig
from ldmkit.device import autocast
from ldmkit.train import inversion, prior
from ldmkit.train.latents import draw_z0, posterior_z
from ldmkit.train.diffusion_task import DiffusionTask
from ldmkit.train.distributed import full_state_dict

LORA_FILE = "lora.safetensors"


def load_init_model(cfg: DiffusionTrainConfig) -> LatentDiffusion:
    """The LatentDiffusion training starts from: MODEL's weights (EMA where it has them), its model config
    with the training config's image size, condition-dropout rates and `finetune`'s loss settings (weighting,
    min-SNR γ, offset noise), on the CPU in train mode."""
    import ldmkit

    path = cfg.finetune.init_from
    src = ldmkit.load(path, ema=True)
    if not isinstance(src, LatentDiffusion):
        raise LdmkitError(f"--init-from {path} holds a {type(src).__name__}, not a diffusion model; give an "
                          "`ldmkit train` run, a diffusers pipeline folder or a Stable Diffusion single file")
    mc = src.config
    if mc.conditioner.aesthetic_score:  # the training loss builds SDXL base's six size/crop values, not five
        raise LdmkitError(f"--init-from {path} is an SDXL refiner (aesthetic-score conditioning), which ldmkit samples "
                          "and converts but does not fine-tune; fine-tune the SDXL base model instead")
    if cfg.concat is not None and cfg.concat != mc.concat:
        raise LdmkitError(f"the config's concat route ({cfg.concat.kind}) is not the one {path} was trained with "
                          f"({mc.concat.kind if mc.concat else 'none'}); fine-tuning keeps the model's inputs")
    cond_cfg = mc.conditioner.model_copy(update={"drop_text": cfg.conditioner.drop_text,
                                                 "drop_label": cfg.conditioner.drop_label,
                                                 "drop_all": cfg.conditioner.drop_all})
    ft = cfg.finetune
    loss = {k: v for k in ("weighting", "min_snr_gamma", "offset_noise") if (v := getattr(ft, k)) is not None}
    mc = mc.model_copy(update={"image_size": cfg.data.size, "conditioner": cond_cfg,
                               "diffusion": mc.diffusion.model_copy(update=loss)})
    conditioner = Conditioner(cond_cfg, text_encoder=src.conditioner.text_encoder)
    ldm = LatentDiffusion.from_config(mc, conditioner=conditioner)
    ldm.load_state_dict(src.state_dict())
    ldm.autoencoder.eval().requires_grad_(False)
    return ldm


class TrainedParts(nn.Module):
    """The U-Net and the text encoder's transformers model as one trained module (one optimizer, one EMA, one
    gradient clip), called as the U-Net: the encoder's gradients come through the caption tokens (the Cond), which
    the loss computes before this call (`CachedTextEncoder.encode_trainable`)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.unet(*args, **kwargs)

    def set_gradient_checkpointing(self, on: bool) -> None:  # optim.gradient_checkpointing: the U-Net's switch
        self.unet.set_gradient_checkpointing(on)


def _unet(net: nn.Module) -> nn.Module:
    return net.unet if isinstance(net, TrainedParts) else net


def _text(net: nn.Module) -> nn.Module | None:
    return net.text_encoder if isinstance(net, TrainedParts) else None


def _text_parts(text: nn.Module | None) -> dict[str, nn.Module]:
    """{diffusers' part name: transformers model} of the trained text encoder: SDXL's `model` is a ModuleDict of its
    two (text_encoder, text_encoder_2), each a part of its own in a LoRA file."""
    if text is None:
        return {}
    return dict(text.items()) if isinstance(text, nn.ModuleDict) else {"text_encoder": text}


class LoraCheckpoints:
    """Checkpoints of a task whose trained U-Net (`self.module`, or its `TrainedParts`) may carry LoRA adapters
    (`self.lora`), on the text encoder too: the weights hold the plain model (the adapter folded in at scale 1), so
    `sample`, `convert` and `serve` read the run as any other; the training state holds the adapter alone (live and
    EMA), which `--resume` restores; `save_lora_file` writes it as OUT/lora.safetensors. Mixed in before the task
    class."""

    lora: bool

    def weights(self) -> dict:
        if not self.lora:
            return super().weights()
        return self._with_unet(lora_io.plain_state_dict(_unet(self.module)))

    def ema_weights(self) -> dict:
        if not self.lora:
            return super().ema_weights()
        return self._with_unet(lora_io.plain_state_dict(_unet(self.ema.module)))

    def adapter(self, net: nn.Module) -> lora_io.Lora:
        """The LoRA of `net` (the live module or the EMA's): the U-Net's layers, and the text encoder's."""
        lora = lora_io.adapter_of(_unet(net))
        for part, model in _text_parts(_text(net)).items():
            lora.update(lora_io.adapter_of(model, part))
        return lora

    def extra_state(self) -> dict:
        if not self.lora:
            return super().extra_state()
        state = {"lora": _plain(self.adapter(self.module))}
        if self.ema is not None:
            state["lora_ema"] = _plain(self.adapter(self.ema.module))
        return state

    def _load_adapter(self, net: nn.Module, lora: lora_io.Lora) -> None:
        lora_io.load_adapter_(_unet(net), lora)
        for part, model in _text_parts(_text(net)).items():
            lora_io.load_adapter_(model, lora, part)

    def load_weights(self, folder: Path) -> None:
        if not self.lora:
            return super().load_weights(folder)
        self._load_adapter(self.module, _adapters(load_training_state(folder)["lora"]))

    def load_ema(self, ema_module, path: Path) -> None:
        if not self.lora:
            return super().load_ema(ema_module, path)
        state = load_training_state(path.parent)
        self._load_adapter(ema_module, _adapters(state.get("lora_ema", state["lora"])))

    def save_lora_file(self, lora_cfg, t0: float) -> dict:
        """Write the adapter (of the EMA where there is one) as OUT/lora.safetensors; its meta entry."""
        net = self.ema.module if self.ema is not None else self.module
        # model=: an SDXL U-Net LoRA in kohya layout takes sd-scripts' original names (lora_unet_input_blocks_…)
        lora_io.save_lora(self.adapter(net), self.out / LORA_FILE, lora_cfg.format, model=self.ldm)
        return {"file": LORA_FILE, "format": lora_cfg.format, "rank": lora_cfg.rank, "alpha": lora_cfg.alpha or lora_cfg.rank,
                "targets": lora_cfg.targets,
                **({"text_encoder_targets": lora_io.text_targets(_text(net))} if _text(net) is not None else {}),
                "trained_parameters": sum(p.numel() for p in self.module.parameters() if p.requires_grad),
                "seconds": round(time.time() - t0, 1)}


class FinetuneTask(LoraCheckpoints, DiffusionTask):
    """`DiffusionTask` started from `finetune.init_from`, training the U-Net, U-Net + text encoder, LoRA (on the
    U-Net, and the text encoder with `lora.text_encoder`), or a new word's vectors (textual inversion)."""

    name = "finetune"
    fsdp_refusal = "fine-tuning runs under DDP; set optim.distributed=ddp"

    def __init__(self, cfg: DiffusionTrainConfig, out: Path, dist, device: torch.device, progress: bool):
        ft = cfg.finetune
        super().__init__(cfg, out, dist, device, progress)
        enc = self.conditioner.text_encoder
        if (trains_text(cfg) or ft.train == "embedding") and enc is None:
            raise LdmkitError(f"finetune.train={ft.train}{' with lora.text_encoder' if ft.train == 'lora' else ''} "
                              "needs a model with a text encoder; this one has none")
        self.prior = self._class_images(cfg, out) if ft.prior.prompts else None  # drawn by the model as it starts
        self.decoder_seconds = None
        if ft.decoder_steps:
            if self.mean is None:
                raise LdmkitError("finetune.decoder_steps needs the training set in memory (a built-in set or a small "
                                  "folder; set data.in_memory=true), or set finetune.decoder_steps=0")
            images, mean, std = self.data.images, self.mean, self.std
            keep_from = len(images)  # rows from here on are rehearsal: their target is what the decoder drew at start
            if self.prior is not None:  # the decoder rehearses the class latents too, so the class keeps its looks
                p = self.prior
                images, mean, std = (torch.cat([a, b.to(a.device)]) for a, b in
                                     ((images, p["images"]), (mean, p["mean"]), (std, p["std"])))
            self.decoder_seconds = finetune_decoder(self.ldm.autoencoder, images, mean, std, ft.decoder_steps,
                                                    ft.decoder_lr, cfg.optim.batch_size, cfg.optim.seed,
                                                    self.ldm.config.diffusion.latents, keep_from)
        if ft.train == "lora":
            lo = cfg.lora
            lora_io.add_adapter(self.ldm.unet, lo.rank, lo.alpha, lo.dropout, lo.targets)
            self.ldm.unet.to(device)  # the new adapter layers
            self.ldm.train()
        if trains_text(cfg):
            self.text_template = None  # the encoder without adapters: a LoRA's is folded into a copy of it to save
            if ft.train == "lora":
                self.text_template = copy.deepcopy(enc.model)
                lo = cfg.lora
                lora_io.add_adapter(enc.model, lo.rank, lo.alpha, lo.dropout, lora_io.text_targets(enc.model))
            else:
                enc.model.requires_grad_(True)
            enc.model.train()  # as kohya's and diffusers' trainers (BERT's dropout then draws from seed_step's RNG)
            enc.trains = True
            self.module = TrainedParts(self.ldm.unet, enc.model)
        if ft.train == "embedding":
            emb = ft.embedding
            inversion.check_word(enc, emb.token, list(self.data.texts))
            self.ldm.eval().requires_grad_(False)  # the U-Net the vectors are fitted to: a fixed function (no dropout)
            self.module = inversion.WordVectors(inversion.initial_vectors(enc, emb.init, emb.vectors)).to(device)
            self.library = inversion.TrainingLibrary(emb.token, self.module.vectors)
            enc.embeddings, enc.trains = self.library, True

    def _class_images(self, cfg: DiffusionTrainConfig, out: Path) -> dict:
        """DreamBooth's class images (train/prior.py), generated once (cached), and their posteriors."""
        from ldmkit.train.latents import encode_batches

        pc, ft = cfg.finetune.prior, cfg.finetune
        if ft.train == "embedding":
            raise LdmkitError("finetune.prior (DreamBooth) trains the U-Net: use finetune.train unet, unet+text or lora, "
                              "not embedding")
        if not ft.init_from or self.conditioner.text_encoder is None:
            raise LdmkitError("finetune.prior needs a text-to-image model to draw the class images: pass --init-from MODEL")
        if cfg.concat is not None:
            raise LdmkitError("finetune.prior: class images for a model with a concatenation route (inpainting, "
                              "super-resolution) are not supported; leave finetune.prior.prompts unset")
        prompts = prior.read_prompts(pc.prompts)
        cache = Path(pc.cache) if pc.cache else out / prior.CLASS_DIR
        t0 = time.time()
        self.ldm.eval()
        try:
            with torch.random.fork_rng(devices=[]):  # the global RNG (LoRA's init after this) as without a prior
                images, texts, folder, calls = prior.class_images(self.ldm, prompts, pc.images, pc.seed, pc.steps,
                                                                  pc.guidance, cfg.data.size, cache)
            if pc.unconditional:
                # the rest of what the model draws: class prompts name one class, and a LoRA's convolutions or the
                # decoder steps change every image (docs/finetune.md: with square-only class prompts on the demo,
                # the old captions' circles and triangles came out as diamonds)
                with torch.random.fork_rng(devices=[]):
                    more, blank, _, n = prior.class_images(self.ldm, [""], pc.unconditional, pc.seed, pc.steps, 1.0,
                                                           cfg.data.size, cache)
                images, texts, calls = torch.cat([images, more]), texts + blank, calls + n
        finally:
            self.ldm.train()
        with torch.no_grad():
            parts = list(encode_batches(self.ldm.autoencoder, images.to(self.device), 64, False))
        mean, std = torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])  # (N, c, h, w) each
        return {"images": images, "texts": texts, "mean": mean, "std": std,
                "meta": {"folder": str(folder), "images": pc.images, "unconditional": pc.unconditional,
                         "prompts": len(prompts), "weight": pc.weight, "generate_calls": calls,
                         "seconds": round(time.time() - t0, 1)}}

    def piece_loss_at(self, step: int):
        instance = super().piece_loss_at(step)
        if self.embedding:
            return self._with_vectors(instance)
        if self.prior is None:
            return instance
        weight = self.cfg.finetune.prior.weight
        self.step_losses = sums = {"instance_loss": 0.0, "prior_loss": 0.0, "rows": 0}

        def piece_loss(lo: int, hi: int) -> torch.Tensor:
            li, lp = instance(lo, hi), self._prior_loss(step, lo, hi)
            sums["instance_loss"] += li.detach() * (hi - lo)
            sums["prior_loss"] += lp.detach() * (hi - lo)
            sums["rows"] += hi - lo
            return li + weight * lp  # DreamBooth eq. 2: instance + λ·prior, each the mean over its rows

        return piece_loss

    def _with_vectors(self, piece_loss):
        """A piece whose captions all lack the word (caption dropout, a set where only some images show the concept)
        has no path to the vectors: a zero term keeps its backward valid (a zero gradient, as for any unused
        parameter) instead of failing on a loss that needs no gradient."""

        def with_vectors(lo: int, hi: int) -> torch.Tensor:
            loss = piece_loss(lo, hi)  # sets the library's vectors (`loss_unet`)
            return loss + 0.0 * self.library.vectors.sum()

        return with_vectors

    def _prior_loss(self, step: int, lo: int, hi: int) -> torch.Tensor:
        """The mean loss of class rows [lo, hi) of step `step` (train/prior.py: which images, which draws)."""
        o, p = self.optim, self.prior
        rows = prior.class_rows(step, lo, hi, o.batch_size, len(p["texts"]), o.seed)
        r = prior.prior_random(o.seed, step, o.batch_size, lo, hi)
        mean, std = p["mean"][rows.to(p["mean"].device)], p["std"][rows.to(p["mean"].device)]  # (b, c, h, w)
        ae = self.ldm.autoencoder.config
        z0 = draw_z0(r, mean, std, ae.shift_factor, ae.scaling_factor, self.ldm.config.diffusion.latents)
        with autocast(o.precision, self.device):
            return self.ldm.loss(z0, texts=[p["texts"][i] for i in rows.tolist()], generator=r, unet=self.loss_unet())

    def log_values(self) -> dict[str, float]:
        values = super().log_values()
        sums = getattr(self, "step_losses", None)
        if self.prior is not None and sums and sums["rows"]:
            values.update({k: float(sums[k]) / sums["rows"] for k in ("instance_loss", "prior_loss")})
        return values

    def _build_model(self, cfg: DiffusionTrainConfig) -> dict:
        if not cfg.finetune.init_from:
            if cfg.finetune.train in ("lora", "embedding"):
                raise LdmkitError(f"finetune.train: {cfg.finetune.train} needs a model to adapt: pass --init-from MODEL")
            return super()._build_model(cfg)
        self.ldm = load_init_model(cfg)
        self.conditioner = self.ldm.conditioner
        self.model_config = mc = self.ldm.config
        # the model's sections replace the config's, so the routes trained are the model's own, and so is the
        # diffusion process (schedule, prediction, loss weighting, latents: `self.ldm.loss` reads the model's);
        # OUT/train_config.yaml, written once the task is built, records them
        cfg.unet, cfg.conditioner, cfg.concat, cfg.diffusion = mc.unet, mc.conditioner, mc.concat, mc.diffusion
        return {"source": str(cfg.finetune.init_from)}

    @property
    def lora(self) -> bool:
        return self.cfg.finetune.train == "lora"

    @property
    def embedding(self) -> bool:
        return self.cfg.finetune.train == "embedding"

    # --- the hooks of DiffusionTask

    def caches_captions(self) -> bool:
        return not (trains_text(self.cfg) or self.embedding)

    def loss_unet(self):
        if self.embedding:  # this piece's vectors (through the DDP wrapper's forward, if any) into the encoder
            self.library.use(self.trained())
            return self.ldm.unet
        return self.trained

    def forward_module(self) -> nn.Module:
        return _unet(self.module)  # DDP's: the U-Net (the text encoder's gradients: `reduce_gradients`)

    def reduce_gradients(self) -> None:
        if trains_text(self.cfg):
            from ldmkit.train.distributed import average_gradients

            text = _text(self.module)
            average_gradients([p for p in text.parameters() if p.requires_grad], self.dist, self.device)

    def sampling_unet(self):
        net = self.ema.module if self.ema is not None else self.module
        if self.embedding:
            self.library.use(net.vectors.detach())
            return self.ldm.unet
        return _unet(net)

    def sample_grid(self, step: int) -> None:
        enc = self.conditioner.text_encoder
        if not trains_text(self.cfg):
            return super().sample_grid(step)
        enc.model.eval()  # no dropout in the grid; the live encoder (the EMA's is saved in the checkpoint)
        try:
            super().sample_grid(step)
        finally:
            enc.model.train()

    # --- checkpoints: what trains beyond the U-Net

    def weights(self) -> dict:
        if self.embedding:
            return self.ldm.state_dict()  # unchanged: the run stays a model `sample` reads
        if self.lora or not isinstance(self.module, TrainedParts):
            return super().weights()
        return self._with_unet(full_state_dict(self.module.unet))

    def ema_weights(self) -> dict:
        if self.embedding:
            return self.ldm.state_dict()
        if self.lora or not isinstance(self.module, TrainedParts):
            return super().ema_weights()
        return self._with_unet(full_state_dict(self.ema.module.unet))

    def extra_state(self) -> dict:
        state = super().extra_state()
        ema = self.ema.module if self.ema is not None else None
        if self.embedding:
            state["embedding"] = self.module.vectors.detach().clone()
            if ema is not None:
                state["embedding_ema"] = ema.vectors.detach().clone()
        elif trains_text(self.cfg) and not self.lora:  # (a LoRA's text adapter is in super's "lora")
            state["text_encoder"] = dict(self.module.text_encoder.state_dict())
            if ema is not None:
                state["text_encoder_ema"] = dict(ema.text_encoder.state_dict())
        return state

    def load_weights(self, folder: Path) -> None:
        super().load_weights(folder)
        if self.embedding:
            with torch.no_grad():
                self.module.vectors.copy_(load_training_state(folder)["embedding"])
        elif trains_text(self.cfg) and not self.lora:
            self.module.text_encoder.load_state_dict(load_training_state(folder)["text_encoder"])

    def load_ema(self, ema_module, path: Path) -> None:
        if self.embedding:
            state = load_training_state(path.parent)
            with torch.no_grad():
                ema_module.vectors.copy_(state.get("embedding_ema", state["embedding"]))
            return
        if self.lora or not isinstance(ema_module, TrainedParts):
            return super().load_ema(ema_module, path)
        super().load_ema(ema_module.unet, path)
        state = load_training_state(path.parent)
        ema_module.text_encoder.load_state_dict(state.get("text_encoder_ema", state["text_encoder"]))

    def checkpoint_files(self, folder: Path) -> tuple[BaseModel, Callable[[Path], None] | None]:
        if not trains_text(self.cfg):
            return super().checkpoint_files(folder)
        net = self.ema.module if self.ema is not None else self.module
        model = net.text_encoder
        if self.lora:  # the adapter folded in, in a copy without adapters
            model = copy.deepcopy(self.text_template)
            model.load_state_dict(lora_io.plain_state_dict(net.text_encoder))
        enc = self.conditioner.text_encoder
        name = str(folder.resolve() / enc.saved_as)  # where `save_model` writes it, once the folder is in place
        cond = self.model_config.conditioner.model_copy(update={"text_encoder": name})
        return self.model_config.model_copy(update={"conditioner": cond}), lambda tmp: enc.save_model(tmp, model)

    def finish(self, step: int, t0: float) -> dict:
        meta = super().finish(step, t0)
        ft = self.cfg.finetune
        meta.update({"init_from": ft.init_from, "finetune": ft.train, "autoencoder": ft.init_from or meta["autoencoder"]})
        if self.decoder_seconds is not None:
            meta["decoder"] = {"steps": ft.decoder_steps, "seconds": round(self.decoder_seconds, 1)}
        if self.prior is not None:
            meta["prior"] = self.prior["meta"]
        if self.lora and self.main:
            meta["lora"] = self.save_lora_file(self.cfg.lora, t0)
        if self.embedding and self.main:
            net = self.ema.module if self.ema is not None else self.module
            meta["embedding"] = {"token": ft.embedding.token, "init": ft.embedding.init,
                                 **inversion.save_embedding_files(net.vectors, ft.embedding.token, self.out,
                                                                  Path(str(ft.init_from)).name)}
        return meta


def trains_text(cfg: DiffusionTrainConfig) -> bool:
    """Whether the text encoder's weights (or a LoRA on them) train, so its captions cannot be cached."""
    ft = cfg.finetune
    return ft.train == "unet+text" or (ft.train == "lora" and cfg.lora.text_encoder)


def finetune_decoder(ae, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, steps: int, lr: float,
                     batch_size: int, seed: int, latents: str = "sample", keep_from: int | None = None) -> float:
    """Teach the first stage's decoder to draw the training images from their latents (the cached posteriors): L2
    reconstruction, AdamW with cosine decay, the encoder untouched, so the latents the U-Net learns and their
    measured scale stay what they were. The latents are what the model's second stage learns to make
    (`diffusion.latents`): draws z ~ N(mean, std²), or the means themselves. On the demo model (trained on means,
    a posterior σ of 0.5-0.9 against means spread 0.2-1.0), decoding means instead of draws took DreamBooth's
    white diamonds from 82.8 to 95.3 % strict and cut what the decoder alone costs the old captions from 4.5 to
    3.1 points (benchmarks/dreambooth_shapes.py, docs/finetune.md).

    Rows from `keep_from` on are rehearsal (DreamBooth's class images): their target is not the image but what the
    starting decoder draws from the same z, computed each step by a frozen copy. A class image is the starting
    decoder's drawing of latents the U-Net made; re-encoded, its posterior decodes to something a little different,
    and fitting the image would teach the decoder that difference as much as keep its old drawing. With the frozen
    target the rehearsal rows pull only toward the start. On the demo (vocabulary prior, 1,000 steps): the old
    captions' strict shape 91.3 -> 95.5 % (base 98.6 %), the instance's white diamonds unchanged at 95.3 %.
    Returns the seconds it took."""
    t0 = time.time()
    params = [p for n, p in ae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))]
    ae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    start = _frozen_decoder(ae) if keep_from is not None and keep_from < len(images) else None
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    ae.train()
    for step in range(steps):
        rows = torch.randint(len(images), (batch_size,), generator=g)
        rows_d = rows.to(mean.device)
        eps = torch.randn(mean[rows_d].shape, generator=g).to(mean.device)
        z = posterior_z(mean[rows_d], std[rows_d], eps, latents)  # (B, c, h, w)
        target = images[rows].to(mean.device)  # (B, 3, H, W) in [-1, 1]
        if start is not None and bool((kept := rows_d >= keep_from).any()):
            with torch.no_grad():
                target[kept] = start.decode(z[kept])
        loss = F.mse_loss(ae.decode(z), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    ae.eval().requires_grad_(False)
    return time.time() - t0


def _frozen_decoder(ae) -> nn.Module:
    """The autoencoder as it decodes now, frozen: a shallow copy holding deep copies of the decoder and
    post_quant_conv only (the encoder, which decoding never runs, stays shared rather than copied)."""
    copies = {name: None if (child := ae._modules[name]) is None else copy.deepcopy(child).eval().requires_grad_(False)
              for name in ("decoder", "post_quant_conv")}
    return with_children(ae, **copies)  # only the copies are frozen: the shared encoder is the caller's to set


def _plain(lora: lora_io.Lora) -> dict:
    """An adapter as nested dicts of tensors and floats (what `torch.load(weights_only=True)` reads back)."""
    return {path: {"down": a.down, "up": a.up, "alpha": a.alpha} for path, a in lora.items()}


def _adapters(state: dict) -> lora_io.Lora:
    return {path: lora_io.Adapter(d["down"], d["up"], float(d["alpha"])) for path, d in state.items()}


def needs_finetune(cfg: DiffusionTrainConfig) -> bool:
    ft = cfg.finetune
    return bool(ft.init_from) or ft.train != "unet" or ft.decoder_steps > 0
