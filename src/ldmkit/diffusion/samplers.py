"""Samplers: stateless functions with one signature (after k-diffusion's `sample_*`).

    sample_X(denoiser, x, timesteps, *, generator=None, callback=None, **opts) -> x0

- denoiser: a `Denoiser`; D(z_t, t) -> (x̂0, ε̂). Its `schedule` gives ᾱ_t; nothing else is read.
- x: the initial noise z_T ~ N(0, I) (variance-preserving, so no extra scaling).
- timesteps: descending integer timesteps, e.g. from `make_timesteps`.
- generator: every noise draw goes through it, so one seed gives one sample.
- callback(i, t, x, x0_hat): after step i at timestep t; x is the new state (variance-preserving
  z, whatever space the solver works in), x0_hat the denoiser's estimate at this step.

Step i goes from timesteps[i] to timesteps[i+1]; the step after the last timestep goes to
ᾱ = `final_alpha_cumprod` (default 1, i.e. "t = -1", noise-free), so the result is x̂0 of the last
denoiser call for the deterministic samplers. This is diffusers' `set_alpha_to_one=True` (DDIM)
and `final_sigmas_type="zero"` (DPM-Solver++, Euler); pass final_alpha_cumprod=ᾱ_0 for
`set_alpha_to_one=False`.

Symbols: a = ᾱ_t of the current step, a' = ᾱ of the next (less noisy) one; α = sqrt(a), σ = sqrt(1-a).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ldmkit.diffusion.parameterization import Denoiser, consistency_scalings
from ldmkit.diffusion.schedules import randn_like
from ldmkit.errors import LdmkitError

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _alpha_bars(denoiser: Denoiser, timesteps, final_alpha_cumprod: float,
                alpha_bars=None) -> tuple[list[int], list[float]]:
    """Timesteps as ints and ᾱ at each of them plus the final target: n + 1 values. `alpha_bars` (n
    values) replaces the schedule's ᾱ at the timesteps: the noise levels of a σ spacing (Karras,
    exponential; `make_sigma_steps`), whose timesteps are only the network's rounded input and may repeat."""
    schedule = denoiser.schedule
    ts = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
    if not ts:
        raise LdmkitError("no sampling timesteps given; ask for at least one step")
    repeats_ok = alpha_bars is not None
    if (any(b > a or (b == a and not repeats_ok) for a, b in zip(ts, ts[1:])) or ts[0] >= schedule.num_timesteps
            or ts[-1] < 0):
        raise LdmkitError(
            f"sampling timesteps must be strictly decreasing within 0 … {schedule.num_timesteps - 1}; "
            "build them with make_timesteps"
        )
    if not 0.0 < final_alpha_cumprod <= 1.0:
        raise LdmkitError(f"final_alpha_cumprod must be in (0, 1], got {final_alpha_cumprod}")
    if alpha_bars is None:
        return ts, [float(schedule.alphas_cumprod[t]) for t in ts] + [float(final_alpha_cumprod)]
    ab = [float(a) for a in torch.as_tensor(alpha_bars).reshape(-1).tolist()]
    if len(ab) != len(ts) or any(not 0.0 <= a < 1.0 for a in ab) or any(b <= a for a, b in zip(ab, ab[1:])):
        raise LdmkitError(f"alpha_bars must give one noise level per timestep ({len(ts)}), increasing within [0, 1)")
    return ts, ab + [float(final_alpha_cumprod)]


def _denoise(denoiser, x, t: int, alpha_bar: float, alpha_bars):
    """D(x, t), told the noise level when a σ spacing sets it (`alpha_bars`), else the schedule's."""
    return denoiser(x, t) if alpha_bars is None else denoiser(x, t, alpha_bar)


def sample_ddpm(denoiser, x, timesteps, *, generator=None, callback=None, final_alpha_cumprod=1.0, alpha_bars=None):
    """Ancestral sampling from the DDPM posterior q(z_{t'} | z_t, x0) (Ho et al. 2020, eq. 6-7).

    For strided timesteps the chain t -> t' has β = 1 - a/a' and α = a/a' (its single-step
    parameters), so μ̃ = sqrt(a') β/(1-a) x̂0 + sqrt(α)(1-a')/(1-a) z_t and β̃ = (1-a')/(1-a) β.
    """
    ts, ab = _alpha_bars(denoiser, timesteps, final_alpha_cumprod, alpha_bars)
    for i, t in enumerate(ts):
        a, a_next = ab[i], ab[i + 1]
        x0, _ = _denoise(denoiser, x, t, ab[i], alpha_bars)
        beta = 1.0 - a / a_next  # β of the strided step
        # μ̃(z_t, x̂0), eq. 7
        mean = (math.sqrt(a_next) * beta / (1 - a)) * x0 + (math.sqrt(1 - beta) * (1 - a_next) / (1 - a)) * x
        var = (1 - a_next) / (1 - a) * beta  # β̃, eq. 7
        x = mean + math.sqrt(var) * randn_like(x, generator) if var > 0 else mean
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_ddim(denoiser, x, timesteps, *, generator=None, callback=None, eta=0.0, final_alpha_cumprod=1.0, alpha_bars=None):
    """DDIM (Song et al. 2021, eq. 12, with σ_t(η) of eq. 16). eta=0: deterministic; eta=1: the
    DDPM posterior variance (ancestral)."""
    ts, ab = _alpha_bars(denoiser, timesteps, final_alpha_cumprod, alpha_bars)
    for i, t in enumerate(ts):
        a, a_next = ab[i], ab[i + 1]
        x0, eps = _denoise(denoiser, x, t, ab[i], alpha_bars)
        s = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))  # σ_t(η), eq. 16
        # eq. 12: sqrt(a') x̂0  +  "direction pointing to x_t"  +  σ_t ε_t
        x = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - s * s, 0.0)) * eps
        if s > 0:
            x = x + s * randn_like(x, generator)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def _half_log_snr(a: float) -> float:
    """λ = log(α/σ) = ½ log(a / (1-a)); ±inf at the ends (zero terminal SNR, the noise-free end)."""
    if a <= 0.0:
        return -math.inf
    if a >= 1.0:
        return math.inf
    return 0.5 * (math.log(a) - math.log1p(-a))


def sample_dpmpp_2m(
    denoiser, x, timesteps, *, generator=None, callback=None, lower_order_final=True, final_alpha_cumprod=1.0, alpha_bars=None
):
    """DPM-Solver++(2M): multistep second order in λ with data prediction (Lu et al. 2022,
    Algorithm 2). Each step, with h = λ' - λ and r = h_prev / h:

        D = (1 + 1/(2r)) x̂0_i - 1/(2r) x̂0_{i-1}        (first step, and some last steps: D = x̂0_i)
        z' = (σ'/σ) z - α' (e^{-h} - 1) D

    The last step is first order when it ends at σ' = 0 (h = ∞) or, with lower_order_final, when
    fewer than 15 steps are taken (diffusers' stability rule). `generator` is unused (deterministic).
    """
    ts, ab = _alpha_bars(denoiser, timesteps, final_alpha_cumprod, alpha_bars)
    n = len(ts)
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts):
        a, a_next = ab[i], ab[i + 1]
        x0, _ = _denoise(denoiser, x, t, ab[i], alpha_bars)
        h = _half_log_snr(a_next) - _half_log_snr(a)  # step in λ; ∞ at either end of a VP schedule
        last = i == n - 1
        if x0_prev is None or (last and (a_next >= 1.0 or (lower_order_final and n < 15))):
            d = x0  # first order == DDIM
        else:
            r = h_prev / h
            d = x0 + (x0 - x0_prev) / (2 * r)  # (1 + 1/(2r)) x̂0_i - 1/(2r) x̂0_{i-1}
        x = (math.sqrt(1 - a_next) / math.sqrt(1 - a)) * x - (math.sqrt(a_next) * math.expm1(-h)) * d
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, t, x, x0)
    return x


def _unipc_coefficients(hh: float, rks: list[float], variant: str) -> tuple[list[list[float]], list[float], float, float]:
    """UniPC's linear system (Zhao et al. 2023, Algorithm 1 / eq. 8) for step hh = -h (data
    prediction): R[k][j] = r_j^k and b[k] = k! φ_{k+1}(hh) / B(h) for k = 0 … p-1, with
    φ_1(hh) = (e^hh - 1)/hh; B(h) = hh (bh1) or e^hh - 1 (bh2). Also returns h φ_1 = e^hh - 1 and B(h)."""
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    rows, b = [], []
    for k in range(1, len(rks) + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return rows, b, h_phi_1, b_h


ZERO_SNR_ALPHA_BAR = 2.0**-24  # diffusers' stand-in for ᾱ_T = 0 in its multistep solvers


def _solve(rows: list[list[float]], b: list[float]) -> list[float]:
    return torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()


def sample_unipc(
    denoiser, x, timesteps, *, generator=None, callback=None, order=2, variant="bh2", lower_order_final=True,
    final_alpha_cumprod=1.0, alpha_bars=None,
):
    """UniPC (Zhao et al. 2023): a multistep predictor (UniP-p) and a corrector (UniC) that reuses the
    model output already computed at the predicted point, so order p + 1 costs no extra evaluation.
    Data prediction (x̂0), as diffusers' UniPCMultistepScheduler (predict_x0=True, `variant` = its
    solver_type). With h = λ' - λ, D_k = (x̂0_{i-k} - x̂0_i)/r_k, r_k = (λ_{i-k} - λ_i)/h:

        predictor  z' = (σ'/σ) z - α' (e^{-h} - 1) x̂0_i - α' B(h) Σ_k ρ^p_k D_k
        corrector  z' ← (σ'/σ) z - α' (e^{-h} - 1) x̂0_i - α' B(h) (Σ_k ρ^c_k D_k + ρ^c_p (x̂0' - x̂0_i))

    ρ from `_unipc_coefficients` (ρ^p = 1/2 for p = 2, as the paper); the first step is first order
    (warm-up) and, with lower_order_final, the order falls to the steps left. The corrector is not
    applied after the last step. `generator` is unused (deterministic).
    """
    if order < 1 or variant not in ("bh1", "bh2"):
        raise LdmkitError(f"UniPC takes order >= 1 and variant bh1 or bh2, got order={order}, variant={variant!r}")
    ts, ab = _alpha_bars(denoiser, timesteps, final_alpha_cumprod, alpha_bars)
    n = len(ts)
    # A zero-terminal-SNR step (ᾱ = 0) has λ = −∞, which enters the order-3 solve as r = ∞ (NaN). diffusers'
    # UniPC replaces ᾱ_T = 0 by 2⁻²⁴ (`rescale_betas_zero_snr`), for the denoiser's x̂0 too; so does ldmkit.
    clamped = [a <= 0.0 for a in ab]
    ab = [ZERO_SNR_ALPHA_BAR if c else a for a, c in zip(ab, clamped)]
    lam = [_half_log_snr(a) for a in ab]
    al, sg = [math.sqrt(a) for a in ab], [math.sqrt(1 - a) for a in ab]
    x0s: list[torch.Tensor] = []  # x̂0 at each step so far
    prev_x, prev_order = None, 0  # the state before the last predictor, and that predictor's order

    def update(i: int, x_start: torch.Tensor, p: int, new_x0: torch.Tensor | None) -> torch.Tensor:
        """From step i (state x_start, x̂0 history x0s[: i + 1]) to step i + 1: the predictor of order p,
        or with new_x0 (x̂0 at step i + 1) the corrector."""
        h = lam[i + 1] - lam[i]
        m0 = x0s[i]
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
        d = [(x0s[i - k] - m0) / r for k, r in zip(range(1, p), rks)]
        rows, b, h_phi_1, b_h = _unipc_coefficients(-h, rks + [1.0], variant)
        out = (sg[i + 1] / sg[i]) * x_start - (al[i + 1] * h_phi_1) * m0
        if new_x0 is None:
            rho = ([0.5] if p == 2 else _solve([r[:-1] for r in rows[:-1]], b[:-1])) if d else []
            res = sum(r * dk for r, dk in zip(rho, d)) if d else 0.0
        else:
            rho = [0.5] if p == 1 else _solve(rows, b)
            res = sum(r * dk for r, dk in zip(rho[:-1], d)) + rho[-1] * (new_x0 - m0)
        return out - (al[i + 1] * b_h) * res if d or new_x0 is not None else out

    for i, t in enumerate(ts):
        x0, _ = denoiser(x, t, ab[i]) if alpha_bars is not None or clamped[i] else denoiser(x, t)
        if prev_x is not None:  # UniC: correct the predicted state with the model output at it
            x = update(i - 1, prev_x, prev_order, x0)
        x0s.append(x0)
        p = min(order, n - i) if lower_order_final else order
        p = min(p, i + 1)  # warm-up: only i + 1 outputs exist
        if math.isinf(lam[i + 1]):  # ending noise-free (h = ∞): the history carries no weight, first order
            p = 1
        prev_x, prev_order = x, p
        x = update(i, x, p, None)
        if callback is not None:
            callback(i, t, x, x0)
    return x


# Euler samplers (Karras et al. 2022) work on the variance-exploding ODE. Change of variables:
# the VP state z_t = α x0 + σ_vp ε becomes x = z_t / α = x0 + σ ε with σ = σ_vp/α = sqrt((1-a)/a),
# the data blurred by N(0, σ² I) as in Karras's p(x; σ), and z_t = α x = x / sqrt(σ² + 1). The
# probability-flow ODE (Karras eq. 1 with σ(t) = t, score (D - x)/σ² from eq. 3) is
# dx/dσ = (x - D(x; σ))/σ = ε̂. We step in x and return to
# z after every step. σ = ∞ at a zero-terminal-SNR step, so the update x + (σ' - σ) d is evaluated
# in its equal form D + σ' d, which stays finite.


def _ve_sigma(a: float) -> float:
    """σ = sqrt((1 - ᾱ)/ᾱ), the VE noise level of a VP timestep."""
    return math.inf if a <= 0.0 else math.sqrt((1 - a) / a)


def sample_euler(denoiser, x, timesteps, *, generator=None, callback=None, final_alpha_cumprod=1.0, alpha_bars=None):
    """Euler's method on the probability-flow ODE in σ (Karras et al. 2022, Algorithm 2 without
    churn or the 2nd-order correction). On the discrete VP timesteps this gives the same
    trajectory as DDIM with eta=0. `generator` is unused (deterministic)."""
    ts, ab = _alpha_bars(denoiser, timesteps, final_alpha_cumprod, alpha_bars)
    for i, t in enumerate(ts):
        a_next = ab[i + 1]
        x0, d = _denoise(denoiser, x, t, ab[i], alpha_bars)  # d = (x - D)/σ = ε̂, the ODE derivative dx/dσ
        x_ve = x0 + _ve_sigma(a_next) * d  # = x + (σ' - σ) d
        x = math.sqrt(a_next) * x_ve  # back to z = α' x
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_euler_ancestral(
    denoiser, x, timesteps, *, generator=None, callback=None, eta=1.0, final_alpha_cumprod=1.0, alpha_bars=None
):
    """Euler ancestral (k-diffusion's `sample_euler_ancestral`, after Karras et al. 2022): an Euler
    step down to σ_down, then fresh noise σ_up, with σ_down² + σ_up² = σ'² and
    σ_up = min(σ', η σ' sqrt(1 - σ'²/σ²)) (the DDPM posterior variance in σ units when η = 1)."""
    ts, ab = _alpha_bars(denoiser, timesteps, final_alpha_cumprod, alpha_bars)
    for i, t in enumerate(ts):
        a, a_next = ab[i], ab[i + 1]
        x0, d = _denoise(denoiser, x, t, ab[i], alpha_bars)
        s, s_next = _ve_sigma(a), _ve_sigma(a_next)
        s_up = min(s_next, eta * s_next * math.sqrt(max(1.0 - (s_next / s) ** 2, 0.0)))
        s_down = math.sqrt(s_next**2 - s_up**2)
        x_ve = x0 + s_down * d  # = x + (σ_down - σ) d
        if s_up > 0:
            x_ve = x_ve + s_up * randn_like(x, generator)
        x = math.sqrt(a_next) * x_ve  # back to z = α' x
        if callback is not None:
            callback(i, t, x, x0)
    return x


def sample_lcm(denoiser, x, timesteps, *, generator=None, callback=None, final_alpha_cumprod=1.0, alpha_bars=None,
               timestep_scaling=10.0):
    """Multistep latent consistency sampling (Luo et al. 2023, Algorithm 3; diffusers' `LCMScheduler`), for a
    model distilled by `ldmkit distill`. At each timestep t the consistency function maps z_t to the data,

        ẑ0 = f(z_t, t) = c_skip(t) z_t + c_out(t) x̂0(z_t, t)              (eq. 9, `consistency_scalings`)

    and the next step starts from fresh noise at the next timestep t', z_t' = α' ẑ0 + σ' ε (Algorithm 3,
    line 6); the last step returns ẑ0. One network evaluation per step; 1 step is one-shot generation.
    On a model that was not distilled this is "predict x0, renoise": it runs, but needs many steps."""
    ts, ab = _alpha_bars(denoiser, timesteps, final_alpha_cumprod, alpha_bars)
    for i, t in enumerate(ts):
        x0, _ = _denoise(denoiser, x, t, ab[i], alpha_bars)
        c_skip, c_out = consistency_scalings(t, timestep_scaling)
        denoised = c_out * x0 + c_skip * x  # f(z_t, t)
        if i < len(ts) - 1:
            x = math.sqrt(ab[i + 1]) * denoised + math.sqrt(1 - ab[i + 1]) * randn_like(x, generator)
        else:
            x = denoised
        if callback is not None:
            callback(i, t, x, denoised)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "unipc": sample_unipc,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "lcm": sample_lcm,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function registered under `name`."""
    if name not in SAMPLERS:
        raise LdmkitError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
