"""SDXL's original single-file layout (Stability's `sgm`: `model.diffusion_model.*` with `label_emb`,
`conditioner.embedders.0/1.*`, `first_stage_model.*`), pinned to diffusers' own single-file converters
(`diffusers.loaders.single_file_utils`, called on the state dicts: nothing is downloaded)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from test_interop import perturb  # noqa: E402
from test_sdxl import sdxl_folder  # noqa: E402, F401 - the fixture (a tiny StableDiffusionXLPipeline folder)

from ldmkit.interop import original_clip as oclip  # noqa: E402
from ldmkit.interop import original_keys as okeys  # noqa: E402




def same_state(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---- tiny SDXL parts (diffusers / transformers, random weights)

TINY_UNET = dict(
    sample_size=8, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=64,
    attention_head_dim=(2, 4), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=40 + 6 * 256,
    use_linear_projection=True, norm_num_groups=8,
)  # fmt: skip  # SDXL in small: no attention at level 0, per-level depth, 40 pooled + 6 x 256 Fourier values

# The real SDXL base U-Net (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json)
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)  # fmt: skip


def tiny_text_encoders(seed=0):
    """(CLIP ViT-L stand-in: CLIPTextModel, quick_gelu; OpenCLIP bigG stand-in: CLIPTextModelWithProjection,
    gelu, with a projection narrower than its width so a transposed text_projection cannot pass)."""
    common = dict(vocab_size=100, intermediate_size=37, max_position_embeddings=16, bos_token_id=98, eos_token_id=99,
                  pad_token_id=99)  # fmt: skip
    torch.manual_seed(seed)
    one = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=2, hidden_act="quick_gelu", projection_dim=32, **common))
    two = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=48, num_attention_heads=4, num_hidden_layers=3, hidden_act="gelu", projection_dim=40, **common))
    return perturb(one.eval(), seed=seed + 1), perturb(two.eval(), seed=seed + 2)


def diffusers_structure(config) -> dict:
    """The structure `unet_module_map` takes, read from a diffusers U-Net config."""
    return dict(
        levels=len(config["block_out_channels"]), n=config["layers_per_block"],
        attention_levels=[i for i, t in enumerate(config["down_block_types"]) if t.startswith("CrossAttn")],
        mid_attention=config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn",
    )  # fmt: skip


def original_unet_file(unet) -> dict:
    """The U-Net's weights under their original names, through ldmkit's structural key map."""
    modules = okeys.unet_module_map(**diffusers_structure(unet.config))
    own = unet.state_dict()
    key_map = okeys._map_keys(list(own), modules)
    assert len(set(key_map.values())) == len(key_map)  # one original name per weight
    return {okeys.UNET_PREFIX + o: own[k] for k, o in key_map.items()}


# ---- the U-Net key map


def test_sdxl_unet_key_map_is_what_diffusers_single_file_conversion_reads():
    """A tiny SDXL-shaped U-Net (text_time addition embedding, no attention at level 0, depths (1, 2)):
    ldmkit's original names, converted back by diffusers' `convert_ldm_unet_checkpoint`, are exactly the
    diffusers weights."""
    torch.manual_seed(0)
    unet = perturb(diffusers.UNet2DConditionModel(**TINY_UNET).eval())
    file = original_unet_file(unet)
    # the sgm names SDXL files use: label_emb for the add embedding, depth 2 inside input_blocks.4.1,
    # level 0's blocks ResBlock-only, the upsampler in slot 2 after an attention and in slot 1 without
    for key in ("label_emb.0.0.weight", "label_emb.0.2.bias", "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                "input_blocks.3.0.op.weight", "middle_block.1.transformer_blocks.1.ff.net.2.weight",
                "output_blocks.2.2.conv.weight", "output_blocks.5.0.skip_connection.weight"):  # fmt: skip
        assert okeys.UNET_PREFIX + key in file, key
    assert not any(k.startswith((okeys.UNET_PREFIX + "input_blocks.1.1.", okeys.UNET_PREFIX + "output_blocks.3.1.")) for k in file)
    converted = sfu.convert_ldm_unet_checkpoint(file, dict(unet.config))
    assert same_state(converted, unet.state_dict())


def test_full_size_sdxl_unet_key_map_agrees_with_diffusers_conversion():
    """The real SDXL base U-Net (2.6 B parameters, on the meta device): every weight gets an original name,
    the names are the ones SDXL files carry, and diffusers' conversion maps them back to its own keys."""
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SDXL_UNET)
    file = original_unet_file(unet)
    assert len(file) == 1680
    assert file[okeys.UNET_PREFIX + "label_emb.0.0.weight"].shape == (1280, 2816)
    assert okeys.UNET_PREFIX + "input_blocks.8.1.transformer_blocks.9.attn1.to_q.weight" in file
    assert okeys.UNET_PREFIX + "output_blocks.0.1.transformer_blocks.9.norm3.bias" in file
    assert okeys.UNET_PREFIX + "output_blocks.5.2.conv.weight" in file
    converted = sfu.convert_ldm_unet_checkpoint(file, dict(unet.config))
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in unet.state_dict().items()}


# ---- the two text encoders


def test_sdxl_text_encoders_match_diffusers_clip_and_open_clip_conversion():
    """embedders.0 in transformers names, embedders.1 in OpenCLIP names (fused in_proj, text_projection
    as (width, proj)); diffusers' converters read both back to the same weights, and so does ldmkit,
    consuming every key (the temperature and the causal mask included)."""
    clip_l, bigg = tiny_text_encoders()
    ours_l, ours_g = oclip.clip_canonical(clip_l), oclip.clip_canonical(bigg)
    file = oclip.sdxl_text_to_original(ours_l, ours_g)
    p = okeys.SDXL_OPENCLIP_PREFIX
    assert file[p + "text_projection"].shape == (48, 40)
    assert file[p + "transformer.resblocks.2.attn.in_proj_weight"].shape == (144, 48)
    assert p + "transformer.resblocks.3.ln_1.weight" not in file  # SDXL keeps the model whole, no stand-in block
    assert sfu.is_clip_sdxl_model(file) and sfu.is_open_clip_sdxl_model(file)
    theirs_l = sfu.convert_ldm_clip_checkpoint(file, remove_prefix="conditioner.embedders.0.transformer.")
    assert same_state({k.removeprefix("text_model."): v for k, v in theirs_l.items()}, ours_l)
    theirs_g = sfu.convert_open_clip_checkpoint(bigg, file, prefix=p)
    assert same_state({k.removeprefix("text_model."): v for k, v in theirs_g.items()}, ours_g)
    extra = {p + "logit_scale": torch.tensor(4.6), p + "attn_mask": torch.zeros(16, 16),
             okeys.SDXL_CLIP_PREFIX + "embeddings.position_ids": torch.arange(16)[None]}  # fmt: skip
    back_l, back_g, consumed = oclip.sdxl_text_from_original(file | extra)
    assert same_state(back_l, ours_l) and same_state(back_g, ours_g)
    assert consumed | set(extra) >= set(file) and not consumed - set(file) - set(extra)


def test_ldmkit_sdxl_unet_writes_the_original_layout_and_reads_its_architecture_back():
    """ldmkit's SDXL U-Net (from the tiny diffusers one): its original-format state dict is what diffusers'
    conversion reads as the diffusers weights, and the architecture (per-level depth, the text_time vector
    width) is read back from the weights alone; the full-size preset's too (SDXL's 64-channel heads assumed)."""
    from ldmkit.interop.diffusers import from_diffusers
    from ldmkit.interop.original import to_original_state_dict
    from ldmkit.unet import UNet, unet_sdxl

    torch.manual_seed(0)
    ref = perturb(diffusers.UNet2DConditionModel(**TINY_UNET).eval())
    unet = from_diffusers(ref)
    file, meta = to_original_state_dict(unet)
    assert meta["kind"] == "unet" and same_state(file, original_unet_file(ref))
    assert same_state(sfu.convert_ldm_unet_checkpoint(file, dict(ref.config)), ref.state_dict())
    weights = {k.removeprefix(okeys.UNET_PREFIX): v for k, v in file.items()}
    heads = dict(num_heads=unet.config.num_heads, head_dim=unet.config.head_dim, norm_groups=unet.config.norm_groups)
    back = okeys.infer_unet_config(weights, **heads)
    want = unet.config.model_copy(update={"zero_init": False})
    # a level without attention has a depth in diffusers' config but no weights that say it: only the
    # depths that exist are read back
    assert back.model_copy(update={"transformer_depth": 1}) == want.model_copy(update={"transformer_depth": 1})
    assert (back.depth_at(1), back.vector_dim, back.attention_levels) == (2, 40 + 6 * 256, (1,))

    cfg = unet_sdxl(zero_init=False)
    with torch.device("meta"):
        big = UNet(cfg)
    key_map = okeys.unet_key_map(cfg)
    assert len(key_map) == len(big.state_dict()) == 1680
    own = big.state_dict()
    assert okeys.infer_unet_config({o: own[k] for k, o in key_map.items()}) == cfg


# ---- whole SDXL files (the tiny StableDiffusionXLPipeline of test_sdxl.py)


def _tensors(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_sdxl_single_file_round_trip_is_lossless_and_diffusers_reads_it(sdxl_folder, tmp_path):  # noqa: F811 - the fixture
    """diffusers folder → ldmkit → single file: diffusers' own `from_single_file` (offline, config = the
    folder) rebuilds every part of the source pipeline exactly; single file → ldmkit → single file is
    bit-identical, and the model read back is the same model."""
    import ldmkit
    from ldmkit.interop.original import load_original, save_original

    ldm = ldmkit.load(sdxl_folder)
    path = save_original(ldm, tmp_path / "xl.safetensors")
    file = _tensors(path)
    p = okeys.SDXL_OPENCLIP_PREFIX
    assert file[p + "text_projection"].shape == (24, 24)  # (width, pooled): OpenCLIP's x @ P
    assert "model.diffusion_model.label_emb.0.0.weight" in file and "first_stage_model.encoder.conv_in.weight" in file
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc2.bias" in file
    kw = dict(config=str(sdxl_folder), local_files_only=True)
    pipe = diffusers.StableDiffusionXLPipeline.from_single_file(str(path), **kw)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), local_files_only=True)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert same_state(getattr(pipe, part).state_dict(), getattr(ref, part).state_dict()), part

    back = load_original(path)
    assert back.config.model_dump(exclude={"conditioner"}) == ldm.config.model_dump(exclude={"conditioner"})
    assert back.config.conditioner.model_dump(exclude={"text_encoder"}) == ldm.config.conditioner.model_dump(exclude={"text_encoder"})
    assert same_state(back.state_dict(), ldm.state_dict())
    again = _tensors(save_original(back, tmp_path / "again.safetensors"))
    assert same_state(again, file)
    enc = back.conditioner.text_encoder
    assert enc.second.tokenizer.pad_token == "!" and enc.first.tokenizer.get_vocab() == ref.tokenizer.get_vocab()


def test_sdxl_file_as_other_tools_write_it_loads_with_a_config_folder(sdxl_folder, tmp_path):  # noqa: F811 - the fixture
    """No ldmkit metadata, fp16, the OpenCLIP temperature and causal mask, CLIP's position_ids and DDPM
    buffers alongside: read with the SDXL diffusers folder as config, the same weights come back."""
    import ldmkit
    from ldmkit.interop.original import load_original, to_original_state_dict

    ldm = ldmkit.load(sdxl_folder)
    sd, _ = to_original_state_dict(ldm)
    sd = {k: v.half() for k, v in sd.items()}
    p = okeys.SDXL_OPENCLIP_PREFIX
    sd |= {p + "logit_scale": torch.tensor(4.6), p + "attn_mask": torch.zeros(16, 16),
           okeys.SDXL_CLIP_PREFIX + "embeddings.position_ids": torch.arange(16)[None], "alphas_cumprod_prev": torch.ones(1000),
           "denoiser.sigmas": torch.ones(1000)}  # fmt: skip
    path = tmp_path / "xl.ckpt"
    torch.save({"state_dict": sd}, path)
    back = load_original(path, config=sdxl_folder)
    assert back.config.model_dump(exclude={"conditioner"}) == ldm.config.model_dump(exclude={"conditioner"})
    ours = ldm.state_dict()
    assert all(torch.equal(v, ours[k].half().float()) for k, v in back.state_dict().items())


def test_text_less_sdxl_file_loads_with_a_config_folder(sdxl_folder, tmp_path):  # noqa: F811 - the fixture
    """An SDXL U-Net + VAE without its text encoders loads with an SDXL folder as config, which gives them (the
    refiner's file: tests/test_sdxl_refiner.py)."""
    from safetensors.torch import save_file

    import ldmkit
    from ldmkit.interop.original import load_original, to_original_state_dict

    ldm = ldmkit.load(sdxl_folder)
    sd, _ = to_original_state_dict(ldm)
    bare = {k: v for k, v in sd.items() if not k.startswith("conditioner.")}
    save_file(bare, str(tmp_path / "unet_vae.safetensors"))  # (its refusal without config: the test below)
    back = load_original(tmp_path / "unet_vae.safetensors", config=sdxl_folder)
    assert same_state(back.state_dict(), ldm.state_dict())


def test_sample_reads_the_sdxl_single_file_as_the_folder(sdxl_folder, tmp_path):  # noqa: F811 - the fixture
    """`ldmkit sample` on the single file and on the folder it came from: the same images, pixel for pixel
    (a non-square size, a negative prompt, a LoRA in both runs)."""
    import numpy as np
    from PIL import Image

    import ldmkit
    from ldmkit.cli import main
    from ldmkit.interop import lora as L
    from ldmkit.interop.original import save_original

    ldm = ldmkit.load(sdxl_folder)
    path = save_original(ldm, tmp_path / "xl.safetensors")
    g = torch.Generator().manual_seed(0)
    lora = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v":
            L.Adapter(0.3 * torch.randn(2, 56, generator=g), 0.3 * torch.randn(32, 2, generator=g), 2.0)}  # fmt: skip
    lora_file = L.save_lora(lora, tmp_path / "l.safetensors", "kohya", ldm)
    images = []
    for src in (sdxl_folder, path):
        out = tmp_path / f"out-{len(images)}"
        assert main(["sample", "--checkpoint", str(src), "--prompt", "a cat", "--negative-prompt", "blurry", "--steps", "3",
                     "--width", "48", "--height", "32", "--seed", "1", "--lora", f"{lora_file}:0.7", "--out", str(out)]) == 0
        images.append(np.asarray(Image.open(out / "0000.png")))
    assert images[0].shape == (32, 48, 3) and np.array_equal(images[0], images[1])


def test_a_vector_route_alone_does_not_make_a_file_sdxl(tmp_path):
    """SDXL is told by its text encoders, or (a file without them) by diffusers' rule, a label_emb MLP with a
    2048-wide context: an ldmkit model with a pooled-text vector route (label_emb too) stays what its config says."""
    from ldmkit.interop.original import _check_sdxl_file

    def file(context: int) -> dict:
        u = okeys.UNET_PREFIX
        return {u + "label_emb.0.0.weight": torch.zeros(8, 4), u + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
                torch.zeros(8, context), okeys.VAE_PREFIX + "encoder.conv_in.weight": torch.zeros(1)}  # fmt: skip

    path = tmp_path / "m.safetensors"
    assert not _check_sdxl_file(file(384), path, None, {})  # MiniLM's 384-wide context
    assert not _check_sdxl_file(file(2048), path, None, {"kind": "latent_diffusion"})  # ldmkit's config decides
    assert not _check_sdxl_file(file(2048), path, "sdxl-folder", {})  # read with the folder's configs and text
    with pytest.raises(Exception, match="holds an SDXL U-Net and VAE but not its two text encoders"):
        _check_sdxl_file(file(2048), path, None, {})
