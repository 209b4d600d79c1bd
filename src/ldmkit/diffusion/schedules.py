"""Discrete-time variance-preserving noise schedules (DDPM family, T training timesteps).

Symbols (Ho et al. 2020; Kingma et al. 2021):

    β_t                  noise added at step t (betas)
    ᾱ_t = Π_{s≤t}(1-β_s) cumulative signal fraction (alphas_cumprod)
    α_t = sqrt(ᾱ_t)      signal scale     σ_t = sqrt(1-ᾱ_t)   noise scale
    z_t = α_t x0 + σ_t ε                  the forward process q(z_t | x0)   (DDPM eq. 4)
    SNR(t) = α_t² / σ_t² = ᾱ_t / (1-ᾱ_t)   λ_t = log(α_t / σ_t) = ½ log SNR(t)

Timesteps are integers 0 … T-1 (0 is the least noisy). The schedule is stored in float64 on the CPU;
values are gathered there and moved to the caller's tensor with `expand_like`, so a schedule never
needs to be "moved to a device".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ldmkit.errors import LdmkitError

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def expand_like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) values -> (B, 1, …, 1) with x's dtype and device, so they broadcast against x."""
    v = v.to(dtype=x.dtype).to(x.device)  # cast on the CPU first: some devices have no float64
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, I) noise shaped like x, drawn on the generator's device (then moved), so a seed gives
    the same numbers whatever device x lives on."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """β_t and ᾱ_t for t = 0 … T-1 (float64, CPU). Build one with `make_schedule`."""

    betas: torch.Tensor  # (T,) β_t
    alphas_cumprod: torch.Tensor  # (T,) ᾱ_t

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or len(betas) == 0 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise LdmkitError("betas must be a non-empty 1-D sequence of values in (0, 1]")
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def _gather(self, values: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(t)
        return values[t.long().cpu()].to(t.device)  # index on the CPU, return on t's device

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        """ᾱ_t, float64, shaped like t."""
        return self._gather(self.alphas_cumprod, t)

    def alpha(self, t: torch.Tensor | int) -> torch.Tensor:
        """α_t = sqrt(ᾱ_t)."""
        return self.alpha_bar(t).sqrt()

    def sigma(self, t: torch.Tensor | int) -> torch.Tensor:
        """σ_t = sqrt(1 - ᾱ_t)."""
        return (1.0 - self.alpha_bar(t)).sqrt()

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 - ᾱ_t); 0 at a zero-terminal-SNR last step."""
        a = self.alpha_bar(t)
        return a / (1.0 - a)


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021 eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2),
    # β_t = 1 - ᾱ_t/ᾱ_{t-1} clipped at 0.999 to avoid the singularity at t = T.
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1.0 - f[1:] / f[:-1]).clamp(max=max_beta)


def rescale_to_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 Algorithm 1: shift and scale sqrt(ᾱ) so sqrt(ᾱ_{T-1}) = 0 (SNR 0 at the last
    step) while sqrt(ᾱ_0) is unchanged, then turn ᾱ back into β."""
    sqrt_ab = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def make_schedule(
    kind: str = "scaled_linear",
    num_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    rescale_zero_terminal_snr: bool = False,
) -> NoiseSchedule:
    """Build a schedule by name. `linear`: β linearly spaced (DDPM); `scaled_linear`: sqrt(β)
    linearly spaced (Stable Diffusion, the default with 0.00085 … 0.012); `cosine`: Nichol & Dhariwal
    (ignores beta_start/beta_end; diffusers calls it "squaredcos_cap_v2").
    `rescale_zero_terminal_snr` applies Lin et al. 2024 (pair it with v-prediction and "trailing")."""
    if num_timesteps < 1:
        raise LdmkitError(f"num_timesteps must be at least 1, got {num_timesteps}")
    T = num_timesteps
    if kind == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    elif kind in ("cosine", "squaredcos_cap_v2"):
        betas = _cosine_betas(T)
    else:
        raise LdmkitError(f"unknown noise schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
    if rescale_zero_terminal_snr:
        betas = rescale_to_zero_terminal_snr(betas)
    return NoiseSchedule.from_betas(betas)


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_t = α_t x0 + σ_t ε (DDPM eq. 4), t: (B,) integer timesteps."""
    return expand_like(schedule.alpha(t), x0) * x0 + expand_like(schedule.sigma(t), x0) * noise


def make_timesteps(
    schedule: NoiseSchedule, num_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """Descending int64 sampling timesteps, the `timestep_spacing` conventions of diffusers'
    DDIMScheduler / DDPMScheduler (Lin et al. 2024, Table 2):

    leading:  k · (T // n) + steps_offset for k = n-1 … 0   (SD 1.x: steps_offset=1 -> 981 … 1)
    trailing: round(T - k · T/n) - 1 for k = 0 … n-1         (always starts at T-1; steps_offset unused)
    linspace: round(linspace(0, T-1, n)) reversed            (steps_offset unused)

    Use "trailing" with a zero-terminal-SNR schedule so the first step sees SNR 0.
    """
    T = schedule.num_timesteps
    if not 1 <= num_steps <= T:
        raise LdmkitError(f"number of sampling steps must be between 1 and {T}, got {num_steps}")
    if spacing == "leading":
        ratio = T // num_steps
        steps = [k * ratio + steps_offset for k in reversed(range(num_steps))]
    elif spacing == "trailing":
        # np.arange's float arithmetic, as diffusers does, so ties (x.5) round the same way; diffusers
        # can return n + 1 values ending in -1 (e.g. n = 61); we keep the first n.
        steps = (np.round(np.arange(T, 0, -T / num_steps)) - 1).astype(np.int64)[:num_steps].tolist()
    elif spacing == "linspace":
        steps = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64).tolist()
    else:
        raise LdmkitError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")
    if steps[0] >= T or steps[-1] < 0:
        raise LdmkitError(f"steps_offset={steps_offset} puts timesteps outside 0 … {T - 1}; lower it")
    return torch.tensor(steps, dtype=torch.int64)


LCM_GRID_STEPS = 50  # diffusers' LCMScheduler `original_inference_steps`: the grid of the published LCMs


def lcm_timesteps(schedule: NoiseSchedule, num_steps: int, grid_steps: int = LCM_GRID_STEPS,
                  strength: float = 1.0) -> torch.Tensor:
    """Descending int64 timesteps of latent consistency sampling, exactly diffusers'
    `LCMScheduler.set_timesteps(num_steps, original_inference_steps=grid_steps, strength=strength)`.

    A consistency model learned f(z_t, t) only on its distillation grid, the skipping grid
    t_i = i·k − 1, k = T // N, i = 1 … N (Luo et al. 2023, §4.2; `ldmkit distill`'s `skipping_grid`),
    whatever spacing its teacher sampled with, so the timesteps come from that grid and never from the
    model's own spacing (SD's "leading" + 1 would give 751 … 1, and t = 0 at one step, where
    f(z, 0) = z returns the noise). The grid is cut to its first int(N · strength) points for img2img
    and `num_steps` points are taken at evenly spaced indices from its top: all of them run (diffusers'
    LCM img2img pipeline), none is dropped. strength 0 gives no steps (the encode-decode of the image).
    """
    T = schedule.num_timesteps
    if not 1 <= grid_steps <= T:
        raise LdmkitError(f"lcm: grid_steps (the distillation grid) must be between 1 and {T}, got {grid_steps}")
    if not 1 <= num_steps <= grid_steps:
        raise LdmkitError(f"lcm takes 1 to {grid_steps} steps (the points of its {grid_steps}-point distillation "
                          f"grid), got {num_steps}")
    k = T // grid_steps
    points = int(grid_steps * strength)  # int(), as diffusers
    if points == 0:
        return torch.zeros(0, dtype=torch.int64)
    if points < num_steps:
        raise LdmkitError(f"lcm at strength {strength:g} keeps {points} of its {grid_steps} grid timesteps, fewer "
                          f"than the {num_steps} steps asked; raise the strength or lower the steps")
    grid = (np.arange(1, points + 1) * k - 1)[::-1]  # (points,) t_i = i·k − 1, descending
    index = np.floor(np.linspace(0, points, num=num_steps, endpoint=False)).astype(np.int64)
    return torch.from_numpy(grid[index].copy()).to(torch.int64)


def sampler_timesteps(
    schedule: NoiseSchedule, sampler: str, num_steps: int, spacing: str = "leading", steps_offset: int = 0, *,
    sigma_spacing: str | None = None, strength: float = 1.0, grid_steps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(timesteps, noise levels ᾱ or None for the schedule's own) that `sampler` runs for a request of
    `num_steps` steps: the one place a sampling caller gets them.

    lcm: the distillation grid (`lcm_timesteps`, `grid_steps` default LCM_GRID_STEPS; an ldmkit student's
         is its meta.sampling.grid_steps), img2img strength as diffusers' LCMScheduler (all steps run);
    the others: the model's `spacing`/`steps_offset` (`make_timesteps`) or a σ spacing (`make_sigma_steps`),
         and img2img (SDEdit, Meng et al. 2022) keeps the last int(strength · num_steps) of them.
    A σ spacing asked of lcm wins over its grid (the user chose the levels)."""
    if sampler == "lcm" and sigma_spacing is None:
        return lcm_timesteps(schedule, num_steps, grid_steps or LCM_GRID_STEPS, min(strength, 1.0)), None
    levels = None
    if sigma_spacing is None:
        timesteps = make_timesteps(schedule, num_steps, spacing, steps_offset)
    else:
        timesteps, levels = make_sigma_steps(schedule, num_steps, sigma_spacing)
    if strength >= 1.0:
        return timesteps, levels
    keep = num_steps - int(strength * num_steps)  # int(), as diffusers' img2img pipelines (50 × 0.75 → 37)
    return timesteps[keep:], (levels[keep:] if levels is not None else None)


SIGMA_SPACINGS = ("karras", "exponential")


def make_sigma_steps(schedule: NoiseSchedule, num_steps: int, spacing: str = "karras",
                     rho: float = 7.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling steps spaced in the VE noise level σ = sqrt((1 - ᾱ)/ᾱ) between the schedule's ends,
    σ_max = σ(T - 1) and σ_min = σ(0): (timesteps int64 (n,), ᾱ of each step float64 (n,)).

    karras:      σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, ρ = 7 (Karras et al. 2022, eq. 5)
    exponential: σ_i evenly spaced in log σ

    The solver steps between these levels exactly (samplers' `alpha_bars`); the network is shown the
    timestep whose log σ the level falls at, by linear interpolation, rounded (karras) or truncated
    (exponential) as diffusers' `use_karras_sigmas` / `use_exponential_sigmas` do, so two close levels
    can share a timestep. A zero-terminal-SNR schedule has σ_max = ∞ and is refused.
    """
    if spacing not in SIGMA_SPACINGS:
        raise LdmkitError(f"unknown sigma spacing {spacing!r}; choose one of {', '.join(SIGMA_SPACINGS)}")
    T = schedule.num_timesteps
    if not 1 <= num_steps <= T:
        raise LdmkitError(f"number of sampling steps must be between 1 and {T}, got {num_steps}")
    abar = schedule.alphas_cumprod.float().numpy()
    if float(abar[-1]) <= 0.0:
        raise LdmkitError(f"{spacing} sigmas need a finite largest noise level; a zero-terminal-SNR schedule has "
                          "none: use the timestep spacings (trailing)")
    # the σ table in float32, as diffusers builds it, so a level at an end maps to the same timestep
    # (float64 would put σ_max at exactly T - 1 where diffusers' truncation gives T - 2 for exponential)
    table = ((1 - abar) / abar) ** 0.5  # (T,) float32, increasing with t
    log_sigmas = np.log(table).astype(np.float64)
    s_max, s_min = float(table[-1]), float(table[0])
    if spacing == "karras":
        ramp = np.linspace(0, 1, num_steps)
        sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    else:
        sigmas = np.exp(np.linspace(math.log(s_max), math.log(s_min), num_steps))
    # fractional timestep of each level: linear interpolation of log σ between neighbouring timesteps
    t = np.interp(np.log(sigmas), log_sigmas, np.arange(T, dtype=np.float64))
    t = np.round(t) if spacing == "karras" else np.floor(t)
    return torch.tensor(t, dtype=torch.int64), torch.tensor(1 / (1 + sigmas**2), dtype=torch.float64)
