"""The layered architecture (pyproject's [tool.importlinter] contracts) holds: imports run one way, so an
import circle or a model module that reaches into training cannot come back unnoticed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    pytest.importorskip("importlinter")
    res = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                          "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "4 kept, 0 broken" in res.stdout


def test_loading_a_native_checkpoint_imports_no_interop_module(tmp_path):
    """`ldmkit.load` reads an ldmkit folder with the native loader alone: the conversion modules (and
    diffusers) stay unimported."""
    code = (
        "import sys, torch, ldmkit\n"
        "from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL\n"
        "from ldmkit.checkpoint import save_checkpoint\n"
        "cfg = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), norm_groups=4)\n"
        f"save_checkpoint({str(tmp_path)!r}, 1, 'autoencoder', AutoencoderKL(cfg), cfg)\n"
        f"m = ldmkit.load({str(tmp_path)!r})\n"
        "assert type(m).__name__ == 'AutoencoderKL'\n"
        "bad = sorted(k for k in sys.modules if k.startswith(('ldmkit.interop', 'ldmkit.train', 'diffusers')))\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_config_literals_match_the_registries():
    """Typed config fields are checked at load (Literal); their choices are the registries' keys, so a new
    sampler or schedule cannot be added to one and forgotten in the other."""
    from typing import get_args

    from ldmkit.diffusion.config import DiffusionConfig
    from ldmkit.diffusion.objective import WEIGHTINGS
    from ldmkit.diffusion.parameterization import PREDICTION_TYPES
    from ldmkit.diffusion.samplers import SAMPLERS
    from ldmkit.diffusion.schedules import SCHEDULE_KINDS, TIMESTEP_SPACINGS
    from ldmkit.train.config import SampleConfig

    def choices(model, field):
        return set(get_args(model.model_fields[field].annotation))

    assert choices(SampleConfig, "sampler") == set(SAMPLERS)
    assert choices(DiffusionConfig, "schedule") == set(SCHEDULE_KINDS)
    assert choices(DiffusionConfig, "prediction_type") == set(PREDICTION_TYPES)
    assert choices(DiffusionConfig, "weighting") == set(WEIGHTINGS)
    assert choices(DiffusionConfig, "timestep_spacing") == set(TIMESTEP_SPACINGS)
    assert DiffusionConfig(prediction_type="v_prediction").prediction_type == "v"  # diffusers' names still read
    with pytest.raises(ValueError, match="schedule"):
        DiffusionConfig(schedule="quadratic")  # refused when the config is read, not deep inside training
