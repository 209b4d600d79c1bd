"""`ldmkit train-control` and the concat routes through the training loop and the CLI, on tiny configs."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldmkit.cli import main
from ldmkit.conditioning import Cond
from ldmkit.control import controlled_unet
from ldmkit.train.control import build_control, load_base


def run_cli(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny autoencoder and a tiny text + label diffusion model on top of it."""
    root = tmp_path_factory.mktemp("control")
    assert main(["train-autoencoder", "--config", "tiny", "--quiet", "--out", str(root / "ae")]) == 0
    assert main(["train", "--config", "tiny", "--autoencoder", str(root / "ae"), "--quiet", "--out", str(root / "ldm")]) == 0
    return root


def test_control_training_drops_the_prompt_with_its_own_probability(base):
    """ControlNet's recipe: the caption and class are dropped for `drop_prompt` of the training samples
    (0.5 by default), replacing the base model's own 0.1."""
    texts, labels = ["a red circle in the top left"] * 400, torch.full((400,), 3)
    for p in (0.0, 0.5, 1.0):
        ldm, _ = load_base(str(base / "ldm"), drop_prompt=p)
        cond = ldm.conditioner(texts=texts, labels=labels, train=True, generator=torch.Generator().manual_seed(0))
        null = ldm.conditioner.uncond(1)
        text_dropped = (cond.context_mask.sum(1) == null.context_mask.sum()).float().mean().item()  # '' has 2 tokens
        label_dropped = (cond.labels == null.labels).float().mean().item()
        assert abs(text_dropped - p) < 0.08 and abs(label_dropped - p) < 0.08, (p, text_dropped, label_dropped)
    assert load_base(str(base / "ldm"))[0].conditioner.cfg.drop_text == 0.1  # the base model's own
    from ldmkit.train.control import ControlTrainConfig

    assert ControlTrainConfig().drop_prompt == 0.5


@pytest.mark.parametrize("kind", ["controlnet", "adapter"])
def test_control_network_at_step_zero_leaves_the_base_output_unchanged(base, kind):
    ldm, _ = load_base(str(base / "ldm"))
    net = build_control(kind, ldm, hint_channels=1)
    z, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 500])
    cond = ldm.conditioner(texts=["a red circle in the top left", ""], labels=torch.tensor([1, -1]))
    want = ldm.unet(z, t, cond)
    got = controlled_unet(ldm.unet, net)(z, t, Cond.of(cond, control=torch.rand(2, 1, 16, 16)))
    assert torch.equal(want, got)


def test_train_control_checkpoints_resumes_exactly_and_samples(base, tmp_path, capsys):
    args = ["train-control", "--config", "tiny", "--base", str(base / "ldm"), "--kind", "controlnet", "--control", "edge",
            "--quiet"]
    out = tmp_path / "cn"
    assert main([*args, "--out", str(out)]) == 0
    ckpts = out / "checkpoints"
    assert (ckpts / "step_00000003").is_dir() and (ckpts / "step_00000006").is_dir()
    doc = json.loads((ckpts / "step_00000006" / "config.json").read_text())
    assert doc["kind"] == "controlnet" and doc["meta"]["control"] == "edge"
    assert doc["meta"]["base"] == str((base / "ldm" / "checkpoints" / "step_00000006").resolve())
    assert (out / "samples" / "samples_00000006.png").is_file() and (out / "log.jsonl").is_file()
    # the zero convolutions moved: the network was trained
    w = load_file(ckpts / "step_00000006" / "model.safetensors")
    assert w["controlnet_mid_block.weight"].abs().sum() > 0

    # resume from step 3 (as if the run had died after it) reproduces step 6 bit for bit
    res = tmp_path / "cn_resumed"
    shutil.copytree(out, res)
    shutil.rmtree(res / "checkpoints" / "step_00000006")
    (res / "latest").write_text("step_00000003\n")
    assert main([*args, "--out", str(res), "--resume"]) == 0
    for f in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(ckpts / "step_00000006" / f), load_file(res / "checkpoints" / "step_00000006" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # sampling from the control run finds its base; a control map of the wrong shape is one clear line
    ctrl = tmp_path / "edge.png"
    Image.fromarray((np.random.rand(32, 32) > 0.8).astype(np.uint8) * 255).save(ctrl)
    rc, _, err = run_cli(["sample", "--checkpoint", str(out), "--control", str(ctrl), "--prompt", "a red circle",
                          "--steps", "2", "--out", str(tmp_path / "s"), "--quiet"], capsys)
    assert rc == 0, err
    assert (tmp_path / "s" / "0000.png").is_file() and (tmp_path / "s" / "grid.png").is_file()
    rc, _, err = run_cli(["sample", "--checkpoint", str(base / "ldm"), "--controlnet", str(out), "--control", str(ctrl),
                          "--control-scale", "0.5", "--steps", "2", "--out", str(tmp_path / "s2"), "--quiet"], capsys)
    assert rc == 0, err
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(tmp_path / "wide.png")
    for bad in (["--control", str(tmp_path / "wide.png")], []):
        rc, _, err = run_cli(["sample", "--checkpoint", str(out), *bad, "--steps", "2", "--out", str(tmp_path / "s3"),
                              "--quiet"], capsys)
        assert rc == 2 and err.count("\n") == 1 and "error" in err and "Traceback" not in err
    rc, _, err = run_cli(["sample", "--checkpoint", str(base / "ldm"), "--control", str(ctrl), "--steps", "2",
                          "--out", str(tmp_path / "s4"), "--quiet"], capsys)
    assert rc == 2 and "ControlNet" in err
    # two ControlNets summed (MultiControlNet): one control image each, scales one per network
    two = ["sample", "--checkpoint", str(base / "ldm"), "--controlnet", str(out), "--controlnet", str(out),
           "--control", str(ctrl), "--control", str(ctrl), "--steps", "2", "--quiet", "--seed", "3"]
    rc, _, err = run_cli([*two, "--control-scale", "0.25", "--control-scale", "0.25", "--out", str(tmp_path / "m")], capsys)
    assert rc == 0, err
    # the same net twice at 0.25 each sums to the net once at 0.5
    rc, _, err = run_cli(["sample", "--checkpoint", str(base / "ldm"), "--controlnet", str(out), "--control", str(ctrl),
                          "--control-scale", "0.5", "--steps", "2", "--quiet", "--seed", "3", "--out", str(tmp_path / "h")], capsys)
    a = np.asarray(Image.open(tmp_path / "m" / "0000.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "h" / "0000.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # equal up to PNG rounding
    rc, _, err = run_cli(["sample", "--checkpoint", str(base / "ldm"), "--controlnet", str(out), "--controlnet", str(out),
                          "--control", str(ctrl), "--steps", "2", "--out", str(tmp_path / "m2"), "--quiet"], capsys)
    assert rc == 2 and "one per network" in err


def test_train_adapter_on_masks(base, tmp_path):
    out = tmp_path / "ad"
    assert main(["train-control", "--config", "tiny", "--base", str(base / "ldm"), "--kind", "adapter", "--control", "mask",
                 "--set", "optim.steps=3", "--quiet", "--out", str(out)]) == 0
    doc = json.loads((out / "checkpoints" / "step_00000003" / "config.json").read_text())
    assert doc["kind"] == "adapter" and doc["meta"]["control"] == "mask"


def test_inpainting_model_trains_and_samples_from_the_cli(base, tmp_path, capsys):
    out = tmp_path / "inp"
    assert main(["train", "--config", "tiny-inpaint", "--autoencoder", str(base / "ae"), "--quiet", "--out", str(out)]) == 0
    img, mask = tmp_path / "img.png", tmp_path / "mask.png"
    Image.fromarray(np.random.randint(0, 255, (16, 16, 4), np.uint8)).save(img)  # RGBA: converted
    m = np.zeros((32, 32), np.uint8)
    m[8:20, 8:20] = 255
    Image.fromarray(m).save(mask)  # twice the size: resized
    rc, _, err = run_cli(["sample", "--checkpoint", str(out), "--init-image", str(img), "--mask", str(mask), "--prompt",
                          "a red circle", "--guidance", "2", "--steps", "2", "--out", str(tmp_path / "s"), "--quiet"], capsys)
    assert rc == 0, err
    # the route refuses a missing input by name, and a text-only model refuses a mask by name
    rc, _, err = run_cli(["sample", "--checkpoint", str(out), "--steps", "2", "--out", str(tmp_path / "s2"), "--quiet"], capsys)
    assert rc == 2 and "inpaint" in err
    rc, _, err = run_cli(["sample", "--checkpoint", str(base / "ldm"), "--init-image", str(img), "--mask", str(mask),
                          "--steps", "2", "--out", str(tmp_path / "s3"), "--quiet"], capsys)
    assert rc == 2 and "inpainting route" in err
    # img2img on the plain text model
    rc, _, err = run_cli(["sample", "--checkpoint", str(base / "ldm"), "--init-image", str(img), "--strength", "0.5",
                          "--steps", "4", "--out", str(tmp_path / "s4"), "--quiet"], capsys)
    assert rc == 0, err


def test_evaluate_reports_every_route(base, tmp_path, capsys):
    cn = tmp_path / "cn"
    assert main(["train-control", "--config", "tiny", "--base", str(base / "ldm"), "--set", "optim.steps=3", "--quiet",
                 "--out", str(cn)]) == 0
    rc, _, err = run_cli(["evaluate", "--checkpoint", str(cn), "--num-images", "8", "--steps", "2",
                          "--out", str(tmp_path / "e1")], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "e1" / "results.json").read_text())
    # every caption beside the probe maps, with the route and without it (the base model alone)
    want = {f"iou_{who}_{cap}" for who in ("route", "base") for cap in ("right", "empty", "other")}
    assert want | {"map_wins_route", "caption_wins_base", "iou_real_images"} <= set(res["control"])
    assert res["control"]["iou_real_images"] > 0.9  # the segmenter reads real shapes right
    assert all(0 <= res["control"][k] <= 1 for k in want)
    assert (tmp_path / "e1" / "control.png").is_file() and "IoU" in (tmp_path / "e1" / "report.md").read_text()
    assert res["not_judged"] == []
    # on a user's folder no segmenter knows the images: no IoU, one line that says so, samples beside their maps
    folder = tmp_path / "mine"
    folder.mkdir()
    rows = []
    for i in range(6):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        Image.fromarray(np.eye(16, dtype=np.uint8) * 255).save(folder / f"{i}_map.png")
        rows.append({"file_name": f"{i}.png", "text": "a thing", "conditioning_image": f"{i}_map.png"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, _, err = run_cli(["evaluate", "--checkpoint", str(cn), "--data", str(folder), "--num-images", "4", "--steps", "2",
                          "--out", str(tmp_path / "e2")], capsys)
    assert rc == 0, err
    res = json.loads((tmp_path / "e2" / "results.json").read_text())
    assert "control" not in res and len(res["not_judged"]) == 1 and "not judged: control fidelity" in err
    assert (tmp_path / "e2" / "control.png").is_file()
    # the smoke run's figures exist and are finite; the inpainting floors are in test_quality.py
    for preset, key in (("tiny-inpaint", "inpaint"), ("tiny", "lowres")):
        out = tmp_path / key
        extra = ["--set", "concat={kind: lowres, lowres_factor: 2}"] if key == "lowres" else []
        assert main(["train", "--config", preset, "--autoencoder", str(base / "ae"), "--set", "optim.steps=2", *extra,
                     "--quiet", "--out", str(out)]) == 0
        rc, _, err = run_cli(["evaluate", "--checkpoint", str(out), "--num-images", "8", "--steps", "2",
                              "--out", str(tmp_path / f"e_{key}")], capsys)
        assert rc == 0, err
        res = json.loads((tmp_path / f"e_{key}" / "results.json").read_text())
        assert all(math.isfinite(v) for v in res[key].values())
        if key == "inpaint":  # a text inpainting model on shapes is also judged in the hole
            assert res["replace"]["n"] == 8 and 0 <= res["replace"]["colour"] <= 1
            assert (tmp_path / "e_inpaint" / "replace.png").is_file()
    assert res["lowres"]["psnr_bicubic"] > 20  # the baseline itself: bicubic 2x on 16 px shapes measures 24 dB


def test_sampled_pngs_carry_their_parameters_as_a1111_writes_them(base, tmp_path, capsys):
    out = tmp_path / "s"
    rc, _, err = run_cli(["sample", "--checkpoint", str(base / "ldm"), "--prompt", "a red circle in the top left",
                          "--negative-prompt", "a blue square", "--num-per-prompt", "2", "--guidance", "2.5",
                          "--steps", "3", "--sampler", "unipc", "--sigmas", "karras", "--seed", "7", "--out", str(out),
                          "--quiet"], capsys)
    assert rc == 0, err
    for pos in (0, 1):
        lines = Image.open(out / f"{pos:04d}.png").text["parameters"].split("\n")
        assert lines[0] == "a red circle in the top left" and lines[1] == "Negative prompt: a blue square"
        fields = dict(f.split(": ", 1) for f in lines[2].split(", "))
        assert fields["Steps"] == "3" and fields["Sampler"] == "UniPC" and fields["Schedule type"] == "Karras"
        assert fields["CFG scale"] == "2.5" and fields["Seed"] == "7" and fields["Size"] == "16x16"
        assert fields["Model"] == "ldm" and fields["Batch size"] == "2" and fields["Batch pos"] == str(pos)
        assert len(fields["Model hash"]) == 10  # the first 10 hex digits of the weights' sha256, as A1111 writes
        assert fields["Version"].startswith("ldmkit ")
    assert "parameters" not in Image.open(out / "grid.png").text


def test_help_for_the_new_command_and_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-control", "--help"])
    assert e.value.code == 0 and "--kind" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = capsys.readouterr().out
    assert all(f in out for f in ("--init-image", "--mask", "--strength", "--control", "--controlnet", "--control-scale"))
