"""Checkpoints written before the package layout changed (tests/data/legacy, made by make_legacy.py with
ldmkit at commit 38cf851) still load, and the loaded modules reproduce that code's outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ldmkit
from ldmkit.autoencoder import AutoencoderKL
from ldmkit.conditioning import Cond
from ldmkit.control import Adapter, ControlNet, controlled_unet
from ldmkit.pipeline import LatentDiffusion

LEGACY = Path(__file__).parent / "data" / "legacy"


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(LEGACY / "expected.safetensors"))


def test_autoencoder_and_diffusion_model(expected):
    ae, ldm = ldmkit.load(LEGACY / "autoencoder"), ldmkit.load(LEGACY / "diffusion")
    assert isinstance(ae, AutoencoderKL) and isinstance(ldm, LatentDiffusion)
    assert ldm.config.concat.kind == "lowres" and ae.config.scaling_factor == 0.9
    e = expected
    with torch.no_grad():
        torch.testing.assert_close(ae.decode(ae.encode(e["x"]).mean), e["rec"], atol=1e-5, rtol=0)
        eps = ldm.unet(e["z"], e["t"], Cond(labels=e["labels"], concat=e["concat"]))
    torch.testing.assert_close(eps, e["eps"], atol=1e-5, rtol=0)


def test_controlnet_and_adapter(expected):
    base, net, adapter = (ldmkit.load(LEGACY / n) for n in ("base", "controlnet", "adapter"))
    assert isinstance(net, ControlNet) and isinstance(adapter, Adapter)
    e = expected
    cond = Cond(labels=e["labels"], control=e["hint"])
    with torch.no_grad():
        torch.testing.assert_close(controlled_unet(base.unet, net)(e["z"], e["t"], cond), e["controlled"], atol=1e-5, rtol=0)
        torch.testing.assert_close(controlled_unet(base.unet, adapter)(e["z"], e["t"], cond), e["adapted"], atol=1e-5, rtol=0)
