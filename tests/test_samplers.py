"""Samplers and guidance.

Each sampler must recover a known Gaussian data distribution from its exact denoiser, and the
deterministic ones must follow diffusers' schedulers step for step on the same model function.
"""

import pytest
import torch

from ldmkit.diffusion import (
    SAMPLERS,
    Denoiser,
    NoiseSchedule,
    batched_classifier_free_guidance,
    classifier_free_guidance,
    expand_like,
    get_sampler,
    make_schedule,
    make_sigma_steps,
    make_timesteps,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_unipc,
)
from ldmkit.errors import LdmkitError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors, many steps: intra-op threads cost more than they save (2x CPU time here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian_model(schedule, mu, std, prediction_type="eps"):
    """Exact network output for data x0 ~ N(mu, std²) (per dimension):
    E[x0 | z_t] = μ + α s² (z_t - α μ) / (α² s² + σ²), and ε, v from it."""

    def model_fn(z, t):
        a = expand_like(schedule.alpha(t), z)
        s = expand_like(schedule.sigma(t), z)
        x0 = mu + a * std**2 * (z - a * mu) / (a * a * std**2 + s * s)
        eps = (z - a * x0) / s
        return {"eps": eps, "v": a * eps - s * x0, "x0": x0}[prediction_type]

    return model_fn


MU, STD = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.2])
# Relative std error allowed at 100 steps. The narrow dimension (s = 0.2, below the last nonzero
# noise level of a few steps) shows the first-order methods' discretisation error: DDPM's fixed
# posterior variance under-disperses, DDIM/Euler under-shoot; DPM-Solver++(2M) is within 0.2%.
STD_TOL = {"ddpm": 0.10, "euler_a": 0.10, "ddim": 0.05, "euler": 0.05, "dpmpp_2m": 0.02, "unipc": 0.02}


@pytest.mark.parametrize("prediction_type,zero_snr", [("eps", False), ("v", True)])
@pytest.mark.parametrize("name", [n for n in SAMPLERS if n != "lcm"])  # lcm needs a consistency function: test_distill
def test_recovers_gaussian_data(name, prediction_type, zero_snr):
    schedule = make_schedule("cosine", rescale_zero_terminal_snr=zero_snr)  # z_T ≈ N(0, I) exactly
    denoiser = Denoiser(gaussian_model(schedule, MU, STD, prediction_type), schedule, prediction_type)
    g = torch.Generator().manual_seed(0)
    z_T = torch.randn(20_000, 2, generator=g)
    x0 = get_sampler(name)(denoiser, z_T, make_timesteps(schedule, 100, "trailing"), generator=g)
    assert (x0.mean(0) - MU).abs().max() < 0.02
    assert ((x0.std(0) / STD) - 1).abs().max() < STD_TOL[name]


def _denoiser():
    schedule = make_schedule("scaled_linear")
    return Denoiser(gaussian_model(schedule, MU, STD), schedule, "eps"), schedule


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seed_same_sample(name):
    denoiser, schedule = _denoiser()
    ts = make_timesteps(schedule, 10)
    run = lambda seed: SAMPLERS[name](  # noqa: E731
        denoiser, torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), ts,
        generator=torch.Generator().manual_seed(seed),
    )
    assert torch.equal(run(1), run(1))
    if name in ("ddpm", "euler_a"):
        assert not torch.equal(run(1), run(2))


def test_known_equivalences():
    """On discrete VP timesteps Euler is DDIM(η=0), and Euler ancestral and DDPM are DDIM(η=1)."""
    denoiser, schedule = _denoiser()
    ts = make_timesteps(schedule, 20, "trailing")
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    torch.testing.assert_close(sample_euler(denoiser, z, ts), sample_ddim(denoiser, z, ts), rtol=0, atol=1e-5)
    ddpm = sample_ddpm(denoiser, z, ts, generator=gen())
    torch.testing.assert_close(sample_euler_ancestral(denoiser, z, ts, generator=gen()), ddpm, rtol=0, atol=1e-5)
    torch.testing.assert_close(sample_ddim(denoiser, z, ts, eta=1.0, generator=gen()), ddpm, rtol=0, atol=1e-5)


def test_callback_and_scalar_timestep():
    denoiser, schedule = _denoiser()
    ts = make_timesteps(schedule, 5)
    seen = []
    out = sample_dpmpp_2m(denoiser, torch.randn(4, 2), ts, callback=lambda i, t, x, x0: seen.append((i, t, x, x0)))
    assert [(i, t) for i, t, _, _ in seen] == list(enumerate(ts.tolist()))
    torch.testing.assert_close(out, seen[-1][3])  # final step to ᾱ = 1 returns x̂0 of the last call
    x0, eps = denoiser(torch.randn(4, 2), 500)  # a plain int timestep is broadcast over the batch
    assert x0.shape == eps.shape == (4, 2)


def test_user_errors():
    denoiser, schedule = _denoiser()
    with pytest.raises(LdmkitError, match="ddpm, ddim, dpmpp_2m, unipc, euler, euler_a"):
        get_sampler("heun")
    with pytest.raises(LdmkitError, match="bh1 or bh2"):
        sample_unipc(denoiser, torch.randn(2, 2), torch.tensor([500, 10]), variant="bh3")
    with pytest.raises(LdmkitError, match="decreasing"):
        sample_ddim(denoiser, torch.randn(2, 2), torch.tensor([10, 500]))
    with pytest.raises(LdmkitError, match="v- or x0-prediction"):
        zsnr = make_schedule("scaled_linear", rescale_zero_terminal_snr=True)
        Denoiser(lambda z, t: z, zsnr, "eps")


# --- trajectory parity with diffusers ---------------------------------------------------------

KW = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _parity_setup(schedule, prediction_type="eps"):
    g = torch.Generator().manual_seed(0)
    mu, std = torch.randn(1, 4, 1, 1, generator=g) * 0.5, torch.rand(1, 4, 1, 1, generator=g) * 0.8 + 0.2
    return gaussian_model(schedule, mu, std, prediction_type), torch.randn(2, 4, 8, 8, generator=g)


def _ours(sampler, model_fn, schedule, prediction_type, z_T, ts, **opts):
    xs = []
    out = sampler(Denoiser(model_fn, schedule, prediction_type), z_T.clone(), ts,
                  callback=lambda i, t, x, x0: xs.append(x), **opts)
    return out, xs


def _theirs(scheduler, model_fn, z_T, ve=False, generator=None, **step_kw):
    """Drive a diffusers scheduler; return the final sample and every intermediate one as VP z
    (Euler schedulers hold x = z/α in VE space: z = x / sqrt(σ² + 1))."""
    x, xs = z_T.clone() * (scheduler.init_noise_sigma if ve else 1.0), []
    for i, t in enumerate(scheduler.timesteps):
        out = model_fn(scheduler.scale_model_input(x, t), torch.full((x.shape[0],), int(t)))
        if generator is not None:  # stochastic schedulers only (UniPC's step takes no generator)
            step_kw = dict(step_kw, generator=generator)
        x = scheduler.step(out, t, x, **step_kw).prev_sample
        xs.append(x / (scheduler.sigmas[i + 1] ** 2 + 1) ** 0.5 if ve else x)
    return x, xs


def _max_diff(ours, theirs):
    (out_a, xs_a), (out_b, xs_b) = ours, theirs
    assert len(xs_a) == len(xs_b)
    return max([(out_a - out_b).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(xs_a, xs_b)])


def test_ddim_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("scaled_linear")
    model_fn, z_T = _parity_setup(schedule)
    ts = make_timesteps(schedule, 50, "leading", steps_offset=1)
    ref = diffusers.DDIMScheduler(**KW, clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    ref.set_timesteps(50)
    assert torch.equal(ref.timesteps, ts)
    assert _max_diff(_ours(sample_ddim, model_fn, schedule, "eps", z_T, ts), _theirs(ref, model_fn, z_T)) < 1e-4
    # η = 1 with the same generator draws the same noise
    ref.set_timesteps(50)
    ours = _ours(sample_ddim, model_fn, schedule, "eps", z_T, ts, eta=1.0, generator=torch.Generator().manual_seed(3))
    theirs = _theirs(ref, model_fn, z_T, generator=torch.Generator().manual_seed(3), eta=1.0)
    assert _max_diff(ours, theirs) < 1e-4


def test_ddim_zero_terminal_snr_v_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("scaled_linear", rescale_zero_terminal_snr=True)
    model_fn, z_T = _parity_setup(schedule, "v")
    ts = make_timesteps(schedule, 50, "trailing")
    ref = diffusers.DDIMScheduler(**KW, clip_sample=False, timestep_spacing="trailing",
                                  rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ref.set_timesteps(50)
    assert torch.equal(ref.timesteps, ts)
    assert _max_diff(_ours(sample_ddim, model_fn, schedule, "v", z_T, ts), _theirs(ref, model_fn, z_T)) < 1e-4


@pytest.mark.parametrize("steps", [50, 10])  # 10 < 15 steps: diffusers' lower_order_final regime
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_dpmpp_2m_matches_diffusers(steps, final):
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("scaled_linear")
    model_fn, z_T = _parity_setup(schedule)
    ts = make_timesteps(schedule, steps, "leading", steps_offset=1)
    ref = diffusers.DPMSolverMultistepScheduler(
        **KW, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type=final
    )
    ref.set_timesteps(timesteps=ts.tolist())  # its own "leading"/"linspace" differ from DDIM's
    final_ab = 1.0 if final == "zero" else float(schedule.alphas_cumprod[0])
    ours = _ours(sample_dpmpp_2m, model_fn, schedule, "eps", z_T, ts, final_alpha_cumprod=final_ab)
    assert _max_diff(ours, _theirs(ref, model_fn, z_T)) < 1e-4


def test_dpmpp_2m_zero_terminal_snr_v_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("scaled_linear", rescale_zero_terminal_snr=True)
    # diffusers' DPM-Solver replaces ᾱ_T = 0 by 2^-24 (σ = ∞ otherwise); ldmkit handles 0 exactly,
    # so compare on the schedule diffusers actually uses.
    abar = schedule.alphas_cumprod.clone()
    abar[-1] = 2.0**-24
    schedule = NoiseSchedule(betas=schedule.betas, alphas_cumprod=abar)
    model_fn, z_T = _parity_setup(schedule, "v")
    ts = make_timesteps(schedule, 50, "trailing")
    ref = diffusers.DPMSolverMultistepScheduler(
        **KW, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"
    )
    ref.set_timesteps(50)
    assert torch.equal(ref.timesteps, ts)
    ours = _ours(sample_dpmpp_2m, model_fn, schedule, "v", z_T, ts)
    assert _max_diff(ours, _theirs(ref, model_fn, z_T)) < 1e-4


@pytest.mark.parametrize("steps", [25, 6])
@pytest.mark.parametrize("variant", ["bh2", "bh1"])
@pytest.mark.parametrize("order,prediction_type", [(2, "eps"), (3, "v")])
def test_unipc_matches_diffusers(steps, variant, order, prediction_type):
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("scaled_linear")
    model_fn, z_T = _parity_setup(schedule, prediction_type)
    # bh1 ending at σ = 0 is NaN in diffusers (B(h) = h = -∞ times a zero residual); ldmkit's last step is
    # the plain first-order one there, so bh1 is compared ending at σ_min
    final = "zero" if variant == "bh2" else "sigma_min"
    ref = diffusers.UniPCMultistepScheduler(**KW, solver_order=order, solver_type=variant, final_sigmas_type=final,
                                            prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction_type])
    ref.set_timesteps(steps)
    ts = ref.timesteps  # its default "linspace" spacing; ldmkit takes any descending timesteps
    final_ab = 1.0 if final == "zero" else float(schedule.alphas_cumprod[0])
    ours = _ours(sample_unipc, model_fn, schedule, prediction_type, z_T, ts, order=order, variant=variant,
                 final_alpha_cumprod=final_ab)
    assert not ours[0].isnan().any() and _max_diff(ours, _theirs(ref, model_fn, z_T)) < 1e-4


def test_unipc_zero_terminal_snr_v_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("scaled_linear", rescale_zero_terminal_snr=True)
    abar = schedule.alphas_cumprod.clone()
    abar[-1] = 2.0**-24  # as diffusers (see the DPM-Solver test above)
    schedule = NoiseSchedule(betas=schedule.betas, alphas_cumprod=abar)
    model_fn, z_T = _parity_setup(schedule, "v")
    ts = make_timesteps(schedule, 20, "trailing")
    ref = diffusers.UniPCMultistepScheduler(**KW, timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                            prediction_type="v_prediction")
    ref.set_timesteps(20)
    assert torch.equal(ref.timesteps, ts)
    assert _max_diff(_ours(sample_unipc, model_fn, schedule, "v", z_T, ts), _theirs(ref, model_fn, z_T)) < 1e-4


@pytest.mark.parametrize("steps", [20, 8])
@pytest.mark.parametrize("name,spacing", [("dpmpp_2m", "karras"), ("dpmpp_2m", "exponential"), ("unipc", "karras"),
                                          ("unipc", "exponential")])
def test_sigma_spacings_match_diffusers(name, spacing, steps):
    """Karras / exponential σ spacing: the solver steps between the σ levels themselves while the
    network sees the interpolated timestep (rounded / truncated), as diffusers' use_*_sigmas."""
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("scaled_linear")
    model_fn, z_T = _parity_setup(schedule)
    cls = diffusers.DPMSolverMultistepScheduler if name == "dpmpp_2m" else diffusers.UniPCMultistepScheduler
    ref = cls(**KW, **{f"use_{spacing}_sigmas": True})
    ref.set_timesteps(steps)
    ts, abar = make_sigma_steps(schedule, steps, spacing)
    assert torch.equal(ref.timesteps, ts)
    assert torch.allclose((1 / abar - 1).sqrt().float(), ref.sigmas[:-1], rtol=1e-4)  # theirs from float32 ᾱ
    ours = _ours(get_sampler(name), model_fn, schedule, "eps", z_T, ts, alpha_bars=abar)
    assert _max_diff(ours, _theirs(ref, model_fn, z_T)) < 1e-4


def test_sigma_spacing_refusals():
    with pytest.raises(LdmkitError, match="karras, exponential"):
        make_sigma_steps(make_schedule("scaled_linear"), 10, "polyexponential")
    with pytest.raises(LdmkitError, match="zero-terminal-SNR"):
        make_sigma_steps(make_schedule("scaled_linear", rescale_zero_terminal_snr=True), 10)
    denoiser, _ = _denoiser()
    with pytest.raises(LdmkitError, match="alpha_bars"):
        sample_ddim(denoiser, torch.randn(2, 2), torch.tensor([500, 10]), alpha_bars=[0.5])


def test_euler_samplers_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("scaled_linear")
    model_fn, z_T = _parity_setup(schedule)
    ts = make_timesteps(schedule, 50, "leading", steps_offset=1)
    # "leading": init_noise_sigma = sqrt(σ_max² + 1), i.e. z_T / α_T, our change of variables exactly
    ref = diffusers.EulerDiscreteScheduler(**KW, timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(50)
    assert torch.equal(ref.timesteps.long(), ts)
    ours = _ours(sample_euler, model_fn, schedule, "eps", z_T, ts)
    assert _max_diff(ours, _theirs(ref, model_fn, z_T, ve=True)) < 1e-4
    ref = diffusers.EulerAncestralDiscreteScheduler(**KW, timestep_spacing="leading", steps_offset=1)
    ref.set_timesteps(50)
    ours = _ours(sample_euler_ancestral, model_fn, schedule, "eps", z_T, ts, generator=torch.Generator().manual_seed(3))
    theirs = _theirs(ref, model_fn, z_T, ve=True, generator=torch.Generator().manual_seed(3))
    assert _max_diff(ours, theirs) < 1e-4


def test_ddpm_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("scaled_linear")
    model_fn, z_T = _parity_setup(schedule)
    ts = make_timesteps(schedule, 50, "leading", steps_offset=1)
    ref = diffusers.DDPMScheduler(**KW, clip_sample=False, steps_offset=1)
    ref.set_timesteps(50)
    assert torch.equal(ref.timesteps, ts)
    ours = _ours(sample_ddpm, model_fn, schedule, "eps", z_T, ts, generator=torch.Generator().manual_seed(3))
    assert _max_diff(ours, _theirs(ref, model_fn, z_T, generator=torch.Generator().manual_seed(3))) < 1e-4


# --- classifier-free guidance -----------------------------------------------------------------


def _branches():
    calls = {"cond": 0, "uncond": 0}

    def cond(z, t):
        calls["cond"] += 1
        return 2.0 * z + 1.0

    def uncond(z, t):
        calls["uncond"] += 1
        return -z

    return cond, uncond, calls


def test_guidance_scales():
    cond, uncond, calls = _branches()
    z, t = torch.randn(3, 2, 4, 4), torch.tensor([1, 2, 3])
    assert classifier_free_guidance(cond, uncond, 1.0) is cond
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0)(z, t), cond(z, t))
    assert calls["uncond"] == 0
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.0)(z, t), uncond(z, t))
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 7.5)(z, t), -z + 7.5 * (3.0 * z + 1.0))


def test_guidance_rescale():
    cond, uncond, _ = _branches()
    z, t = torch.randn(3, 2, 4, 4), torch.tensor([1, 2, 3])
    full = classifier_free_guidance(cond, uncond, 5.0, rescale=1.0)(z, t)
    torch.testing.assert_close(full.flatten(1).std(1), cond(z, t).flatten(1).std(1))
    plain = classifier_free_guidance(cond, uncond, 5.0)(z, t)
    half = classifier_free_guidance(cond, uncond, 5.0, rescale=0.5)(z, t)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)


def test_batched_guidance_runs_one_doubled_batch():
    calls = []

    def model_fn(z, t, c):
        calls.append(z.shape[0])
        return z * c["scale"].view(-1, 1, 1, 1) + c["bias"].view(-1, 1, 1, 1)

    cond = {"scale": torch.full((3,), 2.0), "bias": torch.ones(3)}
    uncond = {"scale": torch.full((3,), -1.0), "bias": torch.zeros(3)}
    z, t = torch.randn(3, 2, 4, 4), torch.tensor([1, 2, 3])
    two_calls = classifier_free_guidance(lambda z, t: model_fn(z, t, cond), lambda z, t: model_fn(z, t, uncond), 4.0)
    expected = two_calls(z, t)
    calls.clear()
    torch.testing.assert_close(batched_classifier_free_guidance(model_fn, cond, uncond, 4.0)(z, t), expected)
    assert calls == [6]
    calls.clear()
    batched_classifier_free_guidance(model_fn, cond, uncond, 1.0)(z, t)
    assert calls == [3]


def test_batched_guidance_falls_back_when_conditions_differ_in_shape():
    calls = []

    def model_fn(z, t, context):
        calls.append(context.shape)
        return z + context.mean()

    cond, uncond = torch.ones(2, 7, 8), torch.zeros(2, 1, 8)  # different token counts
    z, t = torch.randn(2, 4), torch.tensor([5, 5])
    out = batched_classifier_free_guidance(model_fn, cond, uncond, 3.0)(z, t)
    torch.testing.assert_close(out, z + 3.0)
    assert len(calls) == 2
