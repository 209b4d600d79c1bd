"""Parameterisations (eps / v / x0) and the training objective."""

import pytest
import torch

from ldmkit.diffusion import (
    DiffusionObjective,
    canonical_prediction_type,
    expand_like,
    make_schedule,
    q_sample,
    target,
    to_x0_eps,
    v_target,
)
from ldmkit.errors import LdmkitError

SCHEDULE = make_schedule("scaled_linear")


def _batch(seed=0, shape=(6, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    alpha, sigma = expand_like(SCHEDULE.alpha(t), x0), expand_like(SCHEDULE.sigma(t), x0)
    return x0, noise, q_sample(SCHEDULE, x0, t, noise), alpha, sigma


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_round_trip(kind):
    x0, noise, z, alpha, sigma = _batch()
    pred = target(kind, x0, noise, z, alpha, sigma)
    x0_hat, eps_hat = to_x0_eps(kind, pred, z, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_hat, noise, rtol=0, atol=1e-9)


def test_v_closed_form_and_aliases():
    x0, noise, z, alpha, sigma = _batch()
    v = target("v", x0, noise, z, alpha, sigma)
    torch.testing.assert_close(v, alpha * noise - sigma * x0)
    torch.testing.assert_close(v, v_target(x0, noise, alpha, sigma))
    torch.testing.assert_close(alpha * z - sigma * v, x0)  # Salimans & Ho: x0 = α z - σ v
    assert [canonical_prediction_type(n) for n in ("epsilon", "v_prediction", "sample")] == ["eps", "v", "x0"]
    with pytest.raises(LdmkitError, match="eps, v, x0"):
        canonical_prediction_type("score")


def _perfect_model(objective, x0):
    """Returns the exact target: ε is recovered from z_t and the known x0."""

    def model_fn(z, t):
        alpha, sigma = expand_like(objective.schedule.alpha(t), z), expand_like(objective.schedule.sigma(t), z)
        noise = (z - alpha * x0) / sigma
        return target(objective.prediction_type, x0, noise, z, alpha, sigma)

    return model_fn


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
def test_perfect_model_has_zero_loss(kind, weighting):
    objective = DiffusionObjective(SCHEDULE, kind, weighting, offset_noise=0.1)
    x0 = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    loss = objective(_perfect_model(objective, x0), x0, generator=torch.Generator().manual_seed(1))
    assert loss.ndim == 0 and float(loss) < 1e-8


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_min_snr_weights_closed_form(kind):
    gamma = 5.0
    objective = DiffusionObjective(SCHEDULE, kind, "min_snr", min_snr_gamma=gamma)
    t = torch.arange(1000)
    snr = SCHEDULE.alphas_cumprod / (1 - SCHEDULE.alphas_cumprod)
    expected = {
        "eps": torch.minimum(snr, torch.tensor(gamma)) / snr,
        "v": torch.minimum(snr, torch.tensor(gamma)) / (snr + 1),
        "x0": torch.minimum(snr, torch.tensor(gamma)),
    }[kind]
    torch.testing.assert_close(objective.weights(t), expected)
    assert bool((DiffusionObjective(SCHEDULE, kind).weights(t) == 1).all())


def test_min_snr_weights_finite_at_zero_terminal_snr():
    zsnr = make_schedule("scaled_linear", rescale_zero_terminal_snr=True)
    t = torch.tensor([998, 999])
    for kind in ("eps", "v", "x0"):
        w = DiffusionObjective(zsnr, kind, "min_snr").weights(t)
        assert bool(torch.isfinite(w).all())
    assert float(DiffusionObjective(zsnr, "eps", "min_snr").weights(t)[1]) == 1.0


def test_loss_is_finite_and_gradient_flows():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(4, 4, 3, padding=1)
    objective = DiffusionObjective(SCHEDULE, "v", "min_snr", offset_noise=0.05)
    x0 = torch.randn(8, 4, 8, 8)
    loss = objective(lambda z, t, scale: net(z) * scale, x0, generator=torch.Generator().manual_seed(0), scale=2.0)
    assert torch.isfinite(loss)
    loss.backward()
    assert net.weight.grad is not None and float(net.weight.grad.abs().sum()) > 0


def test_terms_and_reproducibility():
    objective = DiffusionObjective(SCHEDULE, "eps", "min_snr")
    x0 = torch.randn(32, 2, 4, 4)
    model_fn = lambda z, t: torch.zeros_like(z)  # noqa: E731  loss = weighted E[ε²]
    terms = objective.terms(model_fn, x0, generator=torch.Generator().manual_seed(3))
    assert terms.loss.shape == terms.t.shape == terms.weight.shape == (32,)
    assert terms.t.dtype == torch.int64 and 0 <= int(terms.t.min()) and int(terms.t.max()) < 1000
    torch.testing.assert_close(terms.weight, objective.weights(terms.t).float())
    again = objective(model_fn, x0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, terms.loss.mean())


def test_offset_noise_shifts_each_channel():
    x0 = torch.zeros(2000, 3, 8, 8)
    plain = DiffusionObjective(SCHEDULE).sample_noise(x0, torch.Generator().manual_seed(0))
    offset = DiffusionObjective(SCHEDULE, offset_noise=1.0).sample_noise(x0, torch.Generator().manual_seed(0))
    # the spatial mean of a channel has variance 1/64 without offset, 1/64 + 1 with it
    assert float(plain.mean(dim=(2, 3)).var()) == pytest.approx(1 / 64, rel=0.1)
    assert float(offset.mean(dim=(2, 3)).var()) == pytest.approx(1 + 1 / 64, rel=0.1)


def test_bad_settings():
    with pytest.raises(LdmkitError, match="uniform, min_snr"):
        DiffusionObjective(SCHEDULE, weighting="p2")
    with pytest.raises(LdmkitError, match="min_snr_gamma"):
        DiffusionObjective(SCHEDULE, weighting="min_snr", min_snr_gamma=0)
    with pytest.raises(LdmkitError, match="eps, v, x0"):
        DiffusionObjective(SCHEDULE, prediction_type="flow")
