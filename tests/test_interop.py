"""Interoperability with diffusers and the original SD single-file format, pinned to diffusers itself:
its modules, its folder loaders, its own single-file loaders (offline, with a local config folder)
and its conversion functions. Everything runs on tiny random models built here."""

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from ldmkit.errors import LdmkitError  # noqa: E402
from ldmkit.interop import original as orig  # noqa: E402
from ldmkit.interop.diffusers import (  # noqa: E402
    diffusion_config_from_scheduler,
    diffusion_config_to_scheduler,
    from_diffusers,
    load_diffusers_pipeline,
    save_diffusers_pipeline,
    to_diffusers,
    vae_config_from_diffusers,
)
from ldmkit.interop.presets import SD_PRESETS, VAE_PRESETS  # noqa: E402
from ldmkit.generation.compat import sample as ldm_sample


# ---- a tiny Stable Diffusion pipeline folder (random weights, a 5-token-per-letter CLIP vocabulary)


def tiny_clip(vocab_size: int, layers: int = 2, act: str = "quick_gelu", seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=layers,
        max_position_embeddings=16, hidden_act=act, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )  # fmt: skip
    return transformers.CLIPTextModel(cfg).eval()


def tiny_tokenizer():
    """A real CLIP BPE tokenizer over printable ASCII with two merges ("c a", "ca t</w>")."""
    chars = [chr(i) for i in range(33, 127)]
    vocab = chars + [c + "</w>" for c in chars] + ["ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=[("c", "a"), ("ca", "t</w>")], model_max_length=16
    )


def perturb(module, scale=0.05, seed=0):
    """Random nudges to every weight, so zero-initialised layers do not hide mapping mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def tiny_diffusers_parts(prediction_type="epsilon"):
    tok = tiny_tokenizer()
    te = tiny_clip(len(tok))
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16,
    )  # fmt: skip
    perturb(unet.eval(), seed=2)
    perturb(vae.eval(), seed=3)
    scheduler = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False,
        set_alpha_to_one=False, timestep_spacing="leading", prediction_type=prediction_type,
    )  # fmt: skip
    return dict(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler)


def make_tiny_sd_folder(folder: Path, **kw) -> Path:
    """Save a tiny random `StableDiffusionPipeline` with diffusers' own save_pretrained."""
    pipe = diffusers.StableDiffusionPipeline(
        **tiny_diffusers_parts(**kw), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_tiny_sd_folder(tmp_path_factory.mktemp("interop") / "sd")


@pytest.fixture(scope="module")
def ref_pipe(sd_folder):
    return diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder), local_files_only=True)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def public(config) -> dict:
    """A diffusers config without its bookkeeping entries (_use_default_values, _name_or_path …)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def same_state(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---- AutoencoderKL


def tiny_diffusers_vae(**kw):
    base = dict(
        block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=32, scaling_factor=0.3, shift_factor=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    return perturb(diffusers.AutoencoderKL(**(base | kw)).eval())


@pytest.mark.parametrize(
    "kw", [{}, {"use_quant_conv": False, "use_post_quant_conv": False}, {"mid_block_add_attention": False, "shift_factor": None}]
)
def test_vae_parity_and_lossless_round_trip(kw):
    ref = tiny_diffusers_vae(**kw)
    ae = from_diffusers(ref).eval()
    assert isinstance(ae, AutoencoderKL)
    assert ae.config.scaling_factor == 0.3 and ae.config.shift_factor == (0.0 if "shift_factor" in kw else 0.1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = ref.encode(x).latent_dist, ae.encode(x)
        assert max_diff(a.mean, b.mean) <= 1e-4 and max_diff(a.logvar, b.logvar) <= 1e-4
        ya, yb = ref.decode(a.mean).sample, ae.decode(b.mean)
    assert yb.abs().max() > 0.1 and max_diff(ya, yb) <= 1e-4
    back = to_diffusers(ae, sample_size=32)
    assert same_state(back.state_dict(), ref.state_dict())
    assert public(back.config) == public(ref.config)  # scaling_factor, shift_factor, widths, groups … all equal


def test_vae_configs_diffusers_cannot_express_are_refused():
    with pytest.raises(LdmkitError, match="variational=False"):
        to_diffusers(AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2), variational=False, norm_groups=4)))
    with pytest.raises(LdmkitError, match="norm_groups=32 does not divide"):
        to_diffusers(AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=(1, 2))))  # ldmkit shrinks groups to 8
    base = dict(tiny_diffusers_vae().config)
    with pytest.raises(LdmkitError, match="latents_mean"):
        vae_config_from_diffusers(base | {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
    with pytest.raises(LdmkitError, match="use_quant_conv != use_post_quant_conv"):
        vae_config_from_diffusers(base | {"use_post_quant_conv": False})
    with pytest.raises(LdmkitError, match="act_fn"):
        vae_config_from_diffusers(base | {"act_fn": "relu"})


def test_dispatch_unet_and_controlnet(monkeypatch):
    from ldmkit.unet import UNet

    unet = from_diffusers(tiny_diffusers_parts()["unet"])
    assert isinstance(unet, UNet)
    assert type(to_diffusers(unet)).__name__ == "UNet2DConditionModel"
    with pytest.raises(LdmkitError, match="AutoencoderKL, a UNet2DConditionModel or a ControlNetModel"):
        from_diffusers(torch.nn.Linear(2, 2))
    fake = type("ControlNetModel", (torch.nn.Module,), {})()
    # the ControlNet converter is looked up lazily: missing → a clear error, present → called
    monkeypatch.setitem(__import__("sys").modules, "ldmkit.interop.diffusers_controlnet", None)
    with pytest.raises(LdmkitError, match="no ControlNet support"):
        from_diffusers(fake)
    stub = type("M", (), {"controlnet_from_diffusers": staticmethod(lambda m: ("converted", m))})
    monkeypatch.setitem(__import__("sys").modules, "ldmkit.interop.diffusers_controlnet", stub)
    assert from_diffusers(fake) == ("converted", fake)


# ---- scheduler ⇄ DiffusionConfig


def test_scheduler_config_translation_round_trips():
    sched = diffusers.DDIMScheduler(
        beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing",
        rescale_betas_zero_snr=True, num_train_timesteps=500,
    )  # fmt: skip
    d = diffusion_config_from_scheduler(sched.config)
    assert (d.schedule, d.prediction_type, d.timestep_spacing, d.zero_terminal_snr, d.num_timesteps) == (
        "cosine", "v", "trailing", True, 500,
    )  # fmt: skip
    assert diffusion_config_from_scheduler(diffusion_config_to_scheduler(d)) == d
    # the same β as diffusers computes
    from ldmkit.diffusion.schedules import make_schedule

    ours = make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end, d.zero_terminal_snr)
    torch.testing.assert_close(ours.alphas_cumprod.float(), sched.alphas_cumprod.float(), atol=1e-6, rtol=1e-5)
    # an SD 1.5 scheduler config (PNDM) without timestep_spacing: diffusers' default "leading"
    sd15 = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "beta_end": 0.012, "num_train_timesteps": 1000, "steps_offset": 1, "skip_prk_steps": True}  # fmt: skip
    assert diffusion_config_from_scheduler(sd15) == SD_PRESETS["sd1"]().diffusion
    with pytest.raises(LdmkitError, match="trained_betas"):
        diffusion_config_from_scheduler({"trained_betas": [0.1, 0.2]})
    with pytest.raises(LdmkitError, match="beta_schedule='sigmoid'"):
        diffusion_config_from_scheduler({"beta_schedule": "sigmoid"})


# ---- pipeline folders


def test_pipeline_folder_loads_with_diffusers_outputs(sd_folder, ref_pipe):
    ldm = load_diffusers_pipeline(sd_folder)
    cfg = ldm.config
    assert cfg.image_size == 16 and cfg.diffusion == SD_PRESETS["sd1"]().diffusion
    assert Path(cfg.conditioner.text_encoder) == (sd_folder / "text_encoder").resolve()
    # text encoder: diffusers' encode_prompt
    with torch.no_grad():
        ref_ctx = ref_pipe.encode_prompt("a cat", "cpu", 1, False)[0]
    ctx, mask = ldm.conditioner.text_encoder(["a cat"])
    assert ctx.shape == ref_ctx.shape == (1, 16, 32) and mask.all()
    assert max_diff(ctx, ref_ctx) == 0
    # U-Net and VAE
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        ref_eps = ref_pipe.unet(z, t, encoder_hidden_states=ctx.expand(2, -1, -1)).sample
        eps = ldm.unet(z, t, context=ctx.expand(2, -1, -1))
        assert max_diff(eps, ref_eps) <= 1e-5
        assert max_diff(ldm.decode(z), ref_pipe.vae.decode(z / 0.18215).sample.clamp(-1, 1)) <= 1e-4


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_text_to_image_matches_stable_diffusion_pipeline(sd_folder, ref_pipe, guidance):
    """End to end: the same initial noise through ldmkit's DDIM and diffusers' StableDiffusionPipeline
    (DDIMScheduler, leading spacing + steps_offset 1, classifier-free guidance with "" as ∅)."""
    ldm = load_diffusers_pipeline(sd_folder)
    # SD's DDIMScheduler has set_alpha_to_one=False: its last step ends at ᾱ_0, not at ᾱ = 1
    final = ldm.schedule.alphas_cumprod[0].item()
    ours = ldm_sample(ldm, texts=["a cat"], steps=3, sampler="ddim", guidance=guidance, seed=0, final_alpha_cumprod=final)
    z = torch.randn((1, *ldm.latent_shape), generator=torch.Generator().manual_seed(0))  # sample()'s noise
    ref = ref_pipe(
        "a cat", num_inference_steps=3, guidance_scale=guidance, latents=z, output_type="pt"
    ).images  # (1, 3, H, W) in [0, 1]
    assert ours.shape == ref.shape == (1, 3, 16, 16)
    assert max_diff(ours, ref * 2 - 1) <= 1e-4


def test_saved_pipeline_folder_is_what_diffusers_reads(sd_folder, ref_pipe, tmp_path):
    ldm = load_diffusers_pipeline(sd_folder)
    out = save_diffusers_pipeline(ldm, tmp_path / "out")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        assert same_state(getattr(pipe, name).state_dict(), getattr(ref_pipe, name).state_dict()), name
    assert public(pipe.unet.config) == public(ref_pipe.unet.config)
    assert {k: pipe.vae.config[k] for k in ("scaling_factor", "block_out_channels", "sample_size")} == {
        k: ref_pipe.vae.config[k] for k in ("scaling_factor", "block_out_channels", "sample_size")
    }
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.tokenizer("a cat").input_ids == ref_pipe.tokenizer("a cat").input_ids
    back = load_diffusers_pipeline(out)
    assert back.config.model_dump(exclude={"conditioner"}) == ldm.config.model_dump(exclude={"conditioner"})
    assert same_state(back.state_dict(), ldm.state_dict())
    with pytest.raises(LdmkitError, match="not empty"):
        save_diffusers_pipeline(ldm, out)


def test_partial_and_mismatched_diffusers_weights_are_refused(sd_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    for damage, pattern in (("drop", "missing keys .*conv_in.bias"), ("shape", "size mismatch")):
        bad = tmp_path / damage
        shutil.copytree(sd_folder, bad)
        file = bad / "unet" / "diffusion_pytorch_model.safetensors"
        sd = load_file(str(file))
        if damage == "drop":
            del sd["conv_in.bias"]
        else:
            sd["conv_out.weight"] = torch.zeros(4, 32, 1, 1)
        save_file(sd, str(file))
        with pytest.raises(LdmkitError, match=pattern):
            load_diffusers_pipeline(bad)


def test_folder_that_is_not_stable_diffusion_is_refused(sd_folder, tmp_path):
    import shutil

    bad = tmp_path / "xl"
    shutil.copytree(sd_folder, bad)
    index = json.loads((bad / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "T5EncoderModel"]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(LdmkitError, match="T5EncoderModel is not supported"):
        load_diffusers_pipeline(bad)


# ---- presets


def test_sd_presets_are_what_the_real_sd_configs_translate_to():
    from ldmkit.interop.diffusers import vae_config_to_diffusers
    from ldmkit.interop.diffusers_unet import config_from_diffusers

    sd_vae = {  # stable-diffusion-v1-5/vae/config.json
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }  # fmt: skip
    assert vae_config_from_diffusers(sd_vae) == VAE_PRESETS["sd"]()
    assert vae_config_from_diffusers(sd_vae | {"scaling_factor": 0.13025}) == VAE_PRESETS["sdxl"]()
    sd3 = vae_config_to_diffusers(VAE_PRESETS["sd3"]())
    assert (sd3["latent_channels"], sd3["shift_factor"], sd3["use_quant_conv"]) == (16, 0.0609, False)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoencoderKL(VAE_PRESETS["sd"]()).parameters())
    assert n == 83_653_863  # the SD 1/2 VAE
    sd1_unet = {  # stable-diffusion-v1-5/unet/config.json (the parts that differ from the defaults)
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "in_channels": 4, "layers_per_block": 2,
        "out_channels": 4, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "sample_size": 64,
    }  # fmt: skip
    sd1 = SD_PRESETS["sd1"]()
    assert config_from_diffusers(sd1_unet) == sd1.unet
    assert (sd1.image_size, sd1.unet.context_dim, sd1.diffusion.prediction_type) == (512, 768, "eps")
    assert (sd1.diffusion.timestep_spacing, sd1.diffusion.steps_offset, sd1.diffusion.schedule) == ("leading", 1, "scaled_linear")
    sd2 = SD_PRESETS["sd2"]()
    sd2_unet = sd1_unet | {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True}
    assert config_from_diffusers(sd2_unet) == sd2.unet
    assert (sd2.image_size, sd2.diffusion.prediction_type) == (768, "v")


# ---- the original single-file format: full-size key maps on the meta device


@pytest.mark.parametrize("preset", ["sd1", "sd2"])
def test_full_size_key_maps_agree_with_diffusers_conversion(preset):
    """Every ldmkit key of the real SD U-Net and VAE gets an original name, and diffusers' own
    single-file conversion turns those names back into exactly the diffusers model's keys and shapes."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from ldmkit.interop.diffusers import vae_config_to_diffusers
    from ldmkit.interop.diffusers_unet import config_to_diffusers
    from ldmkit.unet import UNet

    cfg = SD_PRESETS[preset]()
    with torch.device("meta"):
        unet, ae = UNet(cfg.unet), AutoencoderKL(cfg.autoencoder)
        d_unet = diffusers.UNet2DConditionModel(**config_to_diffusers(cfg.unet))
        d_vae = diffusers.AutoencoderKL(**vae_config_to_diffusers(cfg.autoencoder))
    key_map = orig.unet_key_map(cfg.unet)
    assert sorted(key_map) == sorted(unet.state_dict()) and len(set(key_map.values())) == len(key_map) == 686
    own = unet.state_dict()
    file = {orig.UNET_PREFIX + o: own[k] for k, o in key_map.items()}
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in file  # diffusers' SD-v1 marker
    converted = convert_ldm_unet_checkpoint(file, dict(d_unet.config))
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in d_unet.state_dict().items()}
    vfile = {orig.VAE_PREFIX + k: v for k, v in orig.vae_to_original(ae.state_dict(), cfg.autoencoder).items()}
    assert len(vfile) == 248 and vfile["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    vconverted = convert_ldm_vae_checkpoint(vfile, dict(d_vae.config))
    assert {k: v.shape for k, v in vconverted.items()} == {k: v.shape for k, v in d_vae.state_dict().items()}
    # and the architecture is read back from the weights alone (SD's heads and 0.18215 by convention)
    assert orig.infer_unet_config({o: own[k] for k, o in key_map.items()}) == cfg.unet
    assert orig.infer_vae_config({k.removeprefix(orig.VAE_PREFIX): v for k, v in vfile.items()}) == cfg.autoencoder


# ---- the original single-file format with tiny models: diffusers' single-file loaders read ours


def test_original_file_loads_in_diffusers_single_file_loaders(sd_folder, ref_pipe, tmp_path):
    """ldmkit writes the file; diffusers' own from_single_file (offline, config = the local folder)
    rebuilds exactly the source pipeline's weights."""
    ldm = load_diffusers_pipeline(sd_folder)
    path = orig.save_original(ldm, tmp_path / "sd.safetensors")
    kw = dict(config=str(sd_folder), local_files_only=True)
    unet = diffusers.UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **kw)
    vae = diffusers.AutoencoderKL.from_single_file(str(path), subfolder="vae", **kw)
    assert same_state(unet.state_dict(), ref_pipe.unet.state_dict())
    assert same_state(vae.state_dict(), ref_pipe.vae.state_dict())
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(path), safety_checker=None, **kw)
    for name in ("unet", "vae", "text_encoder"):
        assert same_state(getattr(pipe, name).state_dict(), getattr(ref_pipe, name).state_dict()), name
    z, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 32)
    with torch.no_grad():
        assert max_diff(pipe.unet(z, t, encoder_hidden_states=ctx).sample, ldm.unet(z, t, context=ctx)) <= 1e-5
        assert max_diff(pipe.vae.decode(z).sample, ldm.autoencoder.decode(z)) <= 1e-4


def test_original_file_without_ldmkit_metadata_loads_with_a_config_folder(sd_folder, ref_pipe, tmp_path):
    """A file as other tools write it (a .ckpt pickle of tensors under "state_dict", no ldmkit
    metadata, DDPM buffers and an EMA copy alongside): read with the diffusers folder as config."""
    ldm = load_diffusers_pipeline(sd_folder)
    sd, _ = orig.to_original_state_dict(ldm)
    sd = {k: v.half() for k, v in sd.items()}  # fp16, as distributed
    sd["alphas_cumprod_prev"] = torch.ones(1000)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000}, path)
    back = orig.load_original(path, config=sd_folder)
    assert back.config.model_dump(exclude={"conditioner"}) == ldm.config.model_dump(exclude={"conditioner"})
    z, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    ctx, _ = back.conditioner.text_encoder(["a cat"])
    with torch.no_grad():
        ref_ctx = ref_pipe.encode_prompt("a cat", "cpu", 1, False)[0]
        assert max_diff(ctx, ref_ctx) <= 1e-2  # fp16 weights
        assert max_diff(back.unet(z, t, context=ctx), ref_pipe.unet(z, t, encoder_hidden_states=ctx).sample) <= 1e-2
    # without a config what the weights do not say (GroupNorm groups of this 16-wide VAE, the heads of
    # this non-SD U-Net) is refused, not guessed
    with pytest.raises(LdmkitError, match="VAE widths \\[16, 32\\] do not fit CompVis' 32 GroupNorm groups; pass config="):
        orig.load_original(path)
    with pytest.raises(LdmkitError, match="attention heads is not stored"):
        orig.infer_unet_config({k.removeprefix(orig.UNET_PREFIX): v for k, v in sd.items() if k.startswith(orig.UNET_PREFIX)})


def test_original_reader_matches_diffusers_conversion(sd_folder, ref_pipe):
    """The other direction, on a file not written by our writer's code path: a state dict in
    original names built from diffusers' own inverse tables is read by ldmkit into the same weights."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ldm = load_diffusers_pipeline(sd_folder)
    sd, _ = orig.to_original_state_dict(ldm)
    converted = convert_ldm_unet_checkpoint(sd, dict(ref_pipe.unet.config))
    assert same_state(converted, ref_pipe.unet.state_dict())


def test_openclip_layout_matches_diffusers_sd2_text_encoder_conversion():
    """SD 2's OpenCLIP layout: fused q/k/v, one more (unused) block than diffusers' 23-layer model."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    model = perturb(tiny_clip(200, layers=23, act="gelu"), seed=5)
    ours = orig.clip_canonical(model)
    file = orig.clip_to_original(ours, "openclip")
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in file
    theirs = convert_open_clip_checkpoint(model, file)
    assert same_state({k.removeprefix("text_model."): v for k, v in theirs.items()}, ours)
    back, layout, consumed = orig.clip_from_original(file)
    assert layout == "openclip" and same_state(back, ours) and consumed == set(file)  # incl. the unused parts


def test_ema_weights_are_taken_when_asked(sd_folder, tmp_path):
    ldm = load_diffusers_pipeline(sd_folder)
    sd, meta = orig.to_original_state_dict(ldm)
    for k in [k for k in sd if k.startswith(orig.UNET_PREFIX)]:
        sd["model_ema." + k.removeprefix("model.").replace(".", "")] = sd[k] + 1
    path = tmp_path / "ema.ckpt"
    torch.save({"state_dict": sd, "ldmkit": json.dumps(meta)}, path)
    plain, ema = orig.load_original(path), orig.load_original(path, ema=True)
    w = "conv_in.weight"
    assert torch.equal(plain.unet.state_dict()[w], ldm.unet.state_dict()[w])
    assert torch.equal(ema.unet.state_dict()[w], ldm.unet.state_dict()[w] + 1)


def test_standalone_vae_file(tmp_path):
    ref = tiny_diffusers_vae()
    ae = from_diffusers(ref)
    path = orig.save_original(ae, tmp_path / "vae.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert "encoder.mid.attn_1.q.weight" in f.keys() and "quant_conv.weight" in f.keys()
    back = orig.load_original(path)
    assert back.config == ae.config and same_state(back.state_dict(), ae.state_dict())
    ref.save_config(str(tmp_path / "vae_config"))  # diffusers' loader takes its config from a folder
    theirs = diffusers.AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "vae_config"), local_files_only=True)
    assert same_state(theirs.state_dict(), ref.state_dict())


def test_penultimate_layer_text_encoder_is_written_as_diffusers_runs_it(sd_folder, tmp_path):
    """SD 2 conditions on CLIP's penultimate layer; diffusers' SD 2 text_encoder/ simply has one layer
    fewer. An ldmkit CLIPTextEncoder(skip_last_layer=True) is written that way, with equal outputs."""
    from ldmkit.conditioning.conditioner import Conditioner
    from ldmkit.conditioning.text import CLIPTextEncoder

    enc = CLIPTextEncoder(str(sd_folder / "text_encoder"), skip_last_layer=True)  # tokenizer: the sibling folder
    assert Path(enc.tokenizer_path) == sd_folder / "tokenizer"
    ldm = load_diffusers_pipeline(sd_folder)
    ldm.conditioner = Conditioner(ldm.config.conditioner, text_encoder=enc)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(save_diffusers_pipeline(ldm, tmp_path / "sd2")))
    assert pipe.text_encoder.config.num_hidden_layers == enc.model.config.num_hidden_layers - 1
    with torch.no_grad():
        assert max_diff(enc(["a cat"])[0], pipe.encode_prompt("a cat", "cpu", 1, False)[0]) == 0


def test_w_embedded_unet_matches_diffusers_time_cond_proj():
    """A guidance-distilled student's w-embedding (LCM): diffusers' UNet2DConditionModel with time_cond_proj_dim,
    fed the LCM pipeline's own guidance-scale embedding of (g − 1), equals ldmkit's U-Net given the scale g; the
    config and weights round-trip, and no scale means no w term on both sides."""
    from ldmkit.conditioning import Cond

    torch.manual_seed(4)
    d = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, time_cond_proj_dim=16,
    )  # fmt: skip
    perturb(d.eval(), seed=5)
    ours = from_diffusers(d)
    assert ours.config.time_cond_proj_dim == 16
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 5, 32)
    g = torch.tensor([1.0, 4.5])
    emb = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, g - 1, embedding_dim=16)
    with torch.no_grad():
        ref = d(x, t, encoder_hidden_states=ctx, timestep_cond=emb).sample
        out = ours(x, t, Cond(context=ctx, guidance=g))
        assert max_diff(out, ref) < 1e-4
        assert max_diff(ours(x, t, Cond(context=ctx)), d(x, t, encoder_hidden_states=ctx).sample) < 1e-4
        assert max_diff(out, ours(x, t, Cond(context=ctx, guidance=g + 1))) > 1e-3  # the scale is used
    back = to_diffusers(ours)
    assert back.config.time_cond_proj_dim == 16 and same_state(back.state_dict(), d.state_dict())
    with pytest.raises(LdmkitError, match="no w-embedding"):
        from_diffusers(diffusers.UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
        ))(x, t, Cond(context=ctx, guidance=g))  # fmt: skip
