"""The tiny autoencoder (TAESD): parity with diffusers' AutoencoderTiny, its folders, the latents it decodes
(pinned to diffusers' StableDiffusionPipeline with `vae=AutoencoderTiny`), its use by `generate`, `ldmkit sample`
and the server's previews, and `ldmkit distill-decoder`. Tiny random models throughout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldmkit
from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.autoencoder.tiny import TinyAutoencoder, TinyAutoencoderConfig
from ldmkit.checkpoint import save_checkpoint
from ldmkit.cli import main
from ldmkit.errors import LdmkitError
from ldmkit.generation import GenerationRequest, generate, tiny_decoder
from ldmkit.interop.convert import save_ldmkit
from ldmkit.interop.diffusers import from_diffusers, load_diffusers_pipeline, save_diffusers_model, to_diffusers

diffusers = pytest.importorskip("diffusers")

from test_interop import perturb, ref_pipe, sd_folder  # noqa: E402, F401 (fixtures)
from test_serve import tiny_ldm  # noqa: E402

DIFFUSERS_TINY = dict(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                      num_encoder_blocks=(1, 2, 1), num_decoder_blocks=(2, 1, 1), latent_channels=4)


def diffusers_tiny(**kw):
    torch.manual_seed(0)
    return perturb(diffusers.AutoencoderTiny(**(DIFFUSERS_TINY | kw)).eval(), scale=0.05, seed=1)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def ldmkit_tiny(latent_channels: int = 4, levels: int = 2, seed: int = 0) -> TinyAutoencoder:
    """f = 2^(levels − 1), as test_serve's tiny model (f = 2) when levels = 2."""
    torch.manual_seed(seed)
    cfg = TinyAutoencoderConfig(latent_channels=latent_channels, encoder_channels=(8,) * levels,
                                encoder_blocks=(1,) * levels, decoder_channels=(8,) * levels, decoder_blocks=(1,) * levels)
    return perturb(TinyAutoencoder(cfg).eval(), scale=0.05, seed=seed)


# ---- the architecture, against diffusers


@torch.no_grad()
def test_encode_decode_and_latent_packing_match_diffusers_autoencoder_tiny():
    ref = diffusers_tiny()
    ours = from_diffusers(ref)
    assert isinstance(ours, TinyAutoencoder) and ours.downsample_factor == 4
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    z = torch.randn(2, 4, 4, 6) * 4  # beyond ±3: the soft clamp is exercised
    assert max_diff(ours.encode(x).mean, ref.encode(x).latents) <= 1e-5
    assert max_diff(ours.decode(z), ref.decode(z).sample) <= 1e-5
    assert max_diff(ours.scale_latents(z), ref.scale_latents(z)) == 0
    assert max_diff(ours.unscale_latents(ours.scale_latents(z)), ref.unscale_latents(ref.scale_latents(z))) == 0
    back = to_diffusers(ours)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.state_dict().items())


@torch.no_grad()
def test_decode_latents_is_the_pipelines_decode_of_unscaled_latents():
    """diffusers' pipelines decode vae.decode(z' / scaling_factor + shift_factor) (SD3/Flux-style tiny VAEs carry the
    full VAE's numbers); decode_latents is that, and encode_latents its inverse map."""
    ref = diffusers_tiny(scaling_factor=1.5, shift_factor=0.1)
    ours = from_diffusers(ref)
    z = torch.randn(1, 4, 4, 4)
    assert max_diff(ours.decode_latents(z), ref.decode(z / 1.5 + 0.1).sample) <= 1e-5
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert max_diff(ours.encode_latents(x), (ref.encode(x).latents - 0.1) * 1.5) <= 1e-5


@torch.no_grad()
def test_stable_diffusion_pipeline_with_a_tiny_vae_decodes_its_scaled_latents_as_ldmkit_does(sd_folder, ref_pipe):
    """`pipe.vae = AutoencoderTiny(...)` (scaling_factor 1.0): the pipeline's images are the tiny decoder applied to
    the diffusion latents z' themselves, the ones LatentDiffusion.decode(z') decodes as D(z'/0.18215)."""
    pipe = diffusers.StableDiffusionPipeline(**{**ref_pipe.components, "vae": diffusers_tiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1))})
    kw = dict(num_inference_steps=2, guidance_scale=1.0)
    latents = pipe("a cat", output_type="latent", generator=torch.Generator().manual_seed(0), **kw).images
    images = pipe("a cat", output_type="pt", generator=torch.Generator().manual_seed(0), **kw).images  # [0, 1]
    ldm = load_diffusers_pipeline(sd_folder)
    decode = tiny_decoder(ldm, from_diffusers(pipe.vae))
    assert max_diff(decode(latents), images * 2 - 1) <= 1e-5
    assert max_diff(ldm.decode(latents), ref_pipe.vae.decode(latents / 0.18215).sample.clamp(-1, 1)) <= 1e-4


# ---- folders


def test_a_diffusers_folder_loads_through_ldmkit_load_and_writes_back(tmp_path):
    ref = diffusers_tiny()
    ref.save_pretrained(str(tmp_path / "taesd"))
    ours = ldmkit.load(tmp_path / "taesd")
    z = torch.randn(1, 4, 2, 2)
    with torch.no_grad():
        assert isinstance(ours, TinyAutoencoder) and max_diff(ours.decode(z), ref.decode(z).sample) <= 1e-5
    save_diffusers_model(ours, tmp_path / "again")
    back = diffusers.AutoencoderTiny.from_pretrained(str(tmp_path / "again"))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert list(back.config.num_decoder_blocks) == list(ref.config.num_decoder_blocks)


def test_an_ldmkit_folder_round_trip_is_lossless(tmp_path):
    for tiny in (ldmkit_tiny(), TinyAutoencoder(TinyAutoencoderConfig(decoder_channels=(16, 8), decoder_blocks=(2, 0),
                                                                      encoder=False, scaling_factor=0.5))):
        folder = save_ldmkit(tiny, tmp_path / f"t{len(list(tmp_path.iterdir()))}")
        back = ldmkit.load(folder)
        assert type(back) is TinyAutoencoder and back.config == tiny.config
        assert back.state_dict().keys() == tiny.state_dict().keys()
        assert all(torch.equal(back.state_dict()[k], v) for k, v in tiny.state_dict().items())


def test_a_decoder_alone_refuses_to_encode_and_a_bad_folder_is_one_line(tmp_path):
    tiny = TinyAutoencoder(TinyAutoencoderConfig(decoder_channels=(8, 8), decoder_blocks=(1, 1), encoder=False))
    with pytest.raises(LdmkitError, match="decoder alone"):
        tiny.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(LdmkitError, match="no encoder"):
        to_diffusers(tiny)
    ref = diffusers_tiny()
    ref.save_pretrained(str(tmp_path / "taesd"))
    from safetensors.torch import load_file, save_file

    file = tmp_path / "taesd" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(file))
    save_file({k: v for k, v in sd.items() if k != "decoder.layers.0.bias"}, str(file))
    with pytest.raises(LdmkitError, match="missing 1 keys .*decoder.layers.0.bias"):
        ldmkit.load(tmp_path / "taesd")


# ---- generation: the decoder the request path takes


@torch.no_grad()
def test_generate_decodes_the_sampled_latents_with_the_decoder_it_is_given():
    ldm = tiny_ldm().eval()
    tiny = ldmkit_tiny()
    req = dict(prompt=["a red square"], steps=2, sampler="euler", seed=3)
    full = generate(ldm, GenerationRequest(**req))
    small = generate(ldm, GenerationRequest(**req), decoder=tiny_decoder(ldm, tiny))
    assert torch.equal(full.latents, small.latents)  # the sampler is untouched
    assert torch.allclose(full.images, ldm.decode(full.latents), atol=1e-6)
    assert torch.allclose(small.images, tiny.decode_latents(small.latents).clamp(-1, 1), atol=1e-6)
    assert max_diff(small.images, full.images) > 0.1  # really the other decoder


def test_a_tiny_decoder_for_other_latents_is_refused_in_one_line():
    ldm = tiny_ldm()
    with pytest.raises(LdmkitError, match=r"^X decodes 3-channel latents but this model's have 4") as e:
        tiny_decoder(ldm, ldmkit_tiny(latent_channels=3), "X")
    assert "\n" not in str(e.value)
    with pytest.raises(LdmkitError, match=r"4x the latent size but this model's first stage makes 3-channel images 2x"):
        tiny_decoder(ldm, ldmkit_tiny(levels=3), "X")
    with pytest.raises(LdmkitError, match="holds a AutoencoderKL, not a tiny autoencoder"):
        tiny_decoder(ldm, ldm.autoencoder, "X")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-decoder")
    ldm = tiny_ldm()
    save_checkpoint(root / "model", 1, "latent_diffusion", ldm, ldm.config)
    tiny = ldmkit_tiny()
    save_ldmkit(tiny, root / "tiny")
    save_diffusers_model(tiny, root / "tiny-diffusers")
    save_ldmkit(ldmkit_tiny(latent_channels=3), root / "tiny3")
    return {k: str(root / k) for k in ("model", "tiny", "tiny-diffusers", "tiny3")}


def _pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("0*.png"))])


def test_sample_cli_decodes_with_an_ldmkit_or_diffusers_tiny_decoder(folders, tmp_path, capsys):
    base = ["sample", "--checkpoint", folders["model"], "--prompt", "a red square", "--num-per-prompt", "2",
            "--steps", "2", "--sampler", "euler", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "full")]) == 0
    assert main(base + ["--out", str(tmp_path / "tiny"), "--tiny-decoder", folders["tiny"]]) == 0
    assert main(base + ["--out", str(tmp_path / "dif"), "--tiny-decoder", folders["tiny-diffusers"]]) == 0
    full, tiny, dif = (_pngs(tmp_path / n) for n in ("full", "tiny", "dif"))
    assert tiny.shape == full.shape == (2, 16, 16, 3) and (tmp_path / "tiny" / "grid.png").is_file()
    assert np.array_equal(tiny, dif)  # one decoder, two folder formats
    assert np.abs(tiny.astype(int) - full.astype(int)).max() > 20
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "bad"), "--tiny-decoder", folders["tiny3"]]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "decodes 3-channel latents but this model's have 4" in err
    assert not (tmp_path / "bad" / "0000.png").exists()


# ---- the server: previews by the tiny decoder


class _Worker:
    """Calls every preview, as the real worker does every `preview_every` steps."""

    def __init__(self):
        self.previews = 0

    def step(self, done, preview=None, text=None):
        if preview is not None:
            assert preview()
            self.previews += 1


def _count_calls(fn):
    calls = []

    def wrapped(z):
        calls.append(z.shape)
        return fn(z)

    return wrapped, calls


@pytest.mark.parametrize("tiny_final", [False, True])
def test_server_previews_use_the_tiny_decoder_and_results_only_when_asked(folders, tiny_final):
    pytest.importorskip("fastapi")
    from ldmkit.serve.generate import run_generation
    from ldmkit.serve.models import ModelStore
    from ldmkit.serve.schema import Txt2ImgRequest, resolve

    store = ModelStore([folders["model"]], tiny_decoder=folders["tiny"], tiny_final=tiny_final)
    loaded = store.get(store.current)
    loaded.tiny, tiny_calls = _count_calls(loaded.tiny)
    full, full_calls = _count_calls(loaded.ldm.decode)
    loaded.ldm.decode = full  # an instance attribute: this test's spy, on this store's model alone
    gen = resolve(Txt2ImgRequest(prompt="a red square", steps=3, seed=1, sampler_name="Euler"), store, False)
    out = run_generation(gen, store, worker := _Worker())
    assert worker.previews == 3 and len(out["images"]) == 1
    assert len(tiny_calls) == 3 + tiny_final and len(full_calls) == (0 if tiny_final else 1)


def test_server_refuses_a_tiny_decoder_for_other_latents_at_start(folders):
    from ldmkit.serve.models import ModelStore

    with pytest.raises(LdmkitError, match="--tiny-decoder .*tiny3 decodes 3-channel latents"):
        ModelStore([folders["model"]], tiny_decoder=folders["tiny3"])
    with pytest.raises(LdmkitError, match="give it with --tiny-decoder"):
        ModelStore([folders["model"]], tiny_final=True)


# ---- ldmkit distill-decoder


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory):
    """An (untrained) first stage that records its data and latent scale, as train-autoencoder leaves one."""
    torch.manual_seed(0)
    cfg = AutoencoderConfig(base_channels=8, channel_mult=(1, 2, 2), norm_groups=4, scaling_factor=0.7, shift_factor=0.1)
    ae = perturb(AutoencoderKL(cfg).eval(), scale=0.02)
    folder = tmp_path_factory.mktemp("ae") / "ae"
    save_checkpoint(folder, 5, "autoencoder", ae, cfg,
                    meta={"dataset": "shapes", "image_size": 16, "latent_stats": {"mean": 0.1, "std": 1 / 0.7}})
    return str(folder)


@pytest.mark.slow
def test_distill_decoder_reports_held_out_psnr_writes_a_tiny_decoder_and_resumes_exactly(first_stage, tmp_path, capsys):
    from ldmkit.evaluate.metrics import psnr
    from ldmkit.train.config import DataConfig
    from ldmkit.train.data import open_val_data

    out = tmp_path / "dec"
    assert main(["distill-decoder", "--config", "tiny", "--autoencoder", first_stage, "--out", str(out), "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    tiny = ldmkit.load(out)
    assert isinstance(tiny, TinyAutoencoder) and tiny.encoder is None
    assert tiny.config.decoder_channels == (8, 8, 8) and tiny.config.scaling_factor == 1.0
    meta = json.loads((out / "checkpoints" / "step_00000006" / "config.json").read_text())["meta"]
    assert meta["dataset"] == "shapes" and meta["image_size"] == 16  # the first stage's own data and size
    # the reported figure, recomputed here from the files: PSNR of tiny vs full decodes of held-out posterior means
    ae = ldmkit.load(first_stage)
    x = open_val_data(DataConfig(dataset="shapes", size=16, val_images=16), 16, False).images
    with torch.no_grad():
        z = ae.normalize(ae.encode(x).mean)
        want = psnr(tiny.decode_latents(z).clamp(-1, 1), ae.decode_latents(z).clamp(-1, 1)).mean().item()
    assert meta["val"]["psnr_decoder"] == pytest.approx(want, abs=1e-3)
    assert f"held-out PSNR {want:.2f} dB against the full decoder" in line and "ms (full decoder:" in line
    # --resume from the step-3 checkpoint ends on the same weights
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step_00000006")
    (again / "latest").write_text("step_00000003\n")
    assert main(["distill-decoder", "--config", "tiny", "--autoencoder", first_stage, "--out", str(again), "--quiet",
                 "--resume"]) == 0
    resumed = ldmkit.load(again)
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in tiny.state_dict().items())


def test_distill_decoder_refuses_levels_that_do_not_fit_the_first_stage(first_stage, tmp_path, capsys):
    assert main(["distill-decoder", "--config", "tiny", "--autoencoder", first_stage, "--out", str(tmp_path / "x"),
                 "--set", "channels=[8,8]", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "channels has 2 entries but the first stage (f = 4) has 3 levels" in err
