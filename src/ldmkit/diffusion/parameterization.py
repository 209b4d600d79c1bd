"""What the network predicts, and the one denoiser interface every sampler calls.

With z_t = α_t x0 + σ_t ε and α_t² + σ_t² = 1 (variance preserving), a network can predict

    eps: ε                                   (Ho et al. 2020)
    v:   v = α_t ε - σ_t x0                  (Salimans & Ho 2022, eq. in §4 "v-parameterization")
    x0:  x0

and any one of them gives the other two:

    eps: x0 = (z_t - σ_t ε̂) / α_t
    v:   x0 = α_t z_t - σ_t v̂,   ε = σ_t z_t + α_t v̂
    x0:  ε  = (z_t - α_t x̂0) / σ_t

v stays well defined when α_t = 0 (zero terminal SNR); eps does not.
"""

from __future__ import annotations

from typing import Callable

import torch

from ldmkit.diffusion.schedules import NoiseSchedule, expand_like
from ldmkit.errors import LdmkitError

PREDICTION_TYPES = ("eps", "v", "x0")
# diffusers' names for the same things, accepted so its configs can be read as they are
_ALIASES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t, t) -> raw network output


def canonical_prediction_type(name: str) -> str:
    """"eps" | "v" | "x0" (diffusers' "epsilon" | "v_prediction" | "sample" accepted)."""
    name = _ALIASES.get(name, name)
    if name not in PREDICTION_TYPES:
        raise LdmkitError(f"unknown prediction type {name!r}; choose one of {', '.join(PREDICTION_TYPES)}")
    return name


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """v = α_t ε - σ_t x0 (Salimans & Ho 2022)."""
    return alpha * noise - sigma * x0


def target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, z_t: torch.Tensor, alpha, sigma):
    """The training target for a prediction type (z_t is unused, kept for a uniform signature)."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "eps":
        return noise
    if kind == "v":
        return v_target(x0, noise, alpha, sigma)
    return x0


def to_x0_eps(prediction_type: str, pred: torch.Tensor, z_t: torch.Tensor, alpha, sigma):
    """Raw network output -> (x̂0, ε̂). alpha, sigma broadcast against z_t."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "eps":
        return (z_t - sigma * pred) / alpha, pred
    if kind == "v":
        return alpha * z_t - sigma * pred, sigma * z_t + alpha * pred
    return pred, (z_t - alpha * pred) / sigma


def consistency_scalings(t, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """The boundary-condition scalings of a consistency function f(z_t, t) = c_skip(t) z_t + c_out(t) x̂0(z_t, t)
    (Song et al. 2023, eq. 7; Luo et al. 2023, "Latent Consistency Models", eq. 9), in the discrete form of the
    LCM code and diffusers' `LCMScheduler.get_scalings_for_boundary_condition_discrete`, with s = t · timestep_scaling:

        c_skip(t) = σ_data² / (s² + σ_data²)        c_out(t) = s / sqrt(s² + σ_data²)

    so c_skip(0) = 1 and c_out(0) = 0 at the smallest timestep (f is the identity there: the boundary
    condition f(z_ε, ε) = z_ε), and f ≈ x̂0 from the first timesteps on. `t` an int or a tensor."""
    s = t * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


class Denoiser:
    """D(z_t, t) -> (x̂0, ε̂): a network of any prediction type seen through one interface.

    model_fn(z_t, t) returns the raw network output, t an int64 tensor (B,). Conditioning (text,
    labels, guidance) is bound into model_fn by the caller, so samplers never see it.
    """

    def __init__(self, model_fn: ModelFn, schedule: NoiseSchedule, prediction_type: str = "eps"):
        self.model_fn = model_fn
        self.schedule = schedule
        self.prediction_type = canonical_prediction_type(prediction_type)
        if self.prediction_type == "eps" and float(schedule.alphas_cumprod[-1]) == 0.0:
            raise LdmkitError(
                "a zero-terminal-SNR schedule cannot be sampled with eps-prediction (x0 is undefined at "
                "SNR 0); use a v- or x0-prediction model"
            )

    def __call__(self, z_t: torch.Tensor, t: torch.Tensor | int,
                 alpha_bar: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`alpha_bar`: the noise level z_t is at, when it is not the schedule's ᾱ_t (a Karras or
        exponential σ spacing, whose levels fall between timesteps; the network still sees t)."""
        t = torch.as_tensor(t, dtype=torch.int64, device=z_t.device)
        t = t.repeat(z_t.shape[0]) if t.ndim == 0 else t  # (B,)
        alpha, sigma = _levels(self.schedule, t, z_t, alpha_bar)
        # (B, …) raw network output, in the latents' dtype: under bf16 autocast the network answers in bf16,
        # and the sampler's arithmetic (and every blend of it with float32 state) stays in float32
        pred = self.model_fn(z_t, t).to(z_t.dtype)
        return to_x0_eps(self.prediction_type, pred, z_t, alpha, sigma)


def _levels(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor, alpha_bar: float | None):
    """(α, σ) broadcastable to `like`: the schedule's at t, or sqrt(ᾱ), sqrt(1 - ᾱ) of a given level."""
    if alpha_bar is None:
        return expand_like(schedule.alpha(t), like), expand_like(schedule.sigma(t), like)  # (B, 1, …)
    return (torch.tensor(alpha_bar ** 0.5, dtype=like.dtype, device=like.device),
            torch.tensor((1 - alpha_bar) ** 0.5, dtype=like.dtype, device=like.device))


class KnownRegionDenoiser:
    """A denoiser whose prediction is pinned to a known clean latent where `keep` = 1.

    Blended latent diffusion (Avrahami et al., 2023, §3): for inpainting, the latent cells that the
    mask does not touch are known. Replacing x̂0 there by the known latent z_known (and re-deriving
    ε̂ = (z_t − α_t x̂0)/σ_t so the two stay consistent) makes every sampler's trajectory end on
    z_known in those cells, while the network still generates the hole in their context. Without
    it the kept cells are regenerated from the masked-image latent and drift from the original.
    known (B, c, h, w); keep (B, 1, h, w) in {0, 1}.
    """

    def __init__(self, denoiser: Denoiser, known: torch.Tensor, keep: torch.Tensor):
        self.denoiser = denoiser
        self.schedule = denoiser.schedule
        self.prediction_type = denoiser.prediction_type
        self.known = known
        self.keep = keep

    def __call__(self, z_t: torch.Tensor, t: torch.Tensor | int,
                 alpha_bar: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x0, eps = self.denoiser(z_t, t, alpha_bar)
        t = torch.as_tensor(t, dtype=torch.int64, device=z_t.device)
        t = t.repeat(z_t.shape[0]) if t.ndim == 0 else t  # (B,)
        alpha, sigma = _levels(self.schedule, t, z_t, alpha_bar)
        x0 = torch.lerp(x0, self.known.to(x0.dtype), self.keep)  # keep = 1 → the known latent
        eps = torch.lerp(eps, (z_t - alpha * x0) / sigma, self.keep)
        return x0, eps
