"""`ldmkit convert` / `load_any`: format detection, lossless round trips between the three formats,
and strict refusal of partial, mismatched or unsafe checkpoints."""

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from ldmkit.conditioning.conditioner import ConditionerConfig  # noqa: E402
from ldmkit.errors import LdmkitError  # noqa: E402
from ldmkit.interop import original as orig  # noqa: E402
from ldmkit.interop.convert import convert, detect_format, load_any  # noqa: E402
from ldmkit.pipeline import DiffusionConfig, LatentDiffusion, LatentDiffusionConfig  # noqa: E402
from ldmkit.checkpoint import save_checkpoint  # noqa: E402
from ldmkit.unet import unet_tiny  # noqa: E402
from ldmkit.generation.compat import sample as ldm_sample
from test_interop import make_tiny_sd_folder, perturb, same_state  # noqa: E402


class NotATensor:
    """Stands for the Lightning callbacks / argparse objects real .ckpt files carry."""


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_tiny_sd_folder(tmp_path_factory.mktemp("convert") / "sd")


@pytest.fixture(scope="module")
def minilm_ckpt(tmp_path_factory):
    """An ldmkit-trained-style model: MiniLM text, v-prediction, trailing spacing, min-SNR loss."""
    cfg = LatentDiffusionConfig(
        autoencoder=AutoencoderConfig(base_channels=16, channel_mult=(1, 2), norm_groups=8, scaling_factor=0.7, shift_factor=0.05),
        unet=unet_tiny(context_dim=384, norm_groups=8),
        conditioner=ConditionerConfig(text_encoder="minilm", drop_text=0.2),
        diffusion=DiffusionConfig(prediction_type="v", timestep_spacing="trailing", weighting="min_snr", zero_terminal_snr=True),
        image_size=16,
    )  # fmt: skip
    torch.manual_seed(0)
    ldm = LatentDiffusion.from_config(cfg)
    perturb(ldm, seed=7)
    out = tmp_path_factory.mktemp("minilm") / "run"
    save_checkpoint(out, 100, "latent_diffusion", ldm, cfg)
    return out


def sample(ldm):
    return ldm_sample(ldm, texts=["a red circle", "a cat"], steps=3, guidance=2.0, seed=1)


def test_detect_format(sd_folder, minilm_ckpt, tmp_path):
    assert detect_format(minilm_ckpt) == "ldmkit"  # a training folder with `latest`
    assert detect_format(next((minilm_ckpt / "checkpoints").iterdir())) == "ldmkit"
    assert detect_format(sd_folder) == "diffusers_pipeline"
    assert detect_format(sd_folder / "vae") == "diffusers_model"
    (tmp_path / "x.safetensors").write_bytes(b"")
    assert detect_format(tmp_path / "x.safetensors") == "original"
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"hello": 1}))
    for path, pattern in ((tmp_path / "notes.txt", "not a checkpoint file"), (tmp_path / "folder", 'neither "kind"'),
                          (tmp_path / "missing", "does not exist")):  # fmt: skip
        with pytest.raises(LdmkitError, match=pattern):
            detect_format(path)
    with pytest.raises(LdmkitError, match="damaged or not safetensors"):
        load_any(tmp_path / "x.safetensors")
    (tmp_path / "random.ckpt").write_bytes(torch.randn(100).numpy().tobytes())
    with pytest.raises(LdmkitError, match="cannot read .* as a PyTorch checkpoint"):
        load_any(tmp_path / "random.ckpt")


def test_tiny_sd_folder_runs_text_to_image(sd_folder):
    ldm = load_any(sd_folder)
    assert isinstance(ldm, LatentDiffusion) and not ldm.training
    images = ldm_sample(ldm, texts=["a cat"], steps=2)
    assert images.shape == (1, 3, 16, 16) and images.abs().max() <= 1


def test_minilm_model_round_trips_through_diffusers_and_original(minilm_ckpt, tmp_path):
    src = load_any(minilm_ckpt)
    ref = sample(src)
    summary = convert(minilm_ckpt, tmp_path / "sd", "diffusers")
    assert summary.startswith(f"converted {minilm_ckpt} (ldmkit: LatentDiffusion + MiniLM text encoder,")
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["_ldmkit"]["text_encoder"] == "minilm"
    assert "MiniLM" in (tmp_path / "sd" / "README.md").read_text()
    convert(tmp_path / "sd", tmp_path / "back", "ldmkit")
    convert(minilm_ckpt, tmp_path / "sd.safetensors", "original")
    convert(tmp_path / "sd.safetensors", tmp_path / "back2", "ldmkit")
    for folder in (tmp_path / "back", tmp_path / "back2"):
        back = load_any(folder)
        assert back.config == src.config  # diffusion settings (v, trailing, zero SNR, min-SNR) included
        assert same_state(back.state_dict(), src.state_dict())
        assert torch.equal(sample(back), ref)


def test_clip_model_round_trips_and_its_text_encoder_travels(sd_folder, tmp_path):
    src = load_any(sd_folder)
    ref = sample(src)
    convert(sd_folder, tmp_path / "ld", "ldmkit")
    assert (tmp_path / "ld" / "text_encoder" / "config.json").is_file() and (tmp_path / "ld" / "tokenizer").is_dir()
    shutil.move(tmp_path / "ld", tmp_path / "moved")  # the checkpoint finds its own text encoder again
    convert(tmp_path / "moved", tmp_path / "sd.ckpt", "original")
    convert(tmp_path / "sd.ckpt", tmp_path / "sd2", "diffusers")  # the tokenizer travelled in the file
    convert(tmp_path / "sd2", tmp_path / "sd3.safetensors", "original", dtype=torch.float16)
    for path in (tmp_path / "moved", tmp_path / "sd.ckpt", tmp_path / "sd2"):
        back = load_any(path)
        assert back.config.model_dump(exclude={"conditioner"}) == src.config.model_dump(exclude={"conditioner"})
        assert same_state(back.state_dict(), src.state_dict())
        assert same_state(back.conditioner.text_encoder.model.state_dict(), src.conditioner.text_encoder.model.state_dict())
        assert torch.equal(sample(back), ref), path
    half = load_any(tmp_path / "sd3.safetensors")
    assert (sample(half) - ref).abs().max() < 2e-2  # fp16 storage


def test_vae_alone_converts_between_formats(sd_folder, tmp_path):
    ae = load_any(sd_folder / "vae")
    assert isinstance(ae, AutoencoderKL)
    convert(sd_folder / "vae", tmp_path / "vae.safetensors", "original")
    convert(tmp_path / "vae.safetensors", tmp_path / "vae_ldmkit", "ldmkit")
    convert(tmp_path / "vae_ldmkit", tmp_path / "vae_diffusers", "diffusers")
    for path in (tmp_path / "vae.safetensors", tmp_path / "vae_ldmkit", tmp_path / "vae_diffusers"):
        back = load_any(path)
        assert back.config == ae.config and same_state(back.state_dict(), ae.state_dict())


def test_partial_and_mismatched_checkpoints_are_refused_with_keys_named(minilm_ckpt, tmp_path):
    path = tmp_path / "sd.safetensors"
    orig.save_original(load_any(minilm_ckpt), path)
    sd, meta = orig.read_state_dict(path)
    from safetensors.torch import save_file

    def write(name, tensors):
        save_file(tensors, str(tmp_path / name), metadata={"ldmkit": json.dumps(meta)})
        return tmp_path / name

    dropped = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    partial = write("partial.safetensors", {k: v for k, v in sd.items() if k != dropped})
    with pytest.raises(LdmkitError, match=rf"missing 1 keys \({dropped}\)"):
        convert(partial, tmp_path / "out1", "ldmkit")
    wrong = "first_stage_model.decoder.conv_out.weight"
    mismatched = write("mismatched.safetensors", sd | {wrong: torch.zeros(3, 16, 1, 1)})
    with pytest.raises(LdmkitError, match=rf"wrong shape .*{wrong}: \(3, 16, 1, 1\) vs \(3, 16, 3, 3\)"):
        convert(mismatched, tmp_path / "out2", "diffusers")
    extra = write("extra.safetensors", sd | {"model.diffusion_model.adapter.weight": torch.zeros(1), "mystery": torch.zeros(1)})
    with pytest.raises(LdmkitError, match="unexpected 1 keys \\(model.diffusion_model.adapter.weight\\)"):
        load_any(extra)
    stray = write("stray.safetensors", sd | {"mystery": torch.zeros(1)})
    with pytest.raises(LdmkitError, match="1 keys ldmkit cannot place: mystery"):
        load_any(stray)
    assert not any((tmp_path / f"out{i}").exists() for i in (1, 2))  # nothing half-written
    # an ldmkit checkpoint with a key dropped
    bad = tmp_path / "bad_ckpt"
    shutil.copytree(next((minilm_ckpt / "checkpoints").iterdir()), bad)
    from safetensors.torch import load_file

    weights = load_file(str(bad / "model.safetensors"))
    del weights["unet.conv_in.bias"]
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(LdmkitError, match="missing 1 keys \\(e.g. unet.conv_in.bias\\)"):
        convert(bad, tmp_path / "out3.safetensors", "original")


def test_ckpt_with_python_objects_is_refused_with_a_way_out(minilm_ckpt, tmp_path):
    sd, meta = orig.to_original_state_dict(load_any(minilm_ckpt))
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": sd, "callbacks": NotATensor()}, path)
    with pytest.raises(LdmkitError, match="arbitrary Python objects.*NotATensor.*re-save its tensors") as e:
        load_any(path)
    assert "\n" not in str(e.value)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": sd, "global_step": 3, "ldmkit": json.dumps(meta)}, plain)  # plain values only: fine
    assert isinstance(load_any(plain), LatentDiffusion)


def test_convert_refuses_bad_requests(sd_folder, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(LdmkitError, match="already exists"):
        convert(sd_folder, tmp_path / "taken", "ldmkit")
    with pytest.raises(LdmkitError, match="unknown format 'onnx'"):
        convert(sd_folder, tmp_path / "x", "onnx")
    with pytest.raises(LdmkitError, match="ending in .safetensors or .ckpt"):
        convert(sd_folder, tmp_path / "x", "original")
    with pytest.raises(LdmkitError, match="config= is for single files"):
        load_any(sd_folder, config=sd_folder)
    with pytest.raises(LdmkitError, match="has no ldmkit checkpoint form"):
        convert(sd_folder / "unet", tmp_path / "u", "ldmkit")


def test_second_stage_trains_on_a_diffusers_vae(sd_folder, tmp_path):
    """The common research workflow: a converted SD VAE as the frozen first stage of `ldmkit train`."""
    from ldmkit.cli import main

    for source in (sd_folder / "vae", sd_folder):  # a VAE folder, or a whole pipeline (its VAE is used)
        out = tmp_path / f"ldm-{source.name}"
        rc = main(["train", "--config", "tiny", "--autoencoder", str(source), "--out", str(out), "--quiet",
                   "--set", "optim.steps=2"])
        assert rc == 0
        ldm = load_any(out)
        vae = load_any(sd_folder / "vae")
        assert ldm.autoencoder.config.scaling_factor == vae.config.scaling_factor
        for k, v in vae.state_dict().items():
            assert torch.equal(ldm.autoencoder.state_dict()[k], v), k


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(tmp_path, monkeypatch):
    """`convert --overwrite` writes under a temporary name and swaps: a conversion that fails half way
    leaves the previous output exactly as it was (it used to be deleted first), and no partial files."""
    from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldmkit.checkpoint import save_checkpoint
    from ldmkit.interop import diffusers as dif

    cfg = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), norm_groups=4)
    src = tmp_path / "ae"
    save_checkpoint(src, 1, "autoencoder", AutoencoderKL(cfg), cfg)
    dst = tmp_path / "out"
    convert(src, dst, "ldmkit")
    before = {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()}

    def fails_half_way(module, folder, source="", sampling=None):
        Path(folder).mkdir()
        (Path(folder) / "config.json").write_text("{}")  # a partial output
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ldmkit.interop.convert.save_ldmkit", fails_half_way)
    with pytest.raises(OSError):
        convert(src, dst, "ldmkit", overwrite=True)
    after = {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["ae", "out"]
    monkeypatch.undo()
    convert(src, dst, "diffusers", overwrite=True)  # a successful overwrite replaces it whole
    assert dif.is_model_folder(dst) and not (dst / "model.safetensors").exists()
    single = tmp_path / "vae.safetensors"
    convert(src, single, "original")
    convert(src, single, "original", overwrite=True)
    assert single.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["ae", "out", "vae.safetensors"]


def test_ldmkit_load_is_the_one_loader_of_every_format(sd_folder, tmp_path):
    """`ldmkit.load` reads each format ldmkit reads to the same weights, passes `config=` to a single file and
    refuses it for a folder (which carries its own), as `load_any` does."""
    import ldmkit

    src = load_any(sd_folder)
    convert(sd_folder, tmp_path / "ld", "ldmkit")
    convert(sd_folder, tmp_path / "sd.safetensors", "original")
    for path, config in ((sd_folder, None), (tmp_path / "ld", None), (tmp_path / "sd.safetensors", sd_folder)):
        back = ldmkit.load(path, config=config)
        assert isinstance(back, LatentDiffusion) and same_state(back.state_dict(), src.state_dict()), path
    for folder in (sd_folder, tmp_path / "ld"):
        with pytest.raises(LdmkitError, match="config= is for single files"):
            ldmkit.load(folder, config=sd_folder)
