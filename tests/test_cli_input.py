"""Bad input on the command line: refused before any work starts, with one line and exit 2."""

from __future__ import annotations

import pytest
import torch

from ldmkit.autoencoder import AutoencoderConfig
from ldmkit.checkpoint import save_checkpoint
from ldmkit.cli import main
from ldmkit.conditioning import ConditionerConfig
from ldmkit.pipeline import LatentDiffusion, LatentDiffusionConfig
from ldmkit.unet import UNetConfig


@pytest.fixture(scope="module")
def class_model(tmp_path_factory):
    """An untrained 3-class model, enough to sample from (the checks do not need a trained one)."""
    torch.manual_seed(0)
    ae = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), norm_groups=4)
    unet = UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), mid_attention=False,
                      num_heads=None, norm_groups=4, num_classes=3)
    cfg = LatentDiffusionConfig(autoencoder=ae, unet=unet, conditioner=ConditionerConfig(num_classes=3), image_size=16)
    out = tmp_path_factory.mktemp("ldm")
    save_checkpoint(out, 1, "latent_diffusion", LatentDiffusion.from_config(cfg), cfg)
    return out


def run(args, capsys) -> tuple[int, str]:
    try:
        rc = main(args)
    except SystemExit as e:  # argparse refuses a bad value itself: usage line + error, exit 2
        rc = e.code
    return rc, capsys.readouterr().err


def test_label_equal_to_the_number_of_classes_is_refused(class_model, tmp_path, capsys):
    rc, err = run(["sample", "--checkpoint", str(class_model), "--out", str(tmp_path / "s"), "--label", "3",
                   "--steps", "1", "--quiet"], capsys)
    assert rc == 2 and "0..2" in err and not (tmp_path / "s" / "0000.png").exists()
    rc, err = run(["sample", "--checkpoint", str(class_model), "--out", str(tmp_path / "ok"), "--label", "2",
                   "--steps", "1", "--quiet"], capsys)
    assert rc == 0, err
    # a label-only model has no text route to steer away from
    rc, err = run(["sample", "--checkpoint", str(class_model), "--out", str(tmp_path / "neg"), "--label", "2",
                   "--negative-prompt", "a blue square", "--quiet"], capsys)
    assert rc == 2 and "text-conditioned" in err and not any((tmp_path / "neg").glob("*.png"))
    # --num-samples counts unconditional images; beside a label it would be silently ignored
    rc, err = run(["sample", "--checkpoint", str(class_model), "--out", str(tmp_path / "n"), "--label", "2",
                   "--num-samples", "4", "--quiet"], capsys)
    assert rc == 2 and "--num-per-prompt 4" in err and not (tmp_path / "n").exists()


@pytest.mark.parametrize("extra, option", [
    (["--guidance", "nan"], "--guidance"), (["--guidance", "inf"], "--guidance"), (["--guidance", "-1"], "--guidance"),
    (["--steps", "0"], "--steps"), (["--num-per-prompt", "0"], "--num-per-prompt"),
    (["--num-samples", "-1"], "--num-samples"), (["--batch-size", "0"], "--batch-size"),
    (["--guidance-rescale", "2"], "--guidance-rescale"), (["--strength", "1.5"], "--strength"),
    (["--label", "-2"], "--label"), (["--steps", "ten"], "--steps"),
])  # fmt: skip
def test_sample_numbers_are_checked_before_loading(tmp_path, capsys, extra, option):
    # the checkpoint does not exist: the argument is refused first, so that error never shows
    rc, err = run(["sample", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "s"), *extra], capsys)
    assert rc == 2 and option in err and "missing" not in err and not (tmp_path / "s").exists()


@pytest.mark.parametrize("args", [["--threads", "-1", "demo"], ["demo", "--seeds", "0"],
                                  ["evaluate", "--checkpoint", "x", "--seeds", "0"],
                                  ["evaluate", "--checkpoint", "x", "--num-images", "0"]])
def test_other_numbers_are_checked_first(capsys, args):
    rc, err = run(args, capsys)
    assert rc == 2 and "Traceback" not in err and "must be >= 1" in err


def test_out_that_cannot_be_a_folder_names_the_path(class_model, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "sub"):
        rc, err = run(["sample", "--checkpoint", str(class_model), "--out", str(out), "--steps", "1", "--quiet"], capsys)
        assert rc == 2 and str(blocker) in err and "internal error" not in err
    rc, err = run(["train", "--config", "tiny", "--out", str(blocker), "--quiet"], capsys)
    assert rc == 2 and str(blocker) in err


def test_progress_bar_shows_no_psnr_before_the_first_validation(tmp_path, capsys):
    rc, err = run(["train-autoencoder", "--config", "tiny", "--out", str(tmp_path / "ae"), "--set", "optim.steps=4",
                   "--set", "logging.val_every=3"], capsys)
    assert rc == 0, err
    assert "psnr=nan" not in err and "psnr=" in err  # shown once there is a figure


def test_damaged_checkpoints_name_the_file(class_model, tmp_path, capsys):
    """Damage a checkpoint the ways disks and downloads do: one line naming the damaged file, exit 2."""
    import shutil

    from safetensors.torch import save_file

    from ldmkit.checkpoint import resolve

    cases = {}
    for name, damage in {"json": lambda f: (f / "config.json").write_text("{not json"),
                         "list": lambda f: (f / "config.json").write_text('["a list"]'),
                         "weights": lambda f: (f / "model.safetensors").write_bytes(
                             (f / "model.safetensors").read_bytes()[:2000])}.items():
        copy = tmp_path / name
        shutil.copytree(class_model, copy)
        damage(resolve(copy))
        cases[name] = (copy, "config.json" if name != "weights" else "model.safetensors")
    bare = tmp_path / "bare"  # a checkpoint folder itself (no `latest` beside it) with a damaged config.json
    shutil.copytree(resolve(class_model), bare)
    (bare / "config.json").write_text("{bad")
    cases["bare"] = (bare, "config.json")
    single = tmp_path / "single.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, str(single), metadata={"ldmkit": "{bad"})
    cases["single"] = (single, "single.safetensors")
    for name, (path, file) in cases.items():
        for cmd in (["sample", "--checkpoint", str(path), "--out", str(tmp_path / f"s_{name}"), "--quiet"],
                    ["convert", "--from", str(path), "--to", str(tmp_path / f"c_{name}"), "--format", "diffusers"]):
            rc, err = run(cmd, capsys)
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and file in lines[0] and "internal error" not in err, (name, cmd[0], err)
