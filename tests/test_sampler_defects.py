"""Issue 28, defects 1, 2 and 7: the lcm sampler's timesteps, UniPC of order 3 on a zero-terminal-SNR schedule,
and the cross-attention K/V cache's finaliser at interpreter exit. Each test failed before its fix."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_samplers import KW, _max_diff, _ours, _parity_setup, _theirs

from ldmkit.autoencoder import AutoencoderConfig
from ldmkit.diffusion import make_schedule, make_timesteps, sample_unipc
from ldmkit.diffusion.schedules import LCM_GRID_STEPS, lcm_timesteps, sampler_timesteps
from ldmkit.errors import LdmkitError
from ldmkit.generation.compat import sample as ldm_sample
from ldmkit.pipeline import DiffusionConfig, LatentDiffusion, LatentDiffusionConfig
from ldmkit.unet import UNetConfig

diffusers = pytest.importorskip("diffusers")


# --- 1. lcm: diffusers' LCMScheduler grid, whatever the model's own spacing ------------------------------


@pytest.mark.parametrize("grid", [LCM_GRID_STEPS, 40])
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)])
def test_lcm_timesteps_are_lcm_schedulers_for_any_model_spacing(spacing, offset, grid):
    schedule = make_schedule("scaled_linear")
    ref = diffusers.LCMScheduler(**KW, timestep_spacing=spacing, steps_offset=offset, original_inference_steps=grid)
    for steps in range(1, 9):
        ref.set_timesteps(steps)
        ts, levels = sampler_timesteps(schedule, "lcm", steps, spacing, offset, grid_steps=grid)
        assert levels is None and torch.equal(ts, ref.timesteps), (steps, ts, ref.timesteps)
    ref.set_timesteps(4)
    assert grid != 50 or ref.timesteps.tolist() == [999, 759, 499, 259]  # the numbers


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75, 0.99])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_img2img_timesteps_are_lcm_schedulers(steps, strength):
    """LCMScheduler.set_timesteps(n, strength=s) cuts the grid to its first int(N·s) points and takes all n steps
    from them (diffusers' LatentConsistencyModelImg2ImgPipeline runs them all)."""
    schedule = make_schedule("scaled_linear")
    ref = diffusers.LCMScheduler(**KW)
    ref.set_timesteps(steps, strength=strength)
    assert torch.equal(lcm_timesteps(schedule, steps, strength=strength), ref.timesteps)
    ts, _ = sampler_timesteps(schedule, "lcm", steps, "leading", 1, strength=strength)
    assert torch.equal(ts, ref.timesteps)


def test_lcm_timesteps_refusals():
    schedule = make_schedule("scaled_linear")
    assert lcm_timesteps(schedule, 4, strength=0.0).numel() == 0  # strength 0: nothing to run (encode-decode)
    with pytest.raises(LdmkitError, match="grid"):
        lcm_timesteps(schedule, 60)  # more steps than the 50-point grid holds
    with pytest.raises(LdmkitError, match="strength"):
        lcm_timesteps(schedule, 4, strength=0.05)  # 2 grid points left for 4 steps
    with pytest.raises(LdmkitError, match="grid_steps"):
        lcm_timesteps(schedule, 4, grid_steps=2000)


def test_other_samplers_keep_the_models_spacing_and_the_last_steps_of_img2img():
    schedule = make_schedule("scaled_linear")
    full = make_timesteps(schedule, 10, "leading", 1)
    assert torch.equal(sampler_timesteps(schedule, "ddim", 10, "leading", 1)[0], full)
    assert torch.equal(sampler_timesteps(schedule, "unipc", 10, "leading", 1, strength=0.6)[0], full[4:])
    ts, levels = sampler_timesteps(schedule, "dpmpp_2m", 10, "leading", 1, sigma_spacing="karras", strength=0.5)
    assert len(ts) == len(levels) == 5


def _sd_like_ldm(offset: int) -> LatentDiffusion:
    """A tiny unconditional model with SD 1.x's sampling convention ("leading", steps_offset)."""
    ae = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), norm_groups=4)
    unet = UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1,), num_res_blocks=1,
                      attention_levels=(), num_heads=2, norm_groups=4, zero_init=False)
    diffusion = DiffusionConfig(prediction_type="eps", timestep_spacing="leading", steps_offset=offset)
    torch.manual_seed(0)
    return LatentDiffusion.from_config(LatentDiffusionConfig(autoencoder=ae, unet=unet, diffusion=diffusion, image_size=8)).eval()


def test_lcm_in_the_pipeline_runs_lcm_schedulers_timesteps_and_one_step_is_not_the_noise():
    ldm = _sd_like_ldm(offset=0)
    noise = torch.randn((1, *ldm.latent_shape), generator=torch.Generator().manual_seed(0))
    seen = []
    one = ldm_sample(ldm, num_samples=1, steps=1, sampler="lcm", seed=0, return_latents=True,
                     callback=lambda i, t, x, x0: seen.append(t))
    assert seen == [999]  # LCMScheduler(…).set_timesteps(1); "leading" with offset 0 gave t = 0, the identity
    assert (one - noise).abs().max() > 0.1
    ldm = _sd_like_ldm(offset=1)
    for kw, want in [({}, [999, 759, 499, 259]), ({"grid_steps": 40}, [999, 749, 499, 249])]:
        seen.clear()
        ldm_sample(ldm, num_samples=1, steps=4, sampler="lcm", seed=0, return_latents=True,
                   callback=lambda i, t, x, x0: seen.append(t), **kw)
        assert seen == want, kw
    # img2img: all 4 steps from the grid cut at the strength, as LCMScheduler.set_timesteps(4, strength=0.5)
    seen.clear()
    image = torch.zeros(1, 3, 8, 8)
    ldm_sample(ldm, num_samples=1, steps=4, sampler="lcm", seed=0, init_image=image, strength=0.5,
               callback=lambda i, t, x, x0: seen.append(t))
    assert seen == [499, 379, 259, 139]
    seen.clear()
    ldm_sample(ldm, num_samples=1, steps=4, sampler="ddim", seed=0, init_image=image, strength=0.5,
               callback=lambda i, t, x, x0: seen.append(t))
    assert seen == [251, 1]  # other samplers: the last round(strength·steps) of the model's spacing, unchanged


# --- 2. UniPC order 3 on a zero-terminal-SNR schedule -------------------------------------------------------


@pytest.mark.parametrize("steps", [20, 6])
@pytest.mark.parametrize("order", [3, 2])
def test_unipc_zero_terminal_snr_is_finite_and_matches_diffusers(order, steps):
    """ᾱ_T = 0 puts λ = −∞ in UniPC's history; diffusers replaces ᾱ_T by 2⁻²⁴ when it rescales to zero terminal
    SNR, and ldmkit's UniPC does the same (on the schedule ldmkit holds, with ᾱ_T = 0 exactly)."""
    schedule = make_schedule("scaled_linear", rescale_zero_terminal_snr=True)
    assert float(schedule.alphas_cumprod[-1]) == 0.0
    model_fn, z_T = _parity_setup(schedule, "v")
    ts = make_timesteps(schedule, steps, "trailing")
    ours = _ours(sample_unipc, model_fn, schedule, "v", z_T, ts, order=order)
    assert all(torch.isfinite(x).all() for x in [ours[0], *ours[1]])
    ref = diffusers.UniPCMultistepScheduler(**KW, timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                            prediction_type="v_prediction", solver_order=order)
    ref.set_timesteps(steps)
    assert torch.equal(ref.timesteps, ts)
    assert _max_diff(ours, _theirs(ref, model_fn, z_T)) < 1e-4


# --- 7. the K/V cache's finaliser at interpreter exit -------------------------------------------------------


def test_cached_context_kv_leaves_nothing_on_stderr_at_exit(tmp_path):
    """A program that sampled with cached text K/V and exits with the model and context still alive: the weak
    reference's callback runs during interpreter shutdown, after torch's module globals are gone."""
    program = textwrap.dedent("""
        import torch
        from ldmkit.layers.attention import Attention
        from ldmkit.unet import UNet, UNetConfig

        layers = [Attention(8, context_dim=6, heads=2, head_dim=4) for _ in range(3)]
        unet = UNet(UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2),
                               num_res_blocks=1, attention_levels=(1,), num_heads=2, norm_groups=4, context_dim=6))
        context = torch.randn(1, 5, 6)
        with torch.no_grad():
            for a in layers:
                a(torch.randn(1, 4, 8), context)
            unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), context=context)
        assert all(a._kv_cache is not None for a in layers)
        print("ok")
    """)
    src = Path(__file__).resolve().parents[1] / "src"
    env = {"PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=120,
                         check=False)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    assert run.stderr == ""


def test_the_kv_cache_still_drops_when_its_context_is_freed():
    from ldmkit.layers.attention import Attention

    a = Attention(8, context_dim=6, heads=2, head_dim=4)
    context = torch.randn(1, 5, 6)
    with torch.no_grad():
        a(torch.randn(1, 4, 8), context)
    assert a._kv_cache is not None
    del context
    assert a._kv_cache is None
