"""ldmkit `UNet` ⇄ diffusers `UNet2DConditionModel`: config translation plus an explicit key map.

ldmkit's U-Net names its modules after diffusers', so the state-dict key map is the identity on
every name (`diffusers_key_map` spells it out); what this module adds is (1) translating the two
configs, refusing diffusers features ldmkit does not implement with an error that names them, and
(2) a strict check that both sides have exactly the same keys and shapes before any copy.

Conventions worth knowing when reading a diffusers config:
- `attention_head_dim` is, despite its name, the number of heads per level (diffusers issue #2011);
  head width is channels // heads. SD2 has (5, 10, 20, 20), i.e. 64-channel heads.
- `num_class_embeds` counts all embedding rows; ldmkit reserves the last row as the null class, so
  `num_classes = num_class_embeds - 1`.
- SD inpainting's `in_channels = 9` is ldmkit's in_channels 4 + concat_channels 5.
- `upcast_attention` (SD 2.1) is accepted: it only changes half-precision arithmetic, and
  `F.scaled_dot_product_attention` already accumulates the softmax in float32 in its fused kernels.
- `addition_embed_type="text_time"` (SDXL) is ldmkit's vector route: `add_embedding` takes
  `projection_class_embeddings_input_dim` = vector_dim features. diffusers Fourier-embeds the size/crop
  `time_ids` inside the U-Net (`add_time_proj`, 256 features each) and appends them to `text_embeds`;
  ldmkit's conditioner builds that same vector (`conditioning.conditioner.sdxl_vector`), so
  `unet(x, t, context=…, vector=sdxl_vector(text_embeds, time_ids))` equals diffusers'
  `unet(x, t, …, added_cond_kwargs={"text_embeds": …, "time_ids": …})`.
- `transformer_layers_per_block` per level (SDXL: 1, 2, 10) is `transformer_depth` per level; diffusers'
  decoder takes the reversed list, i.e. each decoder level the depth of its encoder level, as ldmkit's.

diffusers is imported inside the functions, so ldmkit works without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ldmkit.conditioning.conditioner import MICRO_DIM
from ldmkit.errors import LdmkitError
from ldmkit.unet import UNet, UNetConfig

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import UNet2DConditionModel

# diffusers options ldmkit's U-Net does not implement, with the only value it accepts.
_FIXED = {
    "center_input_sample": False,
    "act_fn": "silu",
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "num_attention_heads": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}


def _uniform(name: str, value: Any) -> Any:
    """An int/None or a per-level list whose entries all agree → the single value."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise LdmkitError(
                f"unsupported diffusers U-Net config: per-level {name}={list(value)} (ldmkit uses one value)"
            )
        return value[0]
    return value


def _depths(value: Any) -> int | tuple[int, ...]:
    """diffusers' transformer_layers_per_block → ldmkit's transformer_depth (one value, or one per level)."""
    if not isinstance(value, (list, tuple)):
        return value
    if any(isinstance(v, (list, tuple)) for v in value):
        raise LdmkitError(f"unsupported diffusers U-Net config: transformer_layers_per_block={list(value)} "
                          "(a depth per transformer within a level; ldmkit has one per level)")
    return value[0] if len(set(value)) == 1 else tuple(value)


def config_from_diffusers(dcfg: Mapping[str, Any], concat_channels: int | None = None) -> UNetConfig:
    """Translate a `UNet2DConditionModel.config` into a `UNetConfig`, or raise LdmkitError naming
    every option ldmkit cannot represent.

    `concat_channels=None` infers it as in_channels - out_channels when the model takes more
    channels than it predicts (SD inpainting: 9 in, 4 out → 4 latent + 5 concatenated)."""
    get = dcfg.get
    problems = [f"{k}={get(k, v)!r}" for k, v in _FIXED.items() if get(k, v) != v]
    only_cross = get("only_cross_attention", False)
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
        problems.append(f"only_cross_attention={get('only_cross_attention')!r}")
    if get("mid_block_only_cross_attention") not in (None, False):
        problems.append(f"mid_block_only_cross_attention={get('mid_block_only_cross_attention')!r}")
    if get("resnet_time_scale_shift", "default") not in ("default", "scale_shift"):
        problems.append(f"resnet_time_scale_shift={get('resnet_time_scale_shift')!r}")
    if get("norm_num_groups", 32) is None:
        problems.append("norm_num_groups=None")
    addition = get("addition_embed_type")
    if addition not in (None, "text_time"):
        problems.append(f"addition_embed_type={addition!r} (ldmkit reads SDXL's 'text_time')")
    elif addition == "text_time":
        # the conditioner embeds the size/crop values as SDXL does: 256 sinusoids each, cos first, no shift
        if get("addition_time_embed_dim") != MICRO_DIM:
            problems.append(f"addition_time_embed_dim={get('addition_time_embed_dim')!r} (ldmkit: {MICRO_DIM})")
        if not get("flip_sin_to_cos", True) or get("freq_shift", 0) != 0:
            problems.append("addition_embed_type='text_time' with flip_sin_to_cos=False or freq_shift≠0")
        if get("class_embed_type") is not None or get("num_class_embeds") is not None:
            problems.append("addition_embed_type='text_time' together with class embeddings")
    boc = list(get("block_out_channels"))
    if get("time_embedding_dim") not in (None, 4 * boc[0]):
        problems.append(f"time_embedding_dim={get('time_embedding_dim')!r}")
    if any(c % boc[0] for c in boc):
        problems.append(f"block_out_channels={boc} (ldmkit needs multiples of the first width)")
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    attn = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(d not in attn for d in down):
        problems.append(f"down_block_types={down}")
    else:
        mirror = ["CrossAttnUpBlock2D" if attn[d] else "UpBlock2D" for d in reversed(down)]
        if up != mirror:
            problems.append(f"up_block_types={up} (ldmkit mirrors down_block_types: {mirror})")
    if problems:
        raise LdmkitError("unsupported diffusers U-Net config: " + ", ".join(problems))

    n = len(boc)
    heads = get("attention_head_dim", 8)  # = heads per level (see module docstring)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n
    attended = [i for i, d in enumerate(down) if attn[d]] + [n - 1]  # the middle block uses the last level's
    head_options: dict[str, Any]
    if len({heads[i] for i in attended}) == 1:
        head_options = {"num_heads": heads[n - 1]}
    elif len({boc[i] // heads[i] for i in attended}) == 1 and all(boc[i] % heads[i] == 0 for i in attended):
        head_options = {"head_dim": boc[n - 1] // heads[n - 1]}
    else:
        head_options = {"num_heads": tuple(heads)}

    in_ch, out_ch = get("in_channels", 4), get("out_channels", 4)
    if concat_channels is None:
        concat_channels = max(in_ch - out_ch, 0)
    num_class_embeds = get("num_class_embeds")
    if num_class_embeds is not None and num_class_embeds < 2:
        raise LdmkitError(f"unsupported diffusers U-Net config: num_class_embeds={num_class_embeds} (ldmkit needs ≥ 2)")
    freq_shift = get("freq_shift", 0)
    try:
        return UNetConfig(
            in_channels=in_ch - concat_channels,
            out_channels=out_ch,
            concat_channels=concat_channels,
            model_channels=boc[0],
            channel_mult=tuple(c // boc[0] for c in boc),
            num_res_blocks=_uniform("layers_per_block", get("layers_per_block", 2)),
            dropout=get("dropout", 0.0),
            norm_groups=get("norm_num_groups", 32),
            norm_eps=get("norm_eps", 1e-5),
            attention_levels=tuple(i for i, d in enumerate(down) if attn[d]),
            mid_attention=True,
            transformer_depth=_depths(get("transformer_layers_per_block", 1)),
            context_dim=_uniform("cross_attention_dim", get("cross_attention_dim", 1280)),
            use_linear_projection=get("use_linear_projection", False),
            flip_sin_to_cos=get("flip_sin_to_cos", True),
            freq_shift=freq_shift,
            emb_mode="scale_shift" if get("resnet_time_scale_shift", "default") == "scale_shift" else "add",
            num_classes=0 if num_class_embeds is None else num_class_embeds - 1,
            time_cond_proj_dim=get("time_cond_proj_dim"),
            vector_dim=(get("projection_class_embeddings_input_dim") or 0) if addition == "text_time" else 0,
            zero_init=False,
            **head_options,
        )
    except ValueError as e:  # pydantic's ValidationError
        raise LdmkitError(f"diffusers U-Net config does not translate: {e}") from None


def config_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    """`UNetConfig` → keyword arguments of `UNet2DConditionModel`, or LdmkitError for ldmkit features
    diffusers cannot express (the ablation switches, no cross-attention, no middle attention)."""
    problems = [
        f"{name}=False"
        for name in ("use_skip_connections", "use_attention", "use_time_modulation", "multiscale", "mid_attention")
        if not getattr(cfg, name)
    ]
    if cfg.context_dim is None:
        problems.append("context_dim=None (diffusers' CrossAttn blocks need a cross_attention_dim)")
    if cfg.vector_dim and cfg.num_classes:
        problems.append(f"vector_dim={cfg.vector_dim} with num_classes={cfg.num_classes} (diffusers' text_time "
                        "vector route does not go with class embeddings)")
    if problems:
        raise LdmkitError("this U-Net has no diffusers UNet2DConditionModel equivalent: " + ", ".join(problems))
    n = cfg.num_levels
    if cfg.head_dim is not None or isinstance(cfg.num_heads, tuple):
        heads: int | list[int] = [max(cfg.heads_at(i), 1) for i in range(n)]
    else:
        heads = cfg.heads_at(0)
    levels = range(n)
    depth = cfg.transformer_depth
    vector: dict[str, Any] = {}
    if cfg.vector_dim:
        vector = dict(addition_embed_type="text_time", addition_time_embed_dim=MICRO_DIM,
                      projection_class_embeddings_input_dim=cfg.vector_dim)
    return dict(
        in_channels=cfg.in_channels + cfg.concat_channels,
        out_channels=cfg.out_channels,
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=int(cfg.freq_shift) if float(cfg.freq_shift).is_integer() else cfg.freq_shift,
        down_block_types=tuple("CrossAttnDownBlock2D" if cfg.has_attention(i) else "DownBlock2D" for i in levels),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if cfg.has_attention(i) else "UpBlock2D" for i in reversed(levels)),
        block_out_channels=tuple(cfg.widths),
        layers_per_block=cfg.num_res_blocks,
        dropout=cfg.dropout,
        norm_num_groups=cfg.norm_groups,
        norm_eps=cfg.norm_eps,
        cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=list(depth) if isinstance(depth, tuple) else depth,
        attention_head_dim=heads,
        use_linear_projection=cfg.use_linear_projection,
        num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None,
        resnet_time_scale_shift="scale_shift" if cfg.emb_mode == "scale_shift" else "default",
        time_cond_proj_dim=cfg.time_cond_proj_dim,
        **vector,
    )


def diffusers_key_map(unet: UNet) -> dict[str, str]:
    """ldmkit state-dict key → diffusers key. The U-Net's modules carry diffusers' names
    (conv_in, time_embedding.linear_1, down_blocks.i.resnets.j.conv1, …attentions.j.transformer_blocks.k
    .attn1.to_q, …ff.net.0.proj, downsamplers.0.conv, mid_block, up_blocks, conv_norm_out, conv_out),
    so each key maps to itself; diffusers' parameter-free `time_proj` and `conv_act` have no keys."""
    return {k: k for k in unet.state_dict()}


def _check_keys(
    ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], key_map: Mapping[str, str]
) -> None:
    """Raise LdmkitError naming missing / unexpected diffusers keys, then mismatched shapes."""
    missing = sorted(set(key_map.values()) - set(theirs))
    unexpected = sorted(set(theirs) - set(key_map.values()))
    if missing or unexpected:
        raise LdmkitError(
            f"U-Net state dicts do not match: missing in diffusers {missing[:8]}{'…' if len(missing) > 8 else ''}, "
            f"unexpected in diffusers {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}"
        )
    bad = [
        f"{k}: {tuple(ours[k].shape)} vs {tuple(theirs[d].shape)}"
        for k, d in key_map.items()
        if ours[k].shape != theirs[d].shape
    ]
    if bad:
        raise LdmkitError("U-Net parameter shapes do not match: " + "; ".join(bad[:8]))


def unet_from_diffusers(model: UNet2DConditionModel, concat_channels: int | None = None, copy: bool = True) -> UNet:
    """A `UNet` with the same weights (copied; same dtype and device) as a diffusers U-Net. `copy=False` takes
    the tensors over instead (the two modules then share them): for a diffusers model that is thrown away
    afterwards, as a pipeline loader's is, where the copy of SD 1.5's 3.4 GB cost seconds of every load."""
    cfg = config_from_diffusers(model.config, concat_channels)
    with torch.device("meta"):  # no wasted random init; the weights come from `model`
        unet = UNet(cfg)
    key_map = diffusers_key_map(unet)
    theirs = model.state_dict()
    _check_keys(unet.state_dict(), theirs, key_map)
    unet.load_state_dict({k: theirs[d].detach().clone() if copy else theirs[d].detach() for k, d in key_map.items()},
                         assign=True)
    return unet.train(model.training)


def unet_to_diffusers(
    unet: UNet, sample_size: int | None = None, upcast_attention: bool = False
) -> UNet2DConditionModel:
    """A diffusers `UNet2DConditionModel` with the same weights (copied) as `unet`.

    Two diffusers-only settings that change no weights and that ldmkit does not keep: `sample_size`
    (latent resolution; diffusers pipelines take their default image size from it) and
    `upcast_attention` (float32 attention scores in diffusers' non-SDPA processor; SD 2.1 sets it)."""
    from diffusers import UNet2DConditionModel

    for name, m in unet.named_modules():  # diffusers uses norm_num_groups as given, never a divisor
        if isinstance(m, torch.nn.GroupNorm) and m.num_groups != unet.config.norm_groups:
            raise LdmkitError(
                f"{name} has {m.num_channels} channels, not divisible by norm_groups={unet.config.norm_groups}; "
                "diffusers cannot express this model"
            )
    with torch.device("meta"):
        kw = config_to_diffusers(unet.config)
        model = UNet2DConditionModel(sample_size=sample_size, upcast_attention=upcast_attention, **kw)
    key_map = diffusers_key_map(unet)
    ours = unet.state_dict()
    _check_keys(ours, model.state_dict(), key_map)
    model.load_state_dict({d: ours[k].detach().clone() for k, d in key_map.items()}, assign=True)
    return model.train(unet.training)
