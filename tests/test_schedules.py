"""Noise schedules and sampling timesteps: closed forms, and equality with diffusers' schedulers."""

import math

import pytest
import torch

from ldmkit.diffusion import NoiseSchedule, expand_like, make_schedule, make_timesteps, q_sample
from ldmkit.errors import LdmkitError

# (ldmkit kind, diffusers beta_schedule, beta_start, beta_end)
KINDS = [
    ("linear", "linear", 1e-4, 0.02),
    ("scaled_linear", "scaled_linear", 0.00085, 0.012),
    ("cosine", "squaredcos_cap_v2", 0.00085, 0.012),
]


def test_closed_forms():
    s = make_schedule("linear", beta_start=1e-4, beta_end=0.02)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    abar = torch.tensor([math.prod(1 - b for b in betas[: i + 1]) for i in (0, 10, 500, 999)], dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(s.betas, torch.tensor(betas, dtype=torch.float64))
    torch.testing.assert_close(s.alpha_bar(t), abar)
    torch.testing.assert_close(s.alpha(t), abar.sqrt())
    torch.testing.assert_close(s.sigma(t), (1 - abar).sqrt())
    torch.testing.assert_close(s.snr(t), abar / (1 - abar))
    torch.testing.assert_close(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones(4, dtype=torch.float64))
    assert s.num_timesteps == 1000
    assert bool((s.snr(torch.arange(1000)).diff() < 0).all())


def test_scaled_linear_and_cosine_closed_forms():
    s = make_schedule("scaled_linear", num_timesteps=10, beta_start=0.01, beta_end=0.04)
    torch.testing.assert_close(s.betas, torch.linspace(0.1, 0.2, 10, dtype=torch.float64) ** 2)
    c = make_schedule("cosine")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  Nichol & Dhariwal eq. 17
    for t in (0, 300, 900):
        assert float(c.alphas_cumprod[t]) == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert float(c.betas.max()) <= 0.999


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("kind,diffusers_kind,beta_start,beta_end", KINDS)
def test_matches_diffusers(kind, diffusers_kind, beta_start, beta_end, rescale):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(
        beta_schedule=diffusers_kind, beta_start=beta_start, beta_end=beta_end, rescale_betas_zero_snr=rescale
    )
    s = make_schedule(kind, beta_start=beta_start, beta_end=beta_end, rescale_zero_terminal_snr=rescale)
    # diffusers works in float32, ldmkit in float64
    torch.testing.assert_close(s.betas.float(), ref.betas, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(kind):
    plain = make_schedule(kind)
    s = make_schedule(kind, rescale_zero_terminal_snr=True)
    t = torch.arange(s.num_timesteps)
    assert float(s.alphas_cumprod[-1]) == 0.0
    assert float(s.snr(torch.tensor(999))) == 0.0
    assert bool((s.snr(t).diff() < 0).all())
    assert float(s.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-12)


def test_q_sample_and_expand_like():
    s = make_schedule("scaled_linear")
    x0 = torch.randn(3, 2, 4, 4)
    noise = torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    z = q_sample(s, x0, t, noise)
    for b in range(3):
        a, sg = float(s.alpha(t[b])), float(s.sigma(t[b]))
        torch.testing.assert_close(z[b], a * x0[b] + sg * noise[b])
    v = expand_like(s.alpha(t), x0.half())
    assert v.shape == (3, 1, 1, 1) and v.dtype == torch.float16
    assert s.alpha(torch.tensor(5)).shape == ()


def test_from_betas_rejects_bad_input():
    with pytest.raises(LdmkitError):
        NoiseSchedule.from_betas(torch.tensor([0.1, 1.5]))


def test_unknown_names_list_the_choices():
    with pytest.raises(LdmkitError, match="linear, scaled_linear, cosine"):
        make_schedule("quadratic")
    with pytest.raises(LdmkitError, match="leading, trailing, linspace"):
        make_timesteps(make_schedule("linear"), 10, spacing="uniform")
    with pytest.raises(LdmkitError, match="between 1 and 1000"):
        make_timesteps(make_schedule("linear"), 0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers_ddim(spacing):
    diffusers = pytest.importorskip("diffusers")
    s = make_schedule("scaled_linear")
    for offset in (0, 1):
        ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        for n in [*range(1, 80), 100, 103, 250, 500, 999]:
            ours = make_timesteps(s, n, spacing, steps_offset=offset)
            ref.set_timesteps(n)
            assert ours.dtype == torch.int64 and len(ours) == n
            assert bool((ours.diff() < 0).all())
            # diffusers' "trailing" sometimes returns n + 1 values, the extra one being -1 (n = 61, 103, …)
            assert torch.equal(ours, ref.timesteps[:n]), (spacing, offset, n)
            assert len(ref.timesteps) == n or ref.timesteps[n:].tolist() == [-1]


def test_trailing_starts_at_last_timestep():
    s = make_schedule("scaled_linear", rescale_zero_terminal_snr=True)
    assert make_timesteps(s, 25, "trailing")[0] == 999
    assert make_timesteps(s, 50, "leading", steps_offset=1).tolist()[:2] == [981, 961]
    with pytest.raises(LdmkitError, match="steps_offset"):
        make_timesteps(s, 1000, "leading", steps_offset=1)
