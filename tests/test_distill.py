"""`ldmkit distill` (latent consistency distillation) and the `lcm` sampler, on tiny configs.

The sampler is pinned to diffusers' `LCMScheduler` step for step; the distillation runs end to end through
the CLI: a tiny teacher → a few steps → a checkpoint that loads, samples at 1/2/4 steps by its own
defaults, converts, and resumes bit for bit."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import ldmkit
from ldmkit.errors import LdmkitError
from ldmkit.cli import main
from ldmkit.diffusion import Denoiser, consistency_scalings, make_schedule, make_timesteps, sample_lcm
from ldmkit.train.distill import skipping_grid
from ldmkit.generation.compat import sample as ldm_sample


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model_fn(schedule):
    """A smooth, nonlinear stand-in for a network: depends on z and t."""

    def model_fn(z, t):
        s = (t.float() / schedule.num_timesteps).view(-1, *([1] * (z.ndim - 1)))
        return torch.tanh(0.7 * z + s) * (1 - 0.3 * s) - 0.1 * z.roll(1, -1)

    return model_fn


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_sampler_matches_diffusers_lcm_scheduler(prediction_type, steps):
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("scaled_linear")
    ref = diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                 prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction_type])
    ref.set_timesteps(steps)
    fn = _model_fn(schedule)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # diffusers, step by step, its noise from one generator
    x, g = z.clone(), torch.Generator().manual_seed(1)
    want = []
    for t in ref.timesteps:
        out = ref.step(fn(x, t.repeat(x.shape[0])), t, x, generator=g)
        x = out.prev_sample
        want.append(x)
    got = []
    ours = sample_lcm(Denoiser(fn, schedule, prediction_type), z.clone(), ref.timesteps,
                      generator=torch.Generator().manual_seed(1), callback=lambda i, t, x, x0: got.append(x))
    assert len(got) == len(want) == steps
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # diffusers keeps ᾱ in float32
    torch.testing.assert_close(ours, want[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_recovers_gaussian_data_from_the_exact_consistency_function(steps):
    """For data x0 ~ N(μ, s²) the PF-ODE maps z_t to x0 = μ + s (z_t − α μ) / sqrt(α² s² + σ²): the exact
    consistency function. LCM sampling with it draws the data distribution at any number of steps (on a
    zero-terminal-SNR schedule, so that z_T ~ N(0, I) is exactly the last marginal)."""
    schedule = make_schedule("cosine", rescale_zero_terminal_snr=True)
    mu, std = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.2])

    def model_fn(z, t):  # "x0" prediction; the boundary scalings make f ≈ x̂0 from t = 1 on
        a, s = schedule.alpha(t).float()[:, None], schedule.sigma(t).float()[:, None]
        return mu + std * (z - a * mu) / (a * a * std**2 + s * s).sqrt()

    g = torch.Generator().manual_seed(0)
    z_T = torch.randn(20_000, 2, generator=g)
    x0 = sample_lcm(Denoiser(model_fn, schedule, "x0"), z_T, make_timesteps(schedule, steps, "trailing"), generator=g)
    assert (x0.mean(0) - mu).abs().max() < 0.02
    assert ((x0.std(0) / std) - 1).abs().max() < 0.03


def test_trailing_timesteps_are_the_lcm_schedule_on_the_distillation_grid():
    """The student is sampled at the model's `trailing` timesteps; with the default grid (N = 40) they are the
    timesteps diffusers' LCMScheduler picks for original_inference_steps = 40, and all lie on the grid."""
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("scaled_linear")
    grid, prev = skipping_grid(1000, 40)
    assert grid[0] == 24 and grid[-1] == 999 and prev[0] == 0 and torch.equal(prev[1:], grid[:-1])
    ref = diffusers.LCMScheduler(original_inference_steps=40)
    for steps in (1, 2, 4, 5, 8, 10):
        ts = make_timesteps(schedule, steps, "trailing")
        ref.set_timesteps(steps)
        assert torch.equal(ts, ref.timesteps), steps
        assert set(ts.tolist()) <= set(grid.tolist())


def test_consistency_boundary_condition():
    """f(z, t) = c_skip z + c_out x̂0 is the identity at the smallest timestep and ≈ x̂0 from the first grid point
    on (LCM eq. 9; diffusers' scalings)."""
    diffusers = pytest.importorskip("diffusers")
    c_skip, c_out = consistency_scalings(0)
    assert (c_skip, c_out) == (1.0, 0.0)
    c_skip, c_out = consistency_scalings(torch.tensor([0.0, 24.0, 999.0]))
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[1] < 1e-4 and c_out[1] > 0.9999
    ref = diffusers.LCMScheduler()
    for t in (0, 1, 19, 500, 999):
        assert consistency_scalings(t) == pytest.approx(ref.get_scalings_for_boundary_condition_discrete(t), rel=1e-12)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    assert main(["train-autoencoder", "--config", "tiny", "--quiet", "--out", str(root / "ae")]) == 0
    # mid-block attention: a U-Net diffusers has an equivalent of, so the student converts
    assert main(["train", "--config", "tiny", "--autoencoder", str(root / "ae"), "--set", "unet.mid_attention=true",
                 "--quiet", "--out", str(root / "ldm")]) == 0
    return root


def test_distill_writes_a_checkpoint_that_samples_converts_and_resumes_exactly(teacher, tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    out = tmp_path / "student"
    args = ["distill", "--config", "tiny", "--teacher", str(teacher / "ldm"), "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    ckpt = out / "checkpoints" / "step_00000006"
    doc = json.loads((ckpt / "config.json").read_text())
    assert doc["kind"] == "latent_diffusion"
    assert doc["meta"]["sampling"] == {"sampler": "lcm", "steps": 4, "guidance": 1.0, "grid_steps": 40}
    assert doc["meta"]["distillation"]["method"] == "lcm" and doc["meta"]["dataset"] == "shapes"
    # the student moved away from the teacher; the first stage is the teacher's
    student, ours = load_file(ckpt / "model.safetensors"), ldmkit.load(teacher / "ldm").state_dict()
    assert student.keys() == ours.keys()
    assert any(not torch.equal(v, ours[k]) for k, v in student.items() if k.startswith("unet."))
    assert all(torch.equal(v, ours[k]) for k, v in student.items() if k.startswith("autoencoder."))
    ldm = ldmkit.load(out)
    assert type(ldm).__name__ == "LatentDiffusion"
    capsys.readouterr()

    # what the user leaves out comes from the checkpoint (a distilled one), else from the command's defaults
    from ldmkit.cli import _fill_sampling_defaults, build_parser

    for ckpt_dir, given, want in [(out, [], ("lcm", 4, 1.0)), (out, ["--steps", "2"], ("lcm", 2, 1.0)),
                                  (teacher / "ldm", [], ("dpmpp_2m", 25, 1.0))]:
        a = build_parser().parse_args(["sample", "--checkpoint", str(ckpt_dir), "--out", "x", *given])
        _fill_sampling_defaults(a, a.checkpoint)
        assert (a.sampler, a.steps, a.guidance) == want
    a = build_parser().parse_args(["evaluate", "--checkpoint", str(teacher / "ldm")])
    _fill_sampling_defaults(a, a.checkpoint, guidance=2.0)
    assert (a.sampler, a.steps, a.guidance) == ("dpmpp_2m", 25, 2.0)

    # `ldmkit sample` uses the checkpoint's defaults (lcm, 4 steps, guidance 1); 1 and 2 steps work too
    for steps in ([], ["--steps", "1"], ["--steps", "2"]):
        dst = tmp_path / f"samples{len(steps)}{steps[-1] if steps else ''}"
        assert main(["sample", "--checkpoint", str(out), "--out", str(dst), "--prompt", "a red circle in the top left",
                     "--quiet", *steps]) == 0
        from PIL import Image

        info = Image.open(dst / "0000.png").text["parameters"]
        assert "Sampler: LCM" in info and "CFG scale: 1," in info
        assert f"Steps: {steps[-1] if steps else 4}," in info
    # the Python sampler agrees with the CLI's images
    imgs = ldm_sample(ldm, texts=["a red circle in the top left"], steps=4, sampler="lcm", seed=0)
    assert imgs.shape == (1, 3, 16, 16) and torch.isfinite(imgs).all()

    # convert reads it: to diffusers and back, the same weights and the same sampling defaults; diffusers
    # gets its LCMScheduler on the student's grid, which picks ldmkit's lcm timesteps
    assert main(["convert", "--from", str(out), "--to", str(tmp_path / "dif"), "--format", "diffusers"]) == 0
    assert main(["convert", "--from", str(tmp_path / "dif"), "--to", str(tmp_path / "back"), "--format", "ldmkit"]) == 0
    back = ldmkit.load(tmp_path / "back").state_dict()
    assert all(torch.equal(v, back[k]) for k, v in ldm.state_dict().items() if k.startswith("unet."))
    index = json.loads((tmp_path / "dif" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    sched = diffusers.LCMScheduler.from_pretrained(tmp_path / "dif" / "scheduler")
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == make_timesteps(ldm.schedule, 4, "trailing").tolist()
    for ckpt_dir in (tmp_path / "dif", tmp_path / "back"):
        a = build_parser().parse_args(["sample", "--checkpoint", str(ckpt_dir), "--out", "x"])
        _fill_sampling_defaults(a, a.checkpoint)
        assert (a.sampler, a.steps, a.guidance) == ("lcm", 4, 1.0), ckpt_dir
    capsys.readouterr()
    assert main(["convert", "--from", str(out), "--to", str(tmp_path / "one.safetensors"), "--format", "original"]) == 0
    assert "sample it with --sampler lcm --steps 4 --guidance 1.0" in capsys.readouterr().out

    # resume from step 3 (as if the run had died after it) reproduces step 6 bit for bit
    res = tmp_path / "resumed"
    shutil.copytree(out, res)
    shutil.rmtree(res / "checkpoints" / "step_00000006")
    (res / "latest").write_text("step_00000003\n")
    assert main([*args, "--out", str(res), "--resume"]) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(ckpt / name), load_file(res / "checkpoints" / "step_00000006" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_distill_refuses_a_teacher_that_is_not_a_diffusion_model(teacher, tmp_path, capsys):
    rc = main(["distill", "--config", "tiny", "--teacher", str(teacher / "ae"), "--quiet", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc != 0 and len(err.strip().splitlines()) == 1
    assert "holds a 'autoencoder', not a latent diffusion model" in err
    rc = main(["distill", "--config", "tiny", "--teacher", str(tmp_path / "nowhere"), "--quiet", "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "does not exist" in err


def test_lcm_lora_trains_only_adapters_and_the_file_on_the_teacher_is_the_run(teacher, tmp_path):
    """LCM-LoRA (train: lora): the base weights stay the teacher's, the run's merged checkpoint equals the
    teacher with OUT/lora.safetensors applied (so `sample --lora` on the teacher is the distilled model),
    and a resumed run ends bit for bit where the uninterrupted one does."""
    from ldmkit.interop import lora as lora_io

    out = tmp_path / "lcm-lora"
    args = ["distill", "--config", "tiny", "--teacher", str(teacher / "ldm"), "--quiet", "--set", "train=lora",
            "--set", "lora.rank=2", "--set", "optim.ema_decay=null"]
    assert main([*args, "--out", str(out)]) == 0
    doc = json.loads((out / "checkpoints" / "step_00000006" / "config.json").read_text())
    assert doc["meta"]["distillation"]["method"] == "lcm-lora" and doc["meta"]["lora"]["rank"] == 2
    base = ldmkit.load(teacher / "ldm")
    n_adapted = doc["meta"]["lora"]["trained_parameters"]
    assert 0 < n_adapted < sum(p.numel() for p in base.unet.parameters()) / 5

    merged = ldmkit.load(out)
    applied = lora_io.apply_loras(ldmkit.load(teacher / "ldm"), [(str(out / "lora.safetensors"), 1.0)])
    changed = 0
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, applied.state_dict()[k], atol=1e-6, rtol=0)
        changed += not torch.equal(v, base.state_dict()[k])
    assert changed > 0  # the adapters moved the model
    # only adapted layers changed: every untouched weight is the teacher's, bit for bit
    adapted = {p.removeprefix("unet.") for p in lora_io.load_lora(out / "lora.safetensors")}
    for k, v in merged.unet.state_dict().items():
        if k.rsplit(".", 1)[0] not in adapted:
            assert torch.equal(v, base.unet.state_dict()[k]), k

    res = tmp_path / "resumed"
    shutil.copytree(out, res)
    shutil.rmtree(res / "checkpoints" / "step_00000006")
    (res / "latest").write_text("step_00000003\n")
    assert main([*args, "--out", str(res), "--resume"]) == 0
    a, b = load_file(out / "lora.safetensors"), load_file(res / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_learned_guidance_scale_gives_one_student_every_scale(teacher, tmp_path, capsys):
    """guidance_range: the student gets a w-embedding (zero-initialised, so at step 0 it is the teacher at every
    scale), samples differently at different scales with one network call per step, converts to diffusers with
    the embedding (time_cond_proj_dim) and its default scale, and resumes bit for bit."""
    out = tmp_path / "w"
    args = ["distill", "--config", "tiny", "--teacher", str(teacher / "ldm"), "--quiet",
            "--set", "guidance_range=[1.5, 4.0]", "--set", "guidance=2.5", "--set", "w_embedding_dim=16"]
    assert main([*args, "--out", str(out)]) == 0
    doc = json.loads((out / "checkpoints" / "step_00000006" / "config.json").read_text())
    assert doc["config"]["unet"]["time_cond_proj_dim"] == 16
    assert doc["meta"]["sampling"]["guidance"] == 2.5 and doc["meta"]["distillation"]["guidance_range"] == [1.5, 4.0]
    ldm = ldmkit.load(out)
    assert ldm.unet.time_embedding.cond_proj.weight.abs().sum() > 0  # the embedding learned something
    calls = []
    hook = ldm.unet.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    a = ldm_sample(ldm, texts=["a red circle in the top left"], steps=2, sampler="lcm", guidance=1.5, seed=0)
    b = ldm_sample(ldm, texts=["a red circle in the top left"], steps=2, sampler="lcm", guidance=4.0, seed=0)
    hook.remove()
    assert calls == [1, 1, 1, 1]  # one unguided batch per step: the scale is an input, not a second branch
    assert (a - b).abs().max() > 0  # six tiny steps move the zero-initialised embedding only a little
    with pytest.raises(LdmkitError, match="negative prompt"):
        ldm_sample(ldm, texts=["a red circle in the top left"], negative_prompt="blue", steps=2, sampler="lcm")
    capsys.readouterr()

    assert main(["convert", "--from", str(out), "--to", str(tmp_path / "dif"), "--format", "diffusers"]) == 0
    unet_cfg = json.loads((tmp_path / "dif" / "unet" / "config.json").read_text())
    assert unet_cfg["time_cond_proj_dim"] == 16
    from ldmkit.interop.convert import load_any

    again = load_any(tmp_path / "dif")
    assert again.unet.config.time_cond_proj_dim == 16
    c = ldm_sample(again, texts=["a red circle in the top left"], steps=2, sampler="lcm", guidance=4.0, seed=0)
    assert (c - b).abs().max() < 1e-4

    res = tmp_path / "resumed"
    shutil.copytree(out, res)
    shutil.rmtree(res / "checkpoints" / "step_00000006")
    (res / "latest").write_text("step_00000003\n")
    assert main([*args, "--out", str(res), "--resume"]) == 0
    x, y = load_file(out / "checkpoints" / "step_00000006" / "ema.safetensors"), \
        load_file(res / "checkpoints" / "step_00000006" / "ema.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    rc = main([*args[:-2], "--set", "guidance_range=[3, 2]", "--out", str(tmp_path / "bad")])
    assert rc != 0 and "guidance_range must be [lo, hi]" in capsys.readouterr().err


def test_an_unlabelled_item_is_distilled_with_the_null_class_not_class_0():
    """Label −1 (no label) is the null class everywhere (training, guidance's unconditional branch); distillation
    once turned it into class 0 with clamp_min(0)."""
    from ldmkit.conditioning.conditioner import Conditioner, ConditionerConfig
    from ldmkit.train.distill import batch_condition

    conditioner = Conditioner(ConditionerConfig(num_classes=18, drop_label=0.5))
    cond = batch_condition(conditioner, {"label": torch.tensor([-1, 0, 5, -1]), "text": ["", "", "", ""]}, 4)
    assert cond.labels.tolist() == [18, 0, 5, 18]  # and no dropout: the 0 and the 5 stay
    assert torch.equal(cond.labels[:1], conditioner.uncond(1).labels)


def test_the_target_network_averages_at_the_constant_lcm_rate():
    """θ⁻ ← μ·θ⁻ + (1 − μ)·θ with μ = optim.ema_decay from the first update (LCM Algorithm 1, line 8; diffusers'
    train_lcm_distill_sd_wds.py, 0.95), not the warm-up min(μ, (1 + n)/(10 + n)) of the other trainers' EMA."""
    from ldmkit.train.distill import DistillTask
    from ldmkit.train.ema import EMA
    from ldmkit.train.loop import Task

    assert DistillTask.ema_warmup is False and Task.ema_warmup is True
    live = torch.nn.Linear(3, 2)
    ema = EMA(live, 0.95, warmup=DistillTask.ema_warmup)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        live.weight.add_(1.0)
    ema.update(live)
    torch.testing.assert_close(ema.module.weight, 0.95 * start + 0.05 * live.weight.detach(), rtol=0, atol=1e-7)
    warm = EMA(torch.nn.Linear(3, 2), 0.95)  # the warm-up's first rate: (1 + 1)/(10 + 1)
    w0 = warm.module.weight.detach().clone()
    target = torch.nn.Linear(3, 2)
    warm.update(target)
    torch.testing.assert_close(warm.module.weight, 2 / 11 * w0 + 9 / 11 * target.weight.detach(), rtol=0, atol=1e-6)
