"""First-stage losses: reconstruction + KL, an optional PatchGAN discriminator and a perceptual hook.

The LDM first stage is trained with "a combination of a perceptual loss and a patch-based
adversarial objective" plus a slight KL penalty (Rombach et al., 2022, §3 and App. G; the loss
itself is Esser et al., 2021, VQGAN eq. 5-7). Here each part is a switch so that "why a VAE and not
an AE" and "what does the GAN buy" can be measured:

    L = rec(x, x̂) + w_p · perceptual(x, x̂) + kl_weight · KL(q(z|x) || N(0, I)) + λ · d_weight · L_G

with λ the adaptive weight ‖∇_last L_rec‖ / ‖∇_last L_G‖ (VQGAN eq. 7) and L_G active only after
`disc_start` steps. The discriminator is trained with the hinge loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ldmkit.errors import LdmkitError


class AutoencoderLossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reconstruction: Literal["l1", "l2"] = Field("l1", description="pixel loss")
    kl_weight: float = Field(1e-6, ge=0, description="weight of KL per element sum (LDM: 1e-6)")
    perceptual_path: str | None = Field(None, description="TorchScript file: (x, y) in [-1,1] -> (B,) distance")
    perceptual_weight: float = Field(1.0, ge=0)
    disc_enabled: bool = Field(False, description="train a PatchGAN discriminator")
    disc_start: int = Field(2000, ge=0, description="step from which the generator sees the GAN loss")
    disc_weight: float = Field(0.5, ge=0, description="multiplier on the adaptive weight")
    disc_layers: int = Field(3, ge=1, description="stride-2 layers in the PatchGAN")
    disc_channels: int = Field(64, ge=1)
    disc_lr: float | None = Field(None, gt=0, description="discriminator LR (default: generator LR)")


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d (Ioffe & Szegedy, 2015) whose training statistics are those of the global batch when
    torch.distributed runs several processes, so the discriminator of a DDP run normalises as one process
    would. The per-channel sums are all-reduced through `torch.distributed.nn.functional.all_reduce`,
    whose backward all-reduces the gradients as well, so every rank's loss reaches every rank's inputs,
    as in one process. `nn.SyncBatchNorm` does this on GPUs only; this also runs on gloo (CPU). One
    process: plain BatchNorm2d. Same parameters and buffers, so checkpoints do not change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # differentiable collective

        x = x.float()  # statistics in float32, as autocast runs batch_norm
        c = x.shape[1]
        n = x.new_tensor([x.numel() // c])  # this rank's elements per channel
        stats = all_reduce(torch.cat([x.sum((0, 2, 3)), x.square().sum((0, 2, 3)), n]))  # global Σx, Σx², count
        count = stats[-1].detach()
        mean = stats[:c] / count
        var = (stats[c : 2 * c] / count - mean.square()).clamp_min(0)  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * count / (count - 1).clamp_min(1)).to(self.running_var.dtype), m)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


class PatchDiscriminator(nn.Module):
    """PatchGAN of pix2pix (Isola et al., 2017): a stack of stride-2 4x4 convs whose output is one
    real/fake logit per overlapping patch, so it judges local texture rather than global layout.
    BatchNorm as in the original, which the LDM/VQGAN discriminator keeps (over the global batch under
    DDP: `GlobalBatchNorm2d`)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                GlobalBatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        # DCGAN init (Radford et al., 2016), as pix2pix and VQGAN do.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):  # GlobalBatchNorm2d too
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h, w) patch logits


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye, 2017): E[relu(1 − D(x))] + E[relu(1 + D(x̂))], halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def load_perceptual(path: str | Path) -> nn.Module:
    """Load an LPIPS-style perceptual distance from a local TorchScript file.

    Nothing can be downloaded, so the network (e.g. LPIPS-VGG exported with `torch.jit.script`)
    comes from the user. Contract: module(x, y) with x, y (B, 3, H, W) in [-1, 1] → (B,) or
    (B, 1, 1, 1) distances. It is frozen.
    """
    path = Path(path)
    if not path.is_file():
        raise LdmkitError(f"perceptual loss weights not found at {path}; give a TorchScript file or unset perceptual_path")
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any load failure is the user's file
        raise LdmkitError(f"cannot load perceptual network {path} as TorchScript ({type(e).__name__}); export it with torch.jit.script/trace") from e
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class AutoencoderLoss(nn.Module):
    """Generator and discriminator losses of the first stage. Holds the discriminator (if any)."""

    def __init__(self, cfg: AutoencoderLossConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.perceptual = load_perceptual(cfg.perceptual_path) if cfg.perceptual_path else None
        self.discriminator = (
            PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers) if cfg.disc_enabled else None
        )

    def reconstruction(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Per-sample mean pixel loss (B,), plus the perceptual distance when a network is given."""
        err = (x - x_hat).abs() if self.cfg.reconstruction == "l1" else (x - x_hat).pow(2)
        rec = err.flatten(1).mean(1)
        if self.perceptual is not None:
            d = self.perceptual(x.contiguous(), x_hat.contiguous())
            rec = rec + self.cfg.perceptual_weight * d.reshape(x.shape[0], -1).mean(1)
        return rec

    def generator_loss(
        self, x: torch.Tensor, x_hat: torch.Tensor, kl: torch.Tensor, step: int, last_layer: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for the autoencoder's parameters. `kl` is per-sample summed KL (B,).

        The KL is summed over latent elements and the reconstruction averaged over pixels, the
        same normalisation as the LDM code, which is why kl_weight is as small as 1e-6.
        """
        rec = self.reconstruction(x, x_hat).mean()
        kl_term = kl.mean()
        loss = rec + self.cfg.kl_weight * kl_term
        logs = {"rec": rec.item(), "kl": kl_term.item()}
        if self.discriminator is not None and step >= self.cfg.disc_start:
            g = -self.discriminator(x_hat).mean()  # non-saturating hinge generator loss
            w = self._adaptive_weight(rec, g, last_layer) * self.cfg.disc_weight
            loss = loss + w * g
            logs.update(g_loss=g.item(), d_weight=float(w))
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.discriminator is not None
        d = hinge_d_loss(self.discriminator(x.detach()), self.discriminator(x_hat.detach()))
        return d, {"d_loss": d.item()}

    def _adaptive_weight(self, rec: torch.Tensor, g: torch.Tensor, last_layer: torch.Tensor | None) -> torch.Tensor:
        """λ = ‖∇_L rec‖ / (‖∇_L g‖ + δ) at the decoder's last layer L (VQGAN eq. 7).

        Under torch.distributed (DDP: every rank holds an equal slice of the global batch and `rec`, `g`
        are means over it) both gradients are averaged over the ranks first, so λ is that of the global
        batch, as in one process, and the same on every rank. With gradient accumulation λ is still the
        micro-batch's: the global one would need every micro-batch's graph alive at once."""
        if last_layer is None or not torch.is_grad_enabled():
            return torch.tensor(1.0)
        rec_grad = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
        if dist.is_available() and dist.is_initialized():
            both = torch.stack([rec_grad, g_grad])  # one all-reduce for the two
            dist.all_reduce(both)
            rec_grad, g_grad = both / dist.get_world_size()
        return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
