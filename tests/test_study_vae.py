"""`ldmkit study vae` at a tiny budget, and the latent-space probes it uses, against values known
without the code (straight lines, Gaussian and uniform moments, the Laplacian of a ramp)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from ldmkit.evaluate.latent_probes import (channel_correlation, excess_kurtosis, interpolation_roughness,
                                           laplacian_energy, path_ratio, sharpness)
from ldmkit.study.common import VERDICTS


def test_path_ratio_is_one_on_a_straight_line_and_the_detour_length_otherwise():
    a, b = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    s = torch.linspace(0, 1, 9)[:, None, None, None]
    assert path_ratio((1 - s) * a + s * b) == pytest.approx(1.0, abs=1e-6)
    # A → C → B with C off the line: the two legs of a right isosceles triangle over its hypotenuse = √2
    frames = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]).reshape(3, 2)
    # legs |(1,0)| + |(0,1)| = 2, direct |(1,1)| = √2
    assert path_ratio(frames) == pytest.approx(2 / math.sqrt(2), rel=1e-6)


class _Identity(torch.nn.Module):
    """An 'autoencoder' whose latent is the image itself: decoded straight lines stay straight."""

    class _Post:
        def __init__(self, x):
            self.mean = x

    def encode(self, x):
        return self._Post(x)

    def decode(self, z):
        return z


def test_interpolation_roughness_of_an_identity_codec_is_one():
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    assert interpolation_roughness(_Identity(), x, pairs=4, steps=7) == pytest.approx(1.0, abs=1e-5)


def test_excess_kurtosis_of_gaussian_and_uniform_samples():
    g = torch.Generator().manual_seed(0)
    assert excess_kurtosis(torch.randn(400_000, generator=g)) == pytest.approx(0.0, abs=0.03)
    assert excess_kurtosis(torch.rand(400_000, generator=g)) == pytest.approx(-1.2, abs=0.02)  # −6/5 for U(0, 1)


def test_channel_correlation_of_copies_and_of_independent_channels():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 1, 8, 8, generator=g)
    assert channel_correlation(torch.cat([a, -2 * a + 1], 1)) == pytest.approx(1.0, abs=1e-9)
    assert channel_correlation(torch.randn(256, 4, 8, 8, generator=g)) < 0.02


def test_laplacian_of_a_ramp_is_zero_and_blur_lowers_sharpness():
    ramp = torch.linspace(-1, 1, 16).expand(2, 3, 16, 16)  # linear in x: ∇² = 0
    assert laplacian_energy(ramp).abs().max().item() < 1e-10
    # a single bright pixel: 5-point Laplacian values −4 at it and 1 at 4 neighbours → mean of squares 20 / 14²
    dot = torch.zeros(1, 1, 16, 16)
    dot[0, 0, 8, 8] = 1.0
    assert laplacian_energy(dot).item() == pytest.approx(20 / 14**2)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    blurred = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    assert sharpness(x, x) == pytest.approx(1.0)
    assert sharpness(blurred, x) < 0.5


@pytest.mark.slow
def test_study_vae_reports_every_claim_with_a_verdict_and_its_figures(tmp_path):
    from ldmkit.study import run_study

    torch.set_num_threads(1)
    report = run_study("vae", tmp_path, budget=0.02, seeds=2, progress=False)
    text = report.read_text()
    verdicts = json.loads((tmp_path / "verdicts.json").read_text())
    claims = verdicts["claims"]
    assert len(claims) == 5
    for c in claims:
        assert c["verdict"] in VERDICTS
        assert re.search(r"\d+\.\d+ ± (\d+\.\d+|n/a)", c["measurement"]), c  # figures with their interval
        assert c["claim"] in text and f"**{c['verdict']}**" in text
    for key in ("KL term gives a smoother", "costs little reconstruction", "second stage learns better",
                "adversarial", "f = 8 against f = 4"):
        assert any(key in c["claim"] for c in claims), key
    assert "ldmkit train-autoencoder --config shapes" in text and "ldmkit train --config shapes-class" in text
    assert "--config faces" in text and "plain AE" in text and "latent scale" in text
    for png in ("reconstruction_vs_second_stage.png", "shapes_f4_images.png"):
        assert (tmp_path / png).stat().st_size > 0 and png in text
    # a rerun reuses every run and measurement and states the same verdicts
    again = run_study("vae", tmp_path, budget=0.02, seeds=2, progress=False)
    assert [c["verdict"] for c in json.loads((again.parent / "verdicts.json").read_text())["claims"]] == \
        [c["verdict"] for c in claims]
