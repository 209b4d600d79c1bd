"""The denoising training loss (Ho et al. 2020, eq. 14 "L_simple"), kept apart from the network.

    t ~ U{0, …, T-1},  ε ~ N(0, I) (+ offset noise),  z_t = α_t x0 + σ_t ε
    loss = mean_b  w(t_b) · mean ‖target_b - model(z_t, t)_b‖²

Weightings w(t):
    uniform: 1
    min_snr: Min-SNR-γ (Hang et al. 2023), written for each prediction type so every one equals
             min(SNR, γ) on the x0 scale, since ‖ε̂ - ε‖² = SNR ‖x̂0 - x0‖² and
             ‖v̂ - v‖² = (SNR + 1) ‖x̂0 - x0‖²:
                 eps: min(SNR, γ) / SNR    v: min(SNR, γ) / (SNR + 1)    x0: min(SNR, γ)
Masked loss (`data.mask`; kohya's `masked_loss`, OneTrainer's masked training): a mask m (B, 1, h, w)
in [0, 1] on the latent grid weights each element, and each sample is normalised by its own mask's mass,

    loss_b = w(t_b) · Σ_{c,i,j} m_bij (target − pred)²_bcij / Σ_{c,i,j} m_bij

so it stays the mean squared error over the trained cells (a mask of ones is L_simple exactly), a cell
with m = 0 gets no gradient at all, and a small mask does not shrink its image's loss against the rest of
the batch. A sample whose mask is all zeros contributes 0. Per sample rather than per batch keeps every
micro-batch split of a batch the same loss, as `BatchRandom` does for the draws.
Offset noise (Guttenberg 2023): ε += offset · N(0, 1) of shape (B, C, 1, 1), one value per image
and channel, so the model learns to change the mean brightness of an image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldmkit.diffusion.parameterization import canonical_prediction_type, target
from ldmkit.diffusion.schedules import NoiseSchedule, expand_like, q_sample
from ldmkit.errors import LdmkitError
from ldmkit.rng import BatchRandom

WEIGHTINGS = ("uniform", "min_snr")


@dataclass
class ObjectiveTerms:
    """Per-sample pieces of one loss evaluation, for logging loss against t."""

    loss: torch.Tensor  # (B,) weighted per-sample MSE
    t: torch.Tensor  # (B,) int64 timesteps drawn
    weight: torch.Tensor  # (B,) w(t)


class DiffusionObjective:
    """`objective(model_fn, x0, **model_kwargs)` -> scalar loss; model_fn(z_t, t, **model_kwargs)
    returns the raw network output for `prediction_type`."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        prediction_type: str = "eps",
        weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
    ):
        if weighting not in WEIGHTINGS:
            raise LdmkitError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if min_snr_gamma <= 0:
            raise LdmkitError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
        if offset_noise < 0:
            raise LdmkitError(f"offset_noise must be zero or positive, got {offset_noise}")
        self.schedule = schedule
        self.prediction_type = canonical_prediction_type(prediction_type)
        self.weighting = weighting
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """w(t), float64, shaped like t."""
        snr = self.schedule.snr(t)
        if self.weighting == "uniform":
            return torch.ones_like(snr)
        gamma = self.min_snr_gamma
        if self.prediction_type == "eps":
            return (gamma / snr).clamp(max=1.0)  # = min(SNR, γ)/SNR, and 1 at SNR = 0
        if self.prediction_type == "v":
            return snr.clamp(max=gamma) / (snr + 1.0)
        return snr.clamp(max=gamma)

    def sample_noise(self, x0: torch.Tensor, generator: torch.Generator | BatchRandom | None = None) -> torch.Tensor:
        """ε ~ N(0, I), plus offset · N(0, 1) per (sample, channel) when offset_noise > 0."""
        if generator is None:
            noise = torch.randn_like(x0)
            offset = (torch.randn(x0.shape[:2] + (1,) * (x0.ndim - 2), device=x0.device, dtype=x0.dtype)
                      if self.offset_noise > 0 else None)
        else:
            r = BatchRandom.of(generator, x0.shape[0])
            noise = r.randn(*x0.shape[1:], dtype=x0.dtype)
            offset = r.randn(x0.shape[1], *(1,) * (x0.ndim - 2), dtype=x0.dtype) if self.offset_noise > 0 else None
        if self.offset_noise > 0:
            noise = noise + self.offset_noise * offset.to(noise.device)  # (B, C, 1, 1) broadcast
        return noise.to(x0.device)

    def terms(self, model_fn, x0: torch.Tensor, generator: torch.Generator | BatchRandom | None = None,
              loss_mask: torch.Tensor | None = None, **model_kwargs):
        """One loss evaluation, per sample: `ObjectiveTerms(loss (B,), t (B,), weight (B,))`. `loss_mask`
        (B, 1, h, w) in [0, 1] on x0's grid weights the squared error (module docstring)."""
        if generator is None:
            t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        else:
            generator = BatchRandom.of(generator, x0.shape[0])  # the same draws however the batch is split
            t = generator.randint(self.schedule.num_timesteps).to(x0.device)  # (B,)
        noise = self.sample_noise(x0, generator)  # (B, C, H, W)
        z_t = q_sample(self.schedule, x0, t, noise)  # (B, C, H, W)
        alpha = expand_like(self.schedule.alpha(t), x0)  # (B, 1, 1, 1)
        sigma = expand_like(self.schedule.sigma(t), x0)  # (B, 1, 1, 1)
        goal = target(self.prediction_type, x0, noise, z_t, alpha, sigma)  # (B, C, H, W)
        pred = model_fn(z_t, t, **model_kwargs)  # (B, C, H, W)
        err = (pred.float() - goal.float()).pow(2)  # (B, C, H, W)
        if loss_mask is None:
            mse = err.flatten(1).mean(dim=1)  # (B,)
        else:
            if loss_mask.shape != (x0.shape[0], 1, *x0.shape[2:]):
                raise LdmkitError(f"a loss mask must be (B, 1, h, w) = {(x0.shape[0], 1, *x0.shape[2:])} on the latent "
                                  f"grid, got {tuple(loss_mask.shape)}")
            m = loss_mask.to(device=err.device, dtype=err.dtype).expand_as(err)  # (B, C, H, W)
            # the clamp only meets an all-zero mask (0 / tiny = 0, and a zero gradient): any real mass is >= 1/255
            mse = (m * err).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-12)  # (B,)
        weight = self.weights(t).to(device=mse.device, dtype=mse.dtype)  # (B,)
        return ObjectiveTerms(loss=weight * mse, t=t, weight=weight)

    def __call__(self, model_fn, x0: torch.Tensor, generator: torch.Generator | BatchRandom | None = None,
                 loss_mask: torch.Tensor | None = None, **model_kwargs):
        """Scalar loss: the batch mean of the weighted per-sample MSE."""
        return self.terms(model_fn, x0, generator, loss_mask, **model_kwargs).loss.mean()
