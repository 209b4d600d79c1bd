"""Training loops end to end on tiny configs: checkpoints, exact resume after SIGKILL, CLI errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ldmkit
from ldmkit.cli import main
from ldmkit.errors import LdmkitError
from ldmkit.checkpoint import resolve
from ldmkit.generation.compat import sample as ldm_sample

FAST_AE = ["--config", "tiny", "--quiet"]


def run_cli(args, capsys):
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def trained_ae(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae")
    assert main(["train-autoencoder", "--out", str(out), *FAST_AE]) == 0
    return out


def test_autoencoder_run_writes_everything(trained_ae):
    folder = resolve(trained_ae)
    doc = json.loads((folder / "config.json").read_text())
    assert doc["kind"] == "autoencoder"
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():  # the user's usual permissions, not the 0600 of temporary files
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    stats = doc["meta"]["latent_stats"]
    assert len(stats["channel_mean"]) == doc["config"]["latent_channels"]
    # the stored scale/shift normalise the measured latents
    assert abs(doc["config"]["scaling_factor"] - 1 / stats["std"]) < 1e-6
    assert abs(doc["config"]["shift_factor"] - stats["mean"]) < 1e-6
    assert (trained_ae / "log.jsonl").is_file() and (trained_ae / "loss.png").is_file()
    assert list((trained_ae / "samples").glob("recon_*.png"))
    assert "val" in doc["meta"] and doc["meta"]["val"]["psnr"] > 0


def test_tensorboard_event_files_hold_what_the_log_holds(trained_ae, tmp_path):
    """logging.tensorboard: read back with tensorboard's own reader, every scalar of log.jsonl (loss, LR,
    gradient norm, images/s, validation figures) at its step, and the sample grids as images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "ldm"
    assert main(["train", "--config", "tiny", "--autoencoder", str(trained_ae), "--quiet", "--out", str(out),
                 "--set", "logging.tensorboard=true"]) == 0
    board = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    keys = {k for r in records for k in r} - {"step", "time"}
    assert {"loss", "lr", "images_per_s", "grad_norm"} <= keys and set(board.Tags()["scalars"]) == keys
    for key in keys:
        want = [(r["step"], r[key]) for r in records if key in r]
        got = [(e.step, e.value) for e in board.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert np.allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
    grids = board.Images("samples")
    assert [e.step for e in grids] == [3, 6] and all(e.width > 0 and e.height > 0 for e in grids)
    assert not (trained_ae / "tensorboard").exists()  # off by default


def test_tensorboard_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
    from ldmkit.train.log import TrainLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(LdmkitError, match=r"pip install 'ldmkit\[tensorboard\]'"):
        TrainLog(tmp_path, tensorboard=True)
    TrainLog(tmp_path, enabled=False, tensorboard=True)  # other ranks never open a writer


def test_checkpoint_load_gives_identical_outputs(trained_ae):
    a, b = ldmkit.load(trained_ae), ldmkit.load(trained_ae)
    assert not a.training
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a.decode(a.encode(x).mean), b.decode(b.encode(x).mean))
    sd = load_file(str(resolve(trained_ae) / "model.safetensors"))
    for k, v in a.state_dict().items():
        assert torch.equal(v, sd[k])


def test_rerun_without_resume_is_refused(trained_ae, capsys):
    rc, _, err = run_cli(["train-autoencoder", "--out", str(trained_ae), *FAST_AE], capsys)
    assert rc == 2 and "--resume" in err and len(err.strip().splitlines()) == 1


def _kill_when_checkpointed(cmd: list[str], out: Path, timeout: float = 120) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (out / "latest").exists():
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.time() - t0 < timeout
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: only atomic writes can save us
    proc.wait()


@pytest.mark.slow
def test_killed_autoencoder_run_resumes_exactly(tmp_path):
    sets = ["--set", "optim.steps=30", "--set", "logging.ckpt_every=10", "--set", "logging.val_every=100"]
    ref = tmp_path / "ref"
    assert main(["train-autoencoder", "--out", str(ref), *FAST_AE, *sets]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ldmkit.cli", "train-autoencoder", "--out", str(out), *FAST_AE, *sets]
    _kill_when_checkpointed(cmd, out)
    assert main(["train-autoencoder", "--out", str(out), "--resume", *FAST_AE, *sets]) == 0
    a = load_file(str(resolve(ref) / "model.safetensors"))
    b = load_file(str(resolve(out) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines() if "loss" in ln]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated log lines


@pytest.mark.slow
def test_diffusion_training_resume_and_sample(trained_ae, tmp_path, capsys):
    sets = ["--set", "optim.steps=8", "--set", "logging.ckpt_every=4", "--set", "logging.val_every=100"]
    base = ["train", "--config", "tiny", "--autoencoder", str(trained_ae), "--quiet", *sets]
    ref = tmp_path / "ref"
    assert main([*base, "--out", str(ref)]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ldmkit.cli", *base, "--out", str(out)]
    _kill_when_checkpointed(cmd, out)
    assert main([*base, "--out", str(out), "--resume"]) == 0
    # Equal up to float rounding: the first steps ran in a subprocess, the rest (and the reference) in
    # this one, and once on the shared CI machine the two processes' kernels rounded
    # differently (differences ~1e-7, invisible at 4 decimals); a wrong resume differs by ~1e-3.
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(resolve(ref) / name))
        b = load_file(str(resolve(out) / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    # the same sequence of losses: the killed run's log (cut back to its checkpoint) plus the resumed steps
    losses = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, (d / "log.jsonl").read_text().splitlines())]  # noqa: E731
    assert [s for s, _ in losses(out)] == [s for s, _ in losses(ref)]
    assert np.allclose([v for _, v in losses(out)], [v for _, v in losses(ref)], rtol=1e-5, atol=0)

    ldm = ldmkit.load(ref)
    s1 = ldm_sample(ldm, texts=["a red circle in the top left"], labels=[0], steps=3, seed=7)
    s2 = ldm_sample(ldm, texts=["a red circle in the top left"], labels=[0], steps=3, seed=7)
    s3 = ldm_sample(ldm, texts=["a red circle in the top left"], labels=[0], steps=3, seed=8)
    assert s1.shape == (1, 3, 16, 16) and torch.equal(s1, s2) and not torch.equal(s1, s3)

    samples = tmp_path / "samples"
    rc, out_, err = run_cli(["sample", "--checkpoint", str(ref), "--out", str(samples), "--prompt", "a red circle in the top left",
                             "--prompt", "a blue square in the top right", "--label", "0", "--label", "4",
                             "--num-per-prompt", "2", "--steps", "2", "--quiet"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in samples.iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png"]

    # bf16 autocast: the same images up to bf16 rounding (8-bit PNGs); fp16 and a missing GPU are refused
    from PIL import Image

    one = ["sample", "--checkpoint", str(ref), "--prompt", "a red circle in the top left", "--label", "0",
           "--steps", "2", "--precision", "fp32", "--quiet", "--device", "cpu"]  # fp32 unless a test sets it
    for prec in ("fp32", "bf16"):
        rc, _, err = run_cli([*one, "--out", str(tmp_path / prec), "--precision", prec], capsys)
        assert rc == 0, err
    px = [torch.from_numpy(np.asarray(Image.open(tmp_path / p / "0000.png"), dtype=np.float32)) for p in ("fp32", "bf16")]
    diff = (px[0] - px[1]).abs()
    assert 0 < diff.mean() < 2 and diff.max() < 16, (diff.mean(), diff.max())  # changed (autocast ran), not much
    rc, _, err = run_cli([*one, "--out", str(tmp_path / "fp16"), "--precision", "fp16"], capsys)
    assert rc != 0 and "--precision fp16 needs a CUDA device" in err
    # --guidance-rescale reaches the sampler: with guidance it changes the images, without guidance it cannot
    for name, extra in (("g", []), ("gr", ["--guidance-rescale", "1"]), ("r", ["--guidance", "1", "--guidance-rescale", "1"])):
        rc, _, err = run_cli([*one, "--out", str(tmp_path / name), *(["--guidance", "5"] if name != "r" else []), *extra], capsys)
        assert rc == 0, err
    read = lambda p: np.asarray(Image.open(tmp_path / p / "0000.png"), dtype=np.float32)  # noqa: E731
    assert np.abs(read("g") - read("gr")).max() > 0 and np.array_equal(read("r"), read("fp32"))
    if not torch.cuda.is_available():
        rc, _, err = run_cli([*one[:-2], "--out", str(tmp_path / "gpu"), "--device", "cuda"], capsys)
        assert rc != 0 and "--device is cuda but no CUDA device is available" in err


def test_bad_config_key_and_value(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: tiny\noptim:\n  stepz: 3\n")
    rc, _, err = run_cli(["train-autoencoder", "--config", str(cfg), "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert rc == 2 and "optim.stepz" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(["train-autoencoder", *FAST_AE, "--set", "optim.lr=-1", "--out", str(tmp_path / "o2")], capsys)
    assert rc == 2 and "optim.lr" in err
    rc, _, err = run_cli(["train-autoencoder", "--config", "nonexistent.yaml", "--out", str(tmp_path / "o3")], capsys)
    assert rc == 2 and "neither a preset" in err
    cfg.write_text("model: [1, 2\n")
    rc, _, err = run_cli(["train-autoencoder", "--config", str(cfg), "--out", str(tmp_path / "o4")], capsys)
    assert rc == 2 and "cannot parse" in err


def test_resume_without_checkpoint_and_missing_checkpoint(tmp_path, capsys):
    rc, _, err = run_cli(["train-autoencoder", *FAST_AE, "--out", str(tmp_path / "new"), "--resume"], capsys)
    assert rc == 2 and "not an ldmkit checkpoint" in err
    rc, _, err = run_cli(["evaluate", "--checkpoint", str(tmp_path / "nothing")], capsys)
    assert rc == 2 and "does not exist" in err
    rc, _, err = run_cli(["sample", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "s")], capsys)
    assert rc == 2 and "does not exist" in err


def test_corrupt_weights_and_mismatched_checkpoint(trained_ae, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(resolve(trained_ae), bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LdmkitError, match="damaged"):
        ldmkit.load(bad)
    doc = json.loads((bad / "config.json").read_text())
    shutil.copy(resolve(trained_ae) / "model.safetensors", bad / "model.safetensors")
    doc["config"]["latent_channels"] = 8
    (bad / "config.json").write_text(json.dumps(doc))
    with pytest.raises(LdmkitError, match="do not match the config"):
        ldmkit.load(bad)
    rc, _, err = run_cli(["train", "--config", "tiny", "--autoencoder", str(tmp_path / "nope"), "--out", str(tmp_path / "d"), "--quiet"], capsys)
    assert rc == 2 and "does not exist" in err


def test_nan_loss_stops_with_clear_error(tmp_path, capsys):
    rc, _, err = run_cli(["train-autoencoder", *FAST_AE, "--set", "optim.lr=1e30", "--set", "optim.grad_clip=null",
                          "--set", "optim.steps=20", "--out", str(tmp_path / "nan")], capsys)
    assert rc == 2 and "loss became" in err and "--resume" in err


def test_bad_prompts_file(trained_ae, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    rc, _, err = run_cli(["sample", "--checkpoint", str(trained_ae), "--out", str(tmp_path / "s"), "--prompts-file", str(empty)], capsys)
    assert rc == 2 and "no prompts" in err
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    rc, _, err = run_cli(["sample", "--checkpoint", str(trained_ae), "--out", str(tmp_path / "s"), "--prompts-file", str(binary)], capsys)
    assert rc == 2 and "UTF-8" in err
    rc, _, err = run_cli(["sample", "--checkpoint", str(trained_ae), "--out", str(tmp_path / "s"), "--prompt", "x"], capsys)
    assert rc == 2 and "not a diffusion model" in err, err


def test_corrupt_image_folder(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(20):
        Image.new("RGB", (20, 20), (i * 10, 0, 0)).save(folder / f"{i:02d}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    base = ["train-autoencoder", *FAST_AE, "--data", str(folder), "--set", "data.val_images=2", "--set", "optim.batch_size=4",
            "--set", "optim.steps=2"]
    rc, _, err = run_cli([*base, "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "broken.png" in err and "--skip-bad-images" in err
    rc, _, err = run_cli([*base, "--out", str(tmp_path / "o2"), "--skip-bad-images"], capsys)
    assert rc == 0, err


def test_help_for_every_command(capsys):
    for cmd in ["train-autoencoder", "train", "sample", "evaluate", "demo", "convert"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_quick_writes_report_and_layout(tmp_path, capsys):
    out = tmp_path / "demo"
    rc, _, err = run_cli(["demo", "--quick", "--out", str(out), "--seeds", "1", "--quiet"], capsys)
    assert rc == 0, err
    assert (out / "autoencoder" / "latest").is_file() and (out / "diffusion" / "latest").is_file()
    report = (out / "report.md").read_text()
    assert "colour" in report and "diffusion_eval/text_samples.png" in report
    res = json.loads((out / "results.json").read_text())
    # a 6-step smoke run: its figures are near chance (the floors are in test_quality.py); the report
    # states the same figures as results.json
    assert res["attributes"]["n"] == 72 and f"{100 * res['attributes']['colour']:.1f} %" in report
    assert (out / "diffusion_eval" / "text_samples.png").is_file()
    assert (out / "autoencoder_eval" / "reconstructions.png").is_file()
    assert isinstance(ldmkit.load(out / "diffusion"), torch.nn.Module)
    # a second run finds both stages finished and only re-evaluates
    rc, _, err = run_cli(["demo", "--quick", "--out", str(out), "--seeds", "1", "--quiet"], capsys)
    assert rc == 0, err


def test_evaluate_diffusion_checkpoint(trained_ae, tmp_path, capsys):
    ldm_out = tmp_path / "ldm"
    assert main(["train", "--config", "tiny", "--autoencoder", str(trained_ae), "--quiet", "--out", str(ldm_out),
                 "--set", "optim.steps=2"]) == 0
    rc, out, err = run_cli(["evaluate", "--checkpoint", str(ldm_out), "--out", str(tmp_path / "ev"), "--seeds", "1",
                            "--steps", "2"], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["text"]["n"] == 72 and res["label"]["n"] == 18
    assert (tmp_path / "ev" / "label_samples.png").is_file()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ldmkit.cli", "train-autoencoder", "--out", str(out), *FAST_AE,
           "--set", "optim.steps=100000", "--set", "logging.ckpt_every=100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / "log.jsonl").exists():  # training has started
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted at step" in err and "--resume" in err
    step = json.loads((resolve(out) / "config.json").read_text())["step"]
    assert step > 0  # the checkpoint written on the way out is the latest one


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml")))
def test_example_configs_validate(path):
    from ldmkit.train.config import (AUTOENCODER_PRESETS, DIFFUSION_PRESETS, AutoencoderTrainConfig,
                                     DiffusionTrainConfig, load_config)

    if "ae" in path.stem:
        load_config(str(path), AutoencoderTrainConfig, AUTOENCODER_PRESETS)
    else:
        load_config(str(path), DiffusionTrainConfig, DIFFUSION_PRESETS)


def test_trainers_adamw_is_fused_and_matches_the_reference_loop():
    """`adamw` (every trainer's optimizer) takes PyTorch's fused kernel on CPU, and ten steps of it give
    the weights and moments of the default per-tensor AdamW loop up to float rounding."""
    from ldmkit.train.loop import adamw

    torch.manual_seed(0)
    shapes = [(16, 8, 3, 3), (16,), (32, 16)]
    ref = [torch.randn(s, requires_grad=True) for s in shapes]
    ours = [p.detach().clone().requires_grad_() for p in ref]
    start = [p.detach().clone() for p in ref]
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)
    opt = adamw(ours, 1e-2, (0.9, 0.99), 0.05)
    assert opt.param_groups[0]["fused"] is True
    for _ in range(10):
        grads = [torch.randn(s) for s in shapes]
        for params, o in ((ref, opt_ref), (ours, opt)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            o.step()
    for a, b, b0 in zip(ours, ref, start):
        assert (b.detach() - b0).abs().max() > 1e-2  # ten steps of lr 1e-2 did move the weights
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[a][key], opt_ref.state[b][key], rtol=1e-5, atol=1e-7)


def test_a_log_line_torn_by_a_kill_or_full_disk_does_not_stop_resume(tmp_path):
    from ldmkit.train.log import TrainLog

    log = TrainLog(tmp_path)
    for step in (2, 4, 6):
        log.write(step, loss=0.5)
    with log.path.open("a") as f:
        f.write('{"step": 8, "lo')  # the process died mid-write
    assert [r["step"] for r in log.records()] == [2, 4, 6]
    log.truncate_after(4)
    assert [r["step"] for r in log.records()] == [2, 4]
    assert log.path.read_text().endswith("\n") and not list(tmp_path.glob(".log.jsonl*"))


def test_killed_between_the_renames_of_a_resave_the_aside_copy_is_taken_back(tmp_path):
    """Re-saving a step moves the old folder aside first; a kill before the new one is renamed in
    leaves `latest` naming a missing folder, and `resolve` takes the aside copy back."""
    from ldmkit.checkpoint import save_checkpoint
    from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL

    cfg = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), norm_groups=4)
    folder = save_checkpoint(tmp_path, 3, "autoencoder", AutoencoderKL(cfg), cfg)
    folder.rename(folder.with_name(f".{folder.name}.replaced"))  # the state between the two renames
    assert resolve(tmp_path) == folder and (folder / "model.safetensors").is_file()
    assert isinstance(ldmkit.load(tmp_path), AutoencoderKL)


def test_evaluate_autoencoder_reports_bicubic_baseline_sizes_and_whole_folders(trained_ae, tmp_path, capsys):
    """PSNR beside bicubic down/up at the model's factor (checked against a direct computation), at
    several sizes (tiled past 64 latent cells), and on every image of a folder it never trained on."""
    import torch.nn.functional as F
    from PIL import Image

    from ldmkit.data import build_dataset
    from ldmkit.data.tensors import materialize
    from ldmkit.evaluate.autoencoder import bicubic_down_up, evaluate_autoencoder
    from ldmkit.evaluate.metrics import psnr

    ae = ldmkit.load(trained_ae)
    f = ae.downsample_factor
    res = evaluate_autoencoder(ae, "shapes", [16, 32, 4 * 65], tmp_path / "ev", n=6)
    x = materialize(build_dataset("shapes", 16, "val"), 6, progress=False).images
    small = F.interpolate(x, scale_factor=1 / f, mode="bicubic", antialias=True)
    cheap = F.interpolate(small, size=(16, 16), mode="bicubic").clamp(-1, 1)
    assert torch.equal(bicubic_down_up(x, f), cheap)
    assert abs(res["bicubic_psnr"] - psnr(cheap, x).mean().item()) < 1e-4
    assert res["psnr_over_bicubic"] == pytest.approx(res["psnr"] - res["bicubic_psnr"])
    assert set(res["by_size"]) == {"16", "32", "260"} and res["by_size"]["16"]["psnr"] == res["psnr"]
    assert res["by_size"]["260"]["tiled"] and not res["by_size"]["32"]["tiled"] and ae.tiling is None
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "bicubic" in report and "| 260 |" in report

    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    rc, out, err = run_cli(["evaluate", "--checkpoint", str(trained_ae), "--data", str(folder), "--size", "16",
                            "--out", str(tmp_path / "ev2")], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "ev2" / "results.json").read_text())["images"] == 5  # all of them, not a val split


@pytest.mark.parametrize("name", ["shapes", "faces", "photos", "photos-f8", "digits", "tiny"])
def test_every_autoencoder_preset_builds_and_round_trips_its_image_size(name):
    from ldmkit.autoencoder import AutoencoderKL
    from ldmkit.train.config import AUTOENCODER_PRESETS

    cfg = AUTOENCODER_PRESETS[name]()
    ae = AutoencoderKL(cfg.model).eval()
    x = torch.rand(1, 3, cfg.data.size, cfg.data.size) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x).mode()
        assert z.shape == (1, cfg.model.latent_channels, cfg.data.size // ae.downsample_factor,
                           cfg.data.size // ae.downsample_factor)
        assert ae.decode(z).shape == x.shape


def test_photos_presets_start_as_bicubic_and_hold_out_whole_photographs():
    from ldmkit.data.builtin import TRAIN_PHOTOS, VAL_PHOTOS
    from ldmkit.train.config import AUTOENCODER_PRESETS

    for name, f in (("photos", 4), ("photos-f8", 8)):
        cfg = AUTOENCODER_PRESETS[name]()
        assert cfg.model.bicubic_shortcut and cfg.model.downsample_factor == f and cfg.data.size == 64
    assert not set(TRAIN_PHOTOS) & set(VAL_PHOTOS)
    assert {p.split(":")[0] for p in VAL_PHOTOS} - {p.split(":")[0] for p in TRAIN_PHOTOS}  # a package train never uses


def test_diffusion_latents_mean_reaches_the_loss_and_a_fine_tune_inherits_it(trained_ae, tmp_path, monkeypatch):
    """`diffusion.latents` is part of the model: set for a run, it is what the trainer draws z0 with, and a
    fine-tune (`--init-from`) of that run draws the same way without being told."""
    import ldmkit.train.diffusion_task as task

    seen, real = [], task.sample_latents
    monkeypatch.setattr(task, "sample_latents", lambda *a: seen.append(a[-1]) or real(*a))
    sets = ["--set", "optim.steps=1", "--set", "logging.val_every=100", "--quiet"]
    base = tmp_path / "base"
    assert main(["train", "--config", "tiny", "--autoencoder", str(trained_ae), "--out", str(base), *sets,
                 "--set", "diffusion.latents=mean"]) == 0
    assert seen and set(seen) == {"mean"} and ldmkit.load(base).config.diffusion.latents == "mean"
    seen.clear()
    import ldmkit.train.finetune as ft

    decoder_modes, real_dec = [], ft.finetune_decoder
    monkeypatch.setattr(ft, "finetune_decoder", lambda *a: decoder_modes.append(a[8]) or real_dec(*a))
    assert main(["train", "--config", "tiny", "--init-from", str(base), "--out", str(tmp_path / "ft"), *sets,
                 "--set", "finetune.decoder_steps=1"]) == 0
    assert seen and set(seen) == {"mean"}
    assert decoder_modes == ["mean"]  # the decoder steps learn to draw from what the U-Net learns to make


def test_the_decoder_steps_decode_the_posterior_mean_or_a_draw_as_the_model_says():
    """finetune_decoder on latents: "mean" hands the decoder each row's posterior mean itself; "sample" a draw
    mean + std·ε with ε standard normal. The rows and ε come from the same seeded stream either way."""
    from ldmkit.train.finetune import finetune_decoder

    class AE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder, self.post_quant_conv = torch.nn.Conv2d(4, 3, 1), torch.nn.Identity()

        def decode(self, z):
            seen.append(z.detach().clone())
            return self.decoder(z)

    torch.manual_seed(0)
    mean, std, images = torch.randn(6, 4, 4, 4), torch.full((6, 4, 4, 4), 0.5), torch.randn(6, 3, 4, 4)
    draws = {}
    for mode in ("mean", "sample"):
        seen = []
        ae = AE()
        before = ae.decoder.weight.detach().clone()
        finetune_decoder(ae, images, mean, std, 3, 1e-2, 4, 0, mode)
        assert len(seen) == 3 and not torch.equal(before, ae.decoder.weight)  # 3 steps, the decoder moved
        draws[mode] = torch.cat(seen)
    rows = [int((mean - z).flatten(1).abs().sum(1).argmin()) for z in draws["mean"]]
    assert torch.equal(draws["mean"], mean[rows])  # exactly the means of the drawn rows
    eps = (draws["sample"] - mean[rows]) / 0.5  # the same rows (the same stream), plus std·ε
    assert eps.abs().min() > 0 and abs(float(eps.std()) - 1) < 0.2 and abs(float(eps.mean())) < 0.2


def test_the_decoder_steps_rehearsal_rows_keep_what_the_starting_decoder_drew():
    """Rows from keep_from on (DreamBooth's class latents) target the starting decoder's own output, not their
    image: a decoder given only such rows has a zero loss and does not move, however far the images are from what
    it draws; the same rows as ordinary rows pull it toward the images."""
    from ldmkit.train.finetune import finetune_decoder

    class AE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder, self.post_quant_conv = torch.nn.Conv2d(4, 3, 1), torch.nn.Identity()

        def decode(self, z):
            return self.decoder(z)

    torch.manual_seed(0)
    mean, std, images = torch.randn(6, 4, 4, 4), torch.full((6, 4, 4, 4), 0.5), torch.randn(6, 3, 4, 4) + 5
    moved = {}
    for keep_from in (0, 3, None):
        ae = AE()
        before = ae.decoder.weight.detach().clone()
        finetune_decoder(ae, images, mean, std, 4, 1e-2, 4, 0, "sample", keep_from)
        moved[keep_from] = float((ae.decoder.weight - before).abs().max())
    assert moved[0] == 0 and moved[3] > 0 and moved[None] > 0


def test_the_frozen_decoder_copies_what_decodes_and_shares_the_encoder():
    """The rehearsal target's autoencoder: its own decoder and post_quant_conv (a step on the trained one leaves its
    output as it was), the encoder shared, not copied (decoding never runs it)."""
    from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldmkit.train.finetune import _frozen_decoder

    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), norm_groups=4)).eval()
    start = _frozen_decoder(ae)
    z = torch.randn(2, ae.config.latent_channels, 4, 4)
    before = ae.decode(z).detach()
    assert start.encoder is ae.encoder and start.decoder is not ae.decoder
    assert start.post_quant_conv is None or start.post_quant_conv is not ae.post_quant_conv
    assert not any(p.requires_grad for p in start.decoder.parameters())
    with torch.no_grad():
        for p in ae.decoder.parameters():
            p.add_(0.1)
    assert not torch.equal(ae.decode(z), before) and torch.equal(start.decode(z), before)
