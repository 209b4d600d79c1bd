"""SDXL (Podell et al., 2023) pinned to diffusers: the U-Net's text_time vector route and per-level transformer
depth (UNet2DConditionModel), the two text encoders (StableDiffusionXLPipeline.encode_prompt), the pipeline
folder both ways, and a whole sampling run. Tiny random models built here; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from ldmkit.conditioning.conditioner import sdxl_vector  # noqa: E402
from ldmkit.errors import LdmkitError  # noqa: E402
from ldmkit.interop.diffusers_unet import (  # noqa: E402
    config_from_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
)
from ldmkit.unet import UNET_PRESETS, UNet  # noqa: E402

POOLED, CTX = 24, 32 + 24  # tiny "bigG" projection width; context = tiny "ViT-L" 32 + tiny "bigG" 24


def perturb(module, scale=0.05, seed=0):
    """Random nudges to every weight, so zero-initialised layers do not hide mapping mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def tiny_sdxl_unet(**kw):
    """SDXL's layout in small: no attention at the first level, per-level depth (1, 2) (the middle block
    takes the last level's), 8-channel heads given per level, linear projections, text_time."""
    base = dict(
        sample_size=8, block_out_channels=(16, 32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        cross_attention_dim=CTX, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=POOLED + 6 * 256,
    )  # fmt: skip
    torch.manual_seed(0)
    return perturb(diffusers.UNet2DConditionModel(**(base | kw)), seed=1)


def unet_inputs(b=2, h=8, w=12, seed=3):
    """A non-square latent, two timesteps, a 7-token context, pooled embeddings and SDXL time_ids."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, h, w, generator=g)
    t = torch.tensor([10, 700])[:b]
    ctx = torch.randn(b, 7, CTX, generator=g)
    pooled = torch.randn(b, POOLED, generator=g)
    time_ids = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0], [1024.0, 768.0, 16.0, 8.0, 512.0, 768.0]])[:b]
    return x, t, ctx, pooled, time_ids


def public(config) -> dict:
    """A diffusers config as its config.json holds it (lists, not tuples), without bookkeeping entries."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def tiny_tokenizer(pad: str | None = None):
    """A real CLIP BPE tokenizer over printable ASCII with two merges ("c a", "ca t</w>"); SDXL's second
    tokenizer pads with "!" (id 0) where the first pads with its end token."""
    chars = [chr(i) for i in range(33, 127)]
    vocab = chars + [c + "</w>" for c in chars] + ["ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    kw = {"pad_token": pad} if pad else {}
    return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[("c", "a"), ("ca", "t</w>")],
                                      model_max_length=16, **kw)


def tiny_text_encoders(vocab_size: int):
    """A tiny CLIP "ViT-L" (32 wide) and a tiny OpenCLIP "bigG" with projection (24 wide, projected to 24)."""
    common = dict(vocab_size=vocab_size, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                  max_position_embeddings=16, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1)
    torch.manual_seed(4)
    te1 = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_size=32, hidden_act="quick_gelu",
                                                                 pad_token_id=vocab_size - 1, **common))
    te2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=24, projection_dim=POOLED, hidden_act="gelu", pad_token_id=0, **common))
    return te1.eval(), te2.eval()


def tiny_sdxl_parts():
    tok1, tok2 = tiny_tokenizer(), tiny_tokenizer(pad="!")
    te1, te2 = tiny_text_encoders(len(tok1))
    torch.manual_seed(5)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
        scaling_factor=0.13025, force_upcast=True,
    )  # fmt: skip
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
        timestep_spacing="leading", prediction_type="epsilon",
    )  # fmt: skip
    return dict(vae=perturb(vae, seed=6), text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                unet=tiny_sdxl_unet(), scheduler=scheduler)


def tiny_sdxl_pipeline():
    return diffusers.StableDiffusionXLPipeline(**tiny_sdxl_parts(), add_watermarker=False)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "pipe"
    tiny_sdxl_pipeline().save_pretrained(str(folder))
    return folder


# ---- U-Net


def test_unet_config_translates_text_time_and_per_level_depth():
    cfg = config_from_diffusers(tiny_sdxl_unet().config)
    assert cfg.vector_dim == POOLED + 6 * 256
    assert cfg.transformer_depth == (1, 1, 2) and cfg.attention_levels == (1, 2) and cfg.head_dim == 8
    assert [cfg.depth_at(i) for i in range(3)] == [1, 1, 2]


def test_unet_matches_diffusers_text_time():
    theirs = tiny_sdxl_unet()
    ours = unet_from_diffusers(theirs).eval()
    assert [len(b.attentions[0].transformer_blocks) for b in ours.up_blocks[:2]] == [2, 1]  # decoder: mirrored
    assert len(ours.mid_block.attentions[0].transformer_blocks) == 2
    x, t, ctx, pooled, time_ids = unet_inputs()
    with torch.no_grad():
        ref = theirs(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        out = ours(x, t, context=ctx, vector=sdxl_vector(pooled, time_ids))
        # the vector route is live: other micro-conditions give another output
        other = ours(x, t, context=ctx, vector=sdxl_vector(pooled, time_ids.flip(0)))
    assert 0.1 < ref.std() < 10
    assert (ref - out).abs().max().item() <= 1e-4
    assert (other - out).abs().max().item() > 1e-3


def test_unet_round_trip_is_lossless():
    theirs = tiny_sdxl_unet()
    back = unet_to_diffusers(unet_from_diffusers(theirs), sample_size=8)
    a, b = theirs.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert public(back.config) == public(theirs.config)


def test_full_size_sdxl_key_map():
    """SDXL base's real U-Net config (diffusers' stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, on
    the meta device): it is the `sdxl` preset, 2.57 B parameters, every key maps with its shape."""
    dkw = dict(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=[5, 10, 20],
        transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, cross_attention_dim=2048,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )  # fmt: skip
    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(**dkw)
        assert config_from_diffusers(theirs.config) == UNET_PRESETS["sdxl"](zero_init=False)
        ours = unet_from_diffusers(theirs)
        back = unet_to_diffusers(ours, sample_size=128)
    assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684
    assert {k: v.shape for k, v in back.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert {**back.config, "_use_default_values": None} == {**theirs.config, "_use_default_values": None}


def test_unet_refuses_what_it_cannot_represent():
    base = dict(tiny_sdxl_unet().config)
    for key, value, words in [
        ("addition_time_embed_dim", 128, "addition_time_embed_dim=128"),
        ("transformer_layers_per_block", [[1, 1], [1, 2], [2, 2]], "a depth per transformer"),
        ("addition_embed_type", "text_image", "addition_embed_type='text_image'"),
    ]:
        with pytest.raises(LdmkitError, match=words):
            config_from_diffusers(base | {key: value})


def test_old_vector_embedding_weights_load(tmp_path):
    """Checkpoints written before the vector route took diffusers' name (`vector_embedding`) still load, through
    load_state_dict and through the checkpoint reader's strict key check."""
    from safetensors.torch import save_file

    from ldmkit.checkpoint import load_weights

    ours = unet_from_diffusers(tiny_sdxl_unet())
    sd = {k.replace("add_embedding.", "vector_embedding."): v for k, v in ours.state_dict().items()}
    assert any(k.startswith("vector_embedding.") for k in sd)
    fresh = UNet(ours.config)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.add_embedding.linear_1.weight, ours.add_embedding.linear_1.weight)
    save_file({f"unet.{k}": v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    holder = torch.nn.Module()
    holder.unet = UNet(ours.config)
    load_weights(holder, tmp_path / "w.safetensors")
    assert torch.equal(holder.unet.add_embedding.linear_2.bias, ours.add_embedding.linear_2.bias)


# ---- text encoders


def _encoder(pipe):
    from ldmkit.conditioning.text import CLIPPenultimateEncoder, SDXLTextEncoder

    return SDXLTextEncoder(CLIPPenultimateEncoder.from_parts(pipe.text_encoder, pipe.tokenizer),
                           CLIPPenultimateEncoder.from_parts(pipe.text_encoder_2, pipe.tokenizer_2))


@pytest.mark.parametrize("syntax", [False, True])
def test_prompt_and_pooled_embeddings_match_encode_prompt(syntax):
    """Contexts (both penultimate layers, concatenated) and bigG's pooled embedding equal diffusers' encode_prompt,
    for plain prompts read as text or in A1111 syntax (the same for a prompt without syntax), with a negative."""
    from ldmkit.conditioning.conditioner import Conditioner, ConditionerConfig

    pipe = tiny_sdxl_pipeline()
    enc = _encoder(pipe)
    assert enc.dim == CTX and enc.pooled_dim == POOLED
    prompts, negatives = ["a cat", "two dogs on grass"], ["blurry", ""]
    with torch.no_grad():
        pe, ne, pp, npool = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=True, negative_prompt=negatives)
    cond = Conditioner(ConditionerConfig(pooled_text=True, micro_conditioning=True), text_encoder=enc)
    assert cond.vector_dim == POOLED + 6 * 256
    size_crop = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]]).expand(2, -1)
    c = cond(texts=prompts, size_crop=size_crop, prompt_syntax=syntax)
    u = cond(texts=negatives, size_crop=size_crop, prompt_syntax=syntax)
    assert c.context.shape == pe.shape == (2, 16, CTX)
    assert (c.context - pe).abs().max() <= 1e-5 and (u.context - ne).abs().max() <= 1e-5
    assert (c.vector[:, :POOLED] - pp).abs().max() <= 1e-5 and (u.vector[:, :POOLED] - npool).abs().max() <= 1e-5
    assert torch.equal(c.vector, sdxl_vector(c.vector[:, :POOLED], size_crop))
    assert pp.abs().max() > 0.1 and (pp[0] - pp[1]).abs().max() > 1e-3  # the pooled output is live


def test_empty_negative_prompt_gives_zeros_as_diffusers():
    """force_zeros_for_empty_prompt: without a negative prompt the unconditional text is zeros (context and
    pooled), the micro-conditions stay; an explicit "" is encoded (diffusers' rule: negative_prompt is None)."""
    from ldmkit.conditioning.conditioner import Conditioner, ConditionerConfig

    pipe = tiny_sdxl_pipeline()
    assert pipe.config.force_zeros_for_empty_prompt
    with torch.no_grad():
        pe, ne, pp, npool = pipe.encode_prompt(["a cat"], device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=True, negative_prompt=None)
        _, ne_empty, _, np_empty = pipe.encode_prompt(["a cat"], device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True, negative_prompt="")
    cfg = ConditionerConfig(pooled_text=True, micro_conditioning=True, zero_uncond=True)
    cond = Conditioner(cfg, text_encoder=_encoder(pipe))
    size_crop = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]])
    u = cond.uncond(1, size_crop)
    assert torch.equal(ne, torch.zeros_like(ne)) and u.context.shape == ne.shape and torch.equal(u.context, ne)
    assert torch.equal(u.vector, sdxl_vector(torch.zeros(1, POOLED), size_crop))
    explicit = cond(texts=[""], size_crop=size_crop)
    assert (explicit.context - ne_empty).abs().max() <= 1e-5 and ne_empty.abs().max() > 0.1
    assert (explicit.vector[:, :POOLED] - np_empty).abs().max() <= 1e-5


def test_long_prompt_in_syntax_is_chunked_by_both_encoders():
    """Past the window, each encoder chunks the prompt; the pooled vector is that of the first chunk (A1111)."""
    pipe = tiny_sdxl_pipeline()
    enc = _encoder(pipe)
    long = "cat " * 20  # 20 tokens: two chunks of 14 in a 16-token window
    ctx, mask = enc([long], syntax=True)
    assert ctx.shape == (1, 32, CTX) and bool(mask.all())
    first = long.split()[:14]
    with torch.no_grad():
        pe, _, pp, _ = pipe.encode_prompt(" ".join(first), device="cpu", num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
    assert (ctx[:, :16] - pe).abs().max() <= 1e-5
    assert (enc.pooled([long], syntax=True) - pp).abs().max() <= 1e-5


# ---- the diffusers pipeline folder


def _state(module) -> dict:
    return {k: v for k, v in module.state_dict().items()}


def test_pipeline_folder_round_trip_is_lossless(sdxl_folder, tmp_path):
    """StableDiffusionXLPipeline folder → ldmkit → folder: every weight of every part identical, and diffusers reads
    the written folder as an SDXL pipeline with the zero-negative rule kept."""
    import ldmkit
    from ldmkit.conditioning.text import SDXLTextEncoder
    from ldmkit.interop.diffusers import save_diffusers_pipeline

    ldm = ldmkit.load(sdxl_folder)
    enc = ldm.conditioner.text_encoder
    assert isinstance(enc, SDXLTextEncoder)
    c = ldm.config.conditioner
    assert c.pooled_text and c.micro_conditioning and c.zero_uncond
    assert ldm.config.autoencoder.scaling_factor == 0.13025 and ldm.config.image_size == 16  # 8 latents · f = 2
    assert ldm.conditioner.vector_dim == ldm.unet.config.vector_dim == POOLED + 6 * 256
    out = save_diffusers_pipeline(ldm, tmp_path / "back")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), local_files_only=True)
    back = diffusers.StableDiffusionXLPipeline.from_pretrained(str(out), local_files_only=True)
    assert back.config.force_zeros_for_empty_prompt
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = _state(getattr(ref, part)), _state(getattr(back, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert back.tokenizer_2.pad_token == "!" and back.tokenizer.get_vocab() == ref.tokenizer.get_vocab()
    again = ldmkit.load(out)  # and ldmkit reads its own folder as it wrote it
    assert again.config == ldm.config.model_copy(update={"conditioner": again.config.conditioner})


@pytest.mark.parametrize("drop", ["text_encoder_2", "tokenizer_2"])
def test_folder_without_a_text_part_names_it(sdxl_folder, tmp_path, drop):
    import shutil

    import ldmkit

    broken = tmp_path / "broken"
    shutil.copytree(sdxl_folder, broken)
    shutil.rmtree(broken / drop)
    with pytest.raises(LdmkitError, match=rf"without {drop}/: SDXL needs both text encoders") as err:
        ldmkit.load(broken)
    assert "\n" not in str(err.value)


# ---- sampling


TOL = 2 / 255 * 2  # 2/255 of [0, 1] in ldmkit's [-1, 1]


@pytest.mark.parametrize("sampler,negative", [("ddim", None), ("ddim", ["blurry", "a"]), ("euler", None)])
def test_generate_at_a_non_square_size_matches_diffusers(sdxl_folder, sampler, negative):
    """A whole generation at 16×24 (the tiny model's 768×1152): ldmkit's `generate` against diffusers'
    StableDiffusionXLPipeline given only the seed, DDIM (or Euler: SDXL's own EulerDiscreteScheduler), 3 steps,
    guidance 5; micro-conditions original = target = (16, 24), crop (0, 0) on both sides; without a negative
    prompt both guide against zeros."""
    from ldmkit.generation import GenerationRequest, generate
    from ldmkit.interop.diffusers import load_diffusers_pipeline

    ldm = load_diffusers_pipeline(sdxl_folder)
    parts = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), local_files_only=True).components
    ddim = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False,
        set_alpha_to_one=False, timestep_spacing="leading",
    )  # fmt: skip
    pipe = diffusers.StableDiffusionXLPipeline(**(parts | ({"scheduler": ddim} if sampler == "ddim" else {})),
                                               add_watermarker=False)
    prompts = ["a cat", "two cats"]
    final = ldm.schedule.alphas_cumprod[0].item()  # set_alpha_to_one=False: the last step ends at ᾱ_0
    options = {"final_alpha_cumprod": final} if sampler == "ddim" else {}
    ours = generate(ldm, GenerationRequest(prompt=prompts, negative_prompt=negative, batch_size=2, height=16, width=24,
                                           steps=3, guidance=5.0, sampler=sampler, seed=0,
                                           sampler_options=options)).images
    ref = pipe(prompts, negative_prompt=negative, height=16, width=24, num_inference_steps=3, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images  # (B, 3, H, W) in [0, 1]
    assert ours.shape == ref.shape == (2, 3, 16, 24)
    assert (ours - (ref * 2 - 1)).abs().max() <= TOL
    assert ref.std() > 0.05


def test_size_below_the_granularity_is_one_line(sdxl_folder):
    from ldmkit.generation import GenerationRequest, generate
    from ldmkit.interop.diffusers import load_diffusers_pipeline

    ldm = load_diffusers_pipeline(sdxl_folder)
    with pytest.raises(LdmkitError, match=r"height 4 is not a multiple of 8.*use 8$") as err:
        generate(ldm, GenerationRequest(prompt="a cat", height=4, width=16, steps=1, seed=0))
    assert "\n" not in str(err.value)


def test_convert_through_an_ldmkit_folder_is_lossless(sdxl_folder, tmp_path):
    """`ldmkit convert`: diffusers → ldmkit (both text encoders kept inside the checkpoint, found again after
    it moves) → diffusers, every weight identical."""
    import shutil

    from ldmkit.interop.convert import convert

    convert(sdxl_folder, tmp_path / "ours", "ldmkit")
    shutil.move(tmp_path / "ours", tmp_path / "moved")
    convert(tmp_path / "moved", tmp_path / "back", "diffusers")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), local_files_only=True)
    back = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "back"), local_files_only=True)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = _state(getattr(ref, part)), _state(getattr(back, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_sdxl_preset_is_what_the_real_base_folder_describes(tmp_path):
    """stabilityai/stable-diffusion-xl-base-1.0's model_index.json and configs (written here, no weights): they
    translate to the `sdxl` preset (U-Net, VAE at 0.13025, SD's schedule, 1024 px, the SDXL conditioner)."""
    import json

    from ldmkit.interop.diffusers import pipeline_config
    from ldmkit.interop.presets import SD_PRESETS

    folder = tmp_path / "sdxl-base"
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    unet = {"_class_name": "UNet2DConditionModel", "sample_size": 128, "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
            "cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816, "layers_per_block": 2, "in_channels": 4, "out_channels": 4}
    vae = {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512], "latent_channels": 4,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025,
           "force_upcast": True}
    scheduler = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
                 "timestep_spacing": "leading", "use_karras_sigmas": False}
    for name, cfg in {"": index, "unet": unet, "vae": vae, "scheduler": scheduler}.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / ("scheduler_config.json" if name == "scheduler" else
                          "model_index.json" if not name else "config.json")).write_text(json.dumps(cfg))
    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        (folder / name).mkdir()
    cfg, _ = pipeline_config(folder)
    assert cfg == SD_PRESETS["sdxl"](text_encoder=str(folder.resolve()))
    assert cfg.image_size == 1024 and cfg.autoencoder.scaling_factor == 0.13025


def test_sdxl_embedding_matches_diffusers_load_textual_inversion(tmp_path):
    """An SDXL textual-inversion file ({"clip_l": (n, 32), "clip_g": (n, 24)} here; (n, 768) and (n, 1280) in real
    ones) read from --embeddings-dir: each encoder puts in its own vectors, so the prompt's contexts and pooled
    embedding equal diffusers' after `load_textual_inversion` of each part into its encoder (the two-call form
    diffusers documents for SDXL). An SD 1/2 embedding on SDXL is refused by name in one line."""
    from safetensors.torch import save_file

    from ldmkit.conditioning.conditioner import Conditioner, ConditionerConfig
    from ldmkit.conditioning.embeddings import attach_embeddings

    g = torch.Generator().manual_seed(8)
    vecs = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 24, generator=g)}
    save_file(vecs, str(tmp_path / "mytok.safetensors"))
    save_file({"emb_params": torch.randn(1, 32, generator=g)}, str(tmp_path / "old15.safetensors"))
    pipe = tiny_sdxl_pipeline()
    cond = Conditioner(ConditionerConfig(pooled_text=True, micro_conditioning=True), text_encoder=_encoder(pipe))
    size_crop = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
    plain = cond(texts=["a mytok cat"], size_crop=size_crop, prompt_syntax=True)  # before: the name is text
    library = attach_embeddings(cond, tmp_path)
    assert library.names() == ["mytok"] and "SD 1/2 embedding" in library.problems()["old15"]
    ours = cond(texts=["a mytok cat"], size_crop=size_crop, prompt_syntax=True)
    pipe.load_textual_inversion(vecs["clip_l"], token="mytok", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vecs["clip_g"], token="mytok", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        pe, _, pp, _ = pipe.encode_prompt("a mytok cat", device="cpu", num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
    assert (ours.context - pe).abs().max() <= 1e-5 and (ours.vector[:, :POOLED] - pp).abs().max() <= 1e-5
    assert (plain.context - ours.context).abs().max() > 1e-2  # the vectors went in
    with pytest.raises(LdmkitError, match=r"embedding 'old15' .* is an SD 1/2 embedding .*use one made for SDXL") as e:
        cond(texts=["old15 cat"], size_crop=size_crop, prompt_syntax=True)
    assert "\n" not in str(e.value)


def test_pooled_embedding_while_the_encoders_train():
    """With `trains` set (text-encoder fine-tuning), the pooled embedding is encoded anew each call, equal to the
    cached one, and carries the graph to bigG's projection; nothing cached from moving weights is reused."""
    enc = _encoder(tiny_sdxl_pipeline())
    cached = enc.pooled(["a cat", "dog"])
    enc.trains = True
    enc.second.model.requires_grad_(True)
    fresh = enc.pooled(["a cat", "dog"])
    assert torch.allclose(fresh, cached, atol=1e-6) and fresh.requires_grad and not enc._pooled
    fresh.sum().backward()
    proj = enc.second.model.text_projection.weight
    # d Σ pooled / d W_proj = 1 ⊗ Σ_b normed end-token state: every row the same
    assert proj.grad is not None and torch.allclose(proj.grad, proj.grad[:1].expand_as(proj.grad))


def test_negative_micro_conditioning_matches_diffusers(sdxl_folder):
    """SDXL's negative micro-conditioning (diffusers' `negative_original_size` …): the unconditional branch gets
    its own size values. diffusers' StableDiffusionXLPipeline reads them only when negative_original_size and
    negative_target_size are both given, and then takes the negative crop as (0, 0) unless given; ldmkit's every
    negative_* defaults to its positive (16, 24 and 2, 4 here), so passing diffusers those is the same request."""
    from ldmkit.generation import GenerationRequest, generate
    from ldmkit.interop.diffusers import load_diffusers_pipeline

    ldm = load_diffusers_pipeline(sdxl_folder)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), local_files_only=True)
    kw = dict(prompt=["a cat"], height=16, width=24, steps=2, guidance=5.0, sampler="euler", seed=0)
    micro = dict(original_size=(32, 40), crops_coords_top_left=(2, 4), negative_original_size=(8, 12))
    ours = generate(ldm, GenerationRequest(**kw, **micro)).images
    plain = generate(ldm, GenerationRequest(**kw, original_size=(32, 40), crops_coords_top_left=(2, 4))).images
    ref = pipe(["a cat"], height=16, width=24, num_inference_steps=2, guidance_scale=5.0, **micro,
               negative_target_size=(16, 24), negative_crops_coords_top_left=(2, 4), generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert (ours - (ref * 2 - 1)).abs().max() <= TOL
    assert (ours - plain).abs().max() > 10 * TOL  # the negative values reach the unconditional branch


def test_micro_conditioning_refusals_are_one_line(sdxl_folder):
    from ldmkit.generation import GenerationRequest
    from ldmkit.generation.request import micro_option
    from ldmkit.interop.diffusers import load_diffusers_pipeline

    ldm = load_diffusers_pipeline(sdxl_folder)
    for kw, words in [({"aesthetic_score": 7.0}, "only an SDXL refiner"), ({"original_size": (16,)}, r"\(height, width\)"),
                      ({"negative_crops_coords_top_left": (-1, 0)}, r"\(top, left\)")]:
        with pytest.raises(LdmkitError, match=words):
            GenerationRequest(prompt="a", **kw).check(ldm)
    assert micro_option("negative_original_size=512x768") == ("negative_original_size", (512, 768))
    assert micro_option("aesthetic-score=6.5") == ("aesthetic_score", 6.5)
    with pytest.raises(LdmkitError, match="NAME one of original_size"):
        micro_option("size=3x4")


def test_sample_micro_option_is_the_request_field(sdxl_folder, tmp_path, capsys):
    """`ldmkit sample --micro NAME=VALUE` sets that GenerationRequest field: the PNG equals `generate`'s with it;
    a bad value is one line on stderr, exit 2."""
    import numpy as np
    from PIL import Image

    from ldmkit.cli import main
    from ldmkit.generation import GenerationRequest, generate
    from ldmkit.imageio import to_uint8
    from ldmkit.interop.diffusers import load_diffusers_pipeline

    args = ["sample", "--checkpoint", str(sdxl_folder), "--prompt", "a cat", "--steps", "2", "--guidance", "5",
            "--sampler", "euler", "--width", "24", "--height", "16", "--precision", "fp32", "--quiet",
            "--out", str(tmp_path / "o")]  # fp32: compared with generate() outside autocast
    assert main(args + ["--micro", "negative_original_size=8x12", "--micro", "crops_coords_top_left=2x4"]) == 0
    got = np.asarray(Image.open(tmp_path / "o" / "0000.png"))
    want = generate(load_diffusers_pipeline(sdxl_folder), GenerationRequest(
        prompt="a cat", steps=2, guidance=5.0, sampler="euler", width=24, height=16, seed=0,
        negative_original_size=(8, 12), crops_coords_top_left=(2, 4))).images[0]
    assert np.array_equal(got, to_uint8(want))
    assert main(args + ["--micro", "original_size=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loaders' progress bars
    assert err.startswith("ldmkit: error: --micro 'original_size=16': original_size takes HxW")
