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
