"""The denoiser U-Net: shapes for every route and ablation, parity with diffusers' UNet2DConditionModel,
clear errors for conditions without a route, zero-init, DDP-safe gradients, presets."""

from __future__ import annotations

import pytest
import torch

from ldmkit.errors import LdmkitError
from ldmkit.layers import timestep_embedding
from ldmkit.unet import UNET_PRESETS, UNet, UNetConfig

B, H, W = 2, 8, 8


def tiny(**kw) -> UNetConfig:
    base = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                norm_groups=8, zero_init=False)  # fmt: skip
    return UNetConfig(**(base | kw))


def inputs(cfg: UNetConfig, h: int = H, w: int = W, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    kw: dict = {"x": torch.randn(B, cfg.in_channels, h, w, generator=g), "t": torch.tensor([10, 500])}
    if cfg.context_dim:
        kw["context"] = torch.randn(B, 5, cfg.context_dim, generator=g)
        kw["context_mask"] = torch.tensor([[True, True, True, False, False], [True] * 5])
    if cfg.num_classes:
        kw["class_labels"] = torch.tensor([0, cfg.num_classes])  # a class and the null class
    if cfg.concat_channels:
        kw["concat"] = torch.randn(B, cfg.concat_channels, h, w, generator=g)
    return kw


SHAPE_CONFIGS = {
    "plain": tiny(),
    "context": tiny(context_dim=12),
    "labels": tiny(num_classes=10),
    "concat": tiny(concat_channels=5, out_channels=4),
    "scale_shift": tiny(emb_mode="scale_shift", num_classes=3),
    "head_dim_linear_depth2": tiny(num_heads=None, head_dim=8, use_linear_projection=True, transformer_depth=2,
                                   context_dim=12, attention_levels=(0, 1)),  # fmt: skip
    "one_level": tiny(channel_mult=(1,), attention_levels=(0,), context_dim=12),
    "three_levels": tiny(channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2), context_dim=12),
    "no_skips": tiny(use_skip_connections=False, context_dim=12),
    "no_attention": tiny(use_attention=False),
    "no_time_modulation": tiny(use_time_modulation=False, context_dim=12),
    "no_multiscale": tiny(multiscale=False, context_dim=12, channel_mult=(1, 2, 2)),
    "everything": tiny(context_dim=12, num_classes=4, concat_channels=3, emb_mode="scale_shift", dropout=0.1),
}


@pytest.mark.parametrize("name", list(SHAPE_CONFIGS))
def test_output_shape_matches_input(name):
    cfg = SHAPE_CONFIGS[name]
    unet = UNet(cfg).eval()
    kw = inputs(cfg)
    out = unet(**kw)
    assert out.shape == (B, cfg.out_channels, H, W)
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_non_square_latent_and_scalar_timestep():
    cfg = tiny(context_dim=12)
    unet = UNet(cfg).eval()
    kw = inputs(cfg, h=8, w=12)
    assert unet(**kw).shape == (B, 4, 8, 12)
    kw["t"] = 7
    a = unet(**kw)
    kw["t"] = torch.tensor([7, 7])
    assert torch.equal(a, unet(**kw))


def test_time_agnostic_ablation_ignores_t():
    cfg = tiny(use_time_modulation=False)
    unet = UNet(cfg).eval()
    assert unet.time_embedding is None
    x = torch.randn(B, 4, H, W)
    assert torch.equal(unet(x, 1), unet(x, 900))


def test_context_mask_hides_padding_tokens():
    cfg = tiny(context_dim=12)
    unet = UNet(cfg).eval()
    kw = inputs(cfg)
    a = unet(**kw)
    kw["context"] = kw["context"].clone()
    kw["context"][0, 3:] = 100.0  # masked-out tokens of sample 0
    b = unet(**kw)
    assert torch.allclose(a, b, atol=1e-6)


def test_skip_channels_describe_the_skips():
    cfg = tiny(channel_mult=(1, 2, 2), num_res_blocks=2, context_dim=12)
    unet = UNet(cfg).eval()
    skips = unet.skip_channels()
    assert len(skips) == 1 + 3 * 2 + 2
    assert skips[0] == (16, 1) and skips[-1] == (32, 4)
    kw = inputs(cfg)
    zeros = [torch.zeros(B, c, H // f, W // f) for c, f in skips]
    mid = torch.zeros(B, cfg.widths[-1], H // 4, W // 4)
    assert torch.equal(unet(**kw), unet(**kw, down_residuals=zeros, mid_residual=mid))
    ones = [torch.ones_like(z) for z in zeros]
    assert not torch.allclose(unet(**kw), unet(**kw, down_residuals=ones, mid_residual=mid + 1))
    assert set(unet.encoder_modules()) == {"conv_in", "time_embedding", "down_blocks", "mid_block"}


# ---- errors a user can fix


def test_route_errors():
    plain = UNet(tiny()).eval()
    x = torch.randn(B, 4, H, W)
    with pytest.raises(LdmkitError, match="cross-attention"):
        plain(x, 1, context=torch.randn(B, 5, 12))
    with pytest.raises(LdmkitError, match="label"):
        plain(x, 1, class_labels=torch.tensor([0, 1]))
    with pytest.raises(LdmkitError, match="concatenation"):
        plain(x, 1, concat=torch.randn(B, 2, H, W))

    cond = UNet(tiny(context_dim=12, num_classes=3, concat_channels=2)).eval()
    kw = inputs(cond.config)
    with pytest.raises(LdmkitError, match="pass concat"):
        cond(**(kw | {"concat": None}))
    with pytest.raises(LdmkitError, match="concat must be"):
        cond(**(kw | {"concat": torch.randn(B, 3, H, W)}))
    with pytest.raises(LdmkitError, match="pass context"):
        cond(**(kw | {"context": None, "context_mask": None}))
    with pytest.raises(LdmkitError, match="null class"):
        cond(**(kw | {"class_labels": None}))
    with pytest.raises(LdmkitError, match="down_residuals needs"):
        cond(**kw, down_residuals=[torch.zeros(1)])


def test_size_error_says_which_sizes_work():
    unet = UNet(tiny(channel_mult=(1, 2, 2))).eval()
    with pytest.raises(LdmkitError, match="multiples of 4"):
        unet(torch.randn(1, 4, 6, 8), 1)
    assert UNet(tiny(channel_mult=(1, 2, 2), multiscale=False))(torch.randn(1, 4, 6, 7), 1).shape == (1, 4, 6, 7)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(attention_levels=(2,)), "out of range"),
        (dict(attention_levels=(1, 1)), "duplicates"),
        (dict(num_heads=2, head_dim=8), "not both"),
        (dict(num_heads=None), "num_heads"),
        (dict(num_heads=3), "not divisible"),
        (dict(use_attention=False, context_dim=12), "use_attention is off"),
        (dict(attention_levels=(), mid_attention=False, context_dim=12), "no level"),
        (dict(use_time_modulation=False, num_classes=3), "use_time_modulation"),
        (dict(channel_mult=()), "non-empty"),
        (dict(unknown_field=1), "unknown_field"),
    ],
)
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**bad)


# ---- initialisation and gradients


def test_zero_init_outputs_zero():
    cfg = tiny(context_dim=12, num_classes=3, zero_init=True)
    unet = UNet(cfg)
    assert torch.equal(unet(**inputs(cfg)), torch.zeros(B, 4, H, W))
    for block in unet.modules():
        if hasattr(block, "conv2"):
            assert not block.conv2.weight.any()


@pytest.mark.parametrize("name", ["everything", "no_skips", "no_attention", "no_time_modulation", "no_multiscale"])
def test_gradient_reaches_every_parameter(name):
    """No parameter without a gradient: DistributedDataParallel needs no find_unused_parameters."""
    cfg = SHAPE_CONFIGS[name]
    unet = UNet(cfg).train()
    unet(**inputs(cfg)).square().mean().backward()
    missing = [n for n, p in unet.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


def test_zero_init_still_gets_gradients_everywhere():
    cfg = SHAPE_CONFIGS["everything"].model_copy(update={"zero_init": True})
    unet = UNet(cfg)
    unet(**inputs(cfg)).sub(1).square().mean().backward()
    assert all(p.grad is not None for p in unet.parameters())


# ---- presets


def test_presets():
    counts = {}
    for name, make in UNET_PRESETS.items():
        cfg = make()
        assert isinstance(cfg, UNetConfig)
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in UNet(cfg).parameters())
    assert counts["sd1"] == 859_520_964  # Stable Diffusion v1.x U-Net
    assert counts["sd2"] == 865_910_724  # Stable Diffusion v2.x U-Net
    assert counts["tiny"] < counts["small"] < 5_000_000
    small = UNET_PRESETS["small"](context_dim=16, num_classes=10)
    unet = UNet(small)
    assert unet(**inputs(small)).shape == (B, 4, H, W)


# ---- parity with diffusers

try:
    import diffusers
except ImportError:  # only the parity tests below need it; the rest run without
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers is not installed")


def _randomised(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Perturb every parameter (norm scales and biases too) so no weight is trivially 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


PARITY_CONFIGS = {
    # SD v1 layout: CrossAttnDownBlock2D / DownBlock2D, 1x1-conv projections, class embeddings
    "sd1_like": dict(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2, cross_attention_dim=16,
        attention_head_dim=2, norm_num_groups=8, num_class_embeds=5,
    ),
    # SD v2 layout: per-level heads of 16 channels, linear projections, depth 2, scale-shift, inpainting input
    "sd2_like": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        cross_attention_dim=24, attention_head_dim=(2, 4, 4), norm_num_groups=8, use_linear_projection=True,
        transformer_layers_per_block=2, resnet_time_scale_shift="scale_shift", in_channels=9, out_channels=4,
        freq_shift=1, flip_sin_to_cos=False, upcast_attention=True,
    ),
}  # fmt: skip


def _pair(name: str):
    from ldmkit.interop.diffusers_unet import unet_from_diffusers

    torch.manual_seed(0)
    theirs = _randomised(diffusers.UNet2DConditionModel(**PARITY_CONFIGS[name]))
    return theirs, unet_from_diffusers(theirs).eval()


def _both_inputs(ours: UNet) -> tuple[dict, dict]:
    kw = inputs(ours.config, seed=3)
    x = kw["x"] if "concat" not in kw else torch.cat([kw["x"], kw["concat"]], dim=1)
    ref = dict(sample=x, timestep=kw["t"], encoder_hidden_states=kw["context"])
    ref["encoder_attention_mask"] = kw["context_mask"]  # diffusers: 1 = keep, like ldmkit's True
    if "class_labels" in kw:
        ref["class_labels"] = kw["class_labels"]
    return kw, ref


@needs_diffusers
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_parity_with_diffusers(name):
    theirs, ours = _pair(name)
    kw, ref_kw = _both_inputs(ours)
    with torch.no_grad():
        ref = theirs(**ref_kw).sample
        out = ours(**kw)
    diff = (ref - out).abs().max().item()
    print(f"{name}: output std {ref.std():.3f}, max |diff| {diff:.2e}")
    assert 0.1 < ref.std() < 10
    assert diff <= 1e-4


@needs_diffusers
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_round_trip_is_lossless(name):
    from ldmkit.interop.diffusers_unet import unet_to_diffusers

    theirs, ours = _pair(name)
    back = unet_to_diffusers(ours)
    a, b = theirs.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.requires_grad and p.device.type == "cpu" for p in [*ours.parameters(), *back.parameters()])


@needs_diffusers
def test_controlnet_residuals_match_diffusers():
    theirs, ours = _pair("sd1_like")
    kw, ref_kw = _both_inputs(ours)
    g = torch.Generator().manual_seed(5)
    down = [torch.randn(B, c, H // f, W // f, generator=g) for c, f in ours.skip_channels()]
    mid = torch.randn(B, ours.config.widths[-1], H // 2, W // 2, generator=g)
    with torch.no_grad():
        ref = theirs(**ref_kw, down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid).sample
        out = ours(**kw, down_residuals=down, mid_residual=mid)
        plain = ours(**kw)
    diff = (ref - out).abs().max().item()
    print(f"controlnet residuals: max |diff| {diff:.2e}")
    assert diff <= 1e-4 and (out - plain).abs().max() > 1e-2


@needs_diffusers
def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 999, 500])
    for dim, flip, shift in [(32, True, 0), (320, True, 0), (33, False, 1), (64, False, 1)]:
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        assert torch.allclose(timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift), ref, atol=1e-6)


@needs_diffusers
def test_unsupported_diffusers_configs_are_named():
    from ldmkit.interop.diffusers_unet import config_from_diffusers, unet_to_diffusers

    base = diffusers.UNet2DConditionModel(**PARITY_CONFIGS["sd1_like"]).config
    for key, value in [("class_embed_type", "timestep"), ("addition_embed_type", "text"), ("conv_in_kernel", 1),
                       ("up_block_types", ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))]:  # fmt: skip
        with pytest.raises(LdmkitError, match=key):
            config_from_diffusers(dict(base) | {key: value})
    with pytest.raises(LdmkitError, match="use_skip_connections=False"):
        unet_to_diffusers(UNet(tiny(context_dim=12, use_skip_connections=False)))
    with pytest.raises(LdmkitError, match="context_dim=None"):
        unet_to_diffusers(UNet(tiny()))


@needs_diffusers
@pytest.mark.parametrize(
    "preset, dkw",
    [
        ("sd1", dict(cross_attention_dim=768, attention_head_dim=8)),
        ("sd2", dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                     upcast_attention=True)),  # fmt: skip
    ],
)
def test_full_size_key_map(preset, dkw):
    """Stable Diffusion's real U-Net configs (on the meta device: no memory, no time): the preset
    is what the config translates to, and every key maps with its shape, none left over."""
    from ldmkit.interop.diffusers_unet import config_from_diffusers, unet_from_diffusers, unet_to_diffusers

    with torch.device("meta"):
        theirs = diffusers.UNet2DConditionModel(sample_size=64, **dkw)
        assert config_from_diffusers(theirs.config) == UNET_PRESETS[preset](zero_init=False)
        ours = unet_from_diffusers(theirs)  # raises on any missing / unexpected key or shape
        back = unet_to_diffusers(ours, sample_size=64, upcast_attention=dkw.get("upcast_attention", False))
    assert {k: v.shape for k, v in back.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert {**back.config, "_use_default_values": None} == {**theirs.config, "_use_default_values": None}


@needs_diffusers
def test_key_mismatch_names_the_keys():
    from ldmkit.interop.diffusers_unet import _check_keys, diffusers_key_map

    unet = UNet(tiny(context_dim=12))
    ours = unet.state_dict()
    theirs = dict(ours)
    theirs.pop("conv_out.bias")
    theirs["add_embedding.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(LdmkitError, match=r"conv_out\.bias.*add_embedding\.linear_1\.weight"):
        _check_keys(ours, theirs, diffusers_key_map(unet))
    theirs = dict(ours) | {"conv_out.bias": torch.zeros(7)}
    with pytest.raises(LdmkitError, match="conv_out.bias: \\(4,\\) vs \\(7,\\)"):
        _check_keys(ours, theirs, diffusers_key_map(unet))
