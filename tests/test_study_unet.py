"""`ldmkit study unet`: the U-Net ablation study runs end to end at a tiny budget and states every
claim with a verdict and its figures; its measures are checked against known answers."""

import json

import numpy as np
import pytest
import torch

from ldmkit.study.unet import excess, layout, spikes


def _image(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]


def test_layout_is_true_for_every_training_image_and_false_for_what_no_training_image_shows():
    from ldmkit.data import build_dataset

    data = build_dataset("shapes", 32, "val", length=144)  # every combination twice, with jitter
    assert all(layout(data[i]["image"]) == {"one_object": True, "placed": True} for i in range(len(data)))

    black = np.zeros((32, 32, 3), np.uint8)
    assert layout(_image(black)) == {"one_object": False, "placed": False}
    two = black.copy()
    two[4:12, 4:12] = (230, 40, 40)  # two squares, each at a quadrant centre
    two[20:28, 20:28] = (40, 200, 60)
    assert layout(_image(two)) == {"one_object": False, "placed": True}
    middle = black.copy()
    middle[12:20, 12:20] = (230, 40, 40)  # one square at the image centre: 0.35 of the side from every quadrant centre
    assert layout(_image(middle)) == {"one_object": True, "placed": False}
    speck = middle.copy()
    speck[0, 31] = (230, 40, 40)  # one pixel: below MIN_PIXELS, not an object
    assert layout(_image(speck))["one_object"]


def test_spikes_counts_only_jumps_above_the_running_median():
    flat = [1.0 + 0.1 * (i % 3) for i in range(30)]
    assert spikes(flat) == 0
    jump = flat[:20] + [5.0] + flat[21:]
    assert spikes(jump) == 1
    assert spikes(jump, skip=21) == 0  # within warm-up: not counted
    assert spikes([1.0] * 12 + [2.9]) == 0 and spikes([1.0] * 12 + [3.1]) == 1


def test_excess_is_relative_to_the_reference_mean_per_timestep():
    ref = [[1.0, 2.0], [3.0, 6.0]]  # means 2 and 4
    assert excess([[2.0, 4.0], [3.0, 2.0]], ref) == [[0.0, 0.0], [0.5, -0.5]]


def test_heldout_error_by_timestep_of_a_zero_predictor_is_one_at_every_t(zero_predictor):
    """ε̂ = 0 gives E‖ε‖² = 1 per element at every noise level; the per-t figures average to the total."""
    from ldmkit.autoencoder.model import AutoencoderConfig
    from ldmkit.conditioning.conditioner import Conditioner, ConditionerConfig
    from ldmkit.data import build_dataset
    from ldmkit.data.tensors import materialize
    from ldmkit.diffusion.config import DiffusionConfig
    from ldmkit.evaluate.diffusion import heldout_error
    from ldmkit.pipeline import LatentDiffusion, LatentDiffusionConfig
    from ldmkit.unet import UNetConfig

    cond = ConditionerConfig(num_classes=18)
    cfg = LatentDiffusionConfig(
        autoencoder=AutoencoderConfig(base_channels=8, channel_mult=(1, 2, 2), norm_groups=4),
        unet=UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                        norm_groups=4, num_classes=18),
        conditioner=cond, diffusion=DiffusionConfig(prediction_type="eps"), image_size=16)
    ldm = LatentDiffusion.from_config(cfg, conditioner=Conditioner(cond)).eval()
    ldm.unet = zero_predictor
    data = materialize(build_dataset("shapes", 16, "val", length=64), progress=False)
    res = heldout_error(ldm, data, timesteps=(25, 500, 950, 5000))  # 5000 is past the schedule: dropped
    assert res["t"] == [25, 500, 950] and len(res["eps_mse_t"]) == len(res["eps_mse_null_t"]) == 3
    assert all(abs(v - 1) < 0.04 for v in res["eps_mse_t"])  # 64 images × 64 latent values: std ≈ 0.012
    assert abs(sum(res["eps_mse_t"]) / 3 - res["eps_mse"]) < 1e-9 and res["gain"] == 1.0


@pytest.mark.slow
def test_study_unet_states_every_claim_with_a_verdict_and_its_figures(tmp_path):
    from ldmkit.cli import main
    from ldmkit.study.common import VERDICTS
    from ldmkit.study.unet import ARMS

    torch.set_num_threads(1)
    out = tmp_path / "unet"
    assert main(["--threads", "1", "study", "unet", "--out", str(out), "--budget", "0.02", "--seeds", "2", "--quiet"]) == 0
    verdicts = json.loads((out / "verdicts.json").read_text())
    report = (out / "report.md").read_text()
    claims = verdicts["claims"]
    assert verdicts["study"] == "unet" and verdicts["seeds"] == 2 and len(claims) == 6
    for c in claims:
        assert c["verdict"] in VERDICTS and c["why"]
        assert any(ch.isdigit() for ch in c["measurement"]) and "±" in c["measurement"]  # the figures, with intervals
        assert c["claim"] in report and f"**{c['verdict']}**" in report
    for arm in ARMS:  # every arm's row, and the commands that trained it
        assert f"| {arm} |" in report
        assert f"runs/{arm}-s1" in report
    assert "ldmkit train --config shapes-class" in report and "ldmkit train-autoencoder --config shapes" in report
    for png in ("heldout_by_t.png", "loss.png", "samples.png"):
        assert (out / png).is_file() and f"]({png})" in report
