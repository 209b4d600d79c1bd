"""ldmkit `ControlNet` ⇄ diffusers `ControlNetModel`, and `Adapter` ⇄ diffusers `T2IAdapter`.

ControlNet: the encoder copy is a U-Net encoder, so its config goes through the U-Net translation
(`diffusers_unet.config_from_diffusers` / `config_to_diffusers`) and the ControlNet-only options are
handled here: `conditioning_channels` ↔ hint_channels, `conditioning_embedding_out_channels` ↔
hint_widths (their count fixes latent_factor = 2^(count − 1)). Module names are diffusers' on both
sides, so the key map is the identity. Refused, with the option named: BGR control images
(`controlnet_conditioning_channel_order="bgr"`), `global_pool_conditions` (the "shuffle" ControlNet),
and every U-Net option the U-Net translation refuses. The U-Net's `dropout` is not a diffusers
ControlNetModel option: it is dropped on export (no weights change; eval outputs are identical).

Two diffusers behaviours ldmkit does not copy, so leave them out when comparing: `guess_mode`
(log-spaced residual scales) and `attention_mask`, which diffusers' ControlNetModel applies to the
self-attention (its U-Net takes the text mask as `encoder_attention_mask`); ldmkit's ControlNet masks
the cross-attention exactly as its U-Net does.

T2I-Adapter: only `adapter_type="full_adapter"` (SD 1.x / 2.x) maps; diffusers' keys are ldmkit's
with an `adapter.` prefix. diffusers' T2IAdapter starts from PyTorch's defaults, i.e. ldmkit's
`zero_init=False`; ldmkit's zero-init changes only initial values, so every adapter exports.

diffusers is imported inside the functions, so ldmkit works without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ldmkit.control.adapter import Adapter, AdapterConfig
from ldmkit.control.controlnet import ControlNet, ControlNetConfig
from ldmkit.errors import LdmkitError
from ldmkit.interop.diffusers_unet import config_from_diffusers, config_to_diffusers

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import ControlNetModel, T2IAdapter


def controlnet_config_from_diffusers(dcfg: Mapping[str, Any], concat_channels: int = 0) -> ControlNetConfig:
    """`ControlNetModel.config` → `ControlNetConfig`, or LdmkitError naming what ldmkit cannot represent.
    `concat_channels`: how many of diffusers' `in_channels` are a concatenated condition (SD inpainting: 5)."""
    get = dcfg.get
    problems = []
    if get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        problems.append(f"controlnet_conditioning_channel_order={get('controlnet_conditioning_channel_order')!r}")
    if get("global_pool_conditions", False):
        problems.append("global_pool_conditions=True")
    widths = get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    if problems:
        raise LdmkitError("unsupported diffusers ControlNet config: " + ", ".join(problems))
    # The encoder copy as a U-Net config: diffusers' ControlNet has no decoder, so mirror the encoder.
    down = list(get("down_block_types"))
    up = ["CrossAttnUpBlock2D" if d == "CrossAttnDownBlock2D" else "UpBlock2D" for d in reversed(down)]
    in_ch = get("in_channels", 4)
    unet = config_from_diffusers(
        dict(dcfg) | {"up_block_types": up, "out_channels": in_ch - concat_channels}, concat_channels
    )
    try:
        return ControlNetConfig(
            unet=unet, hint_channels=get("conditioning_channels", 3), latent_factor=2 ** (len(widths) - 1),
            hint_widths=tuple(widths),
        )  # fmt: skip
    except ValueError as e:  # pydantic's ValidationError
        raise LdmkitError(f"diffusers ControlNet config does not translate: {e}") from None


def controlnet_config_to_diffusers(cfg: ControlNetConfig) -> dict[str, Any]:
    """`ControlNetConfig` → keyword arguments of `ControlNetModel` (LdmkitError where diffusers has no equivalent)."""
    if cfg.unet.time_cond_proj_dim:
        raise LdmkitError("this ControlNet copies a U-Net with a w-embedding (time_cond_proj_dim); diffusers' "
                          "ControlNetModel has none")
    kw = config_to_diffusers(cfg.unet)
    for unet_only in ("out_channels", "up_block_types", "dropout", "time_cond_proj_dim"):
        kw.pop(unet_only)
    return kw | dict(
        conditioning_channels=cfg.hint_channels,
        conditioning_embedding_out_channels=tuple(cfg.hint_widths),
        controlnet_conditioning_channel_order="rgb",
        global_pool_conditions=False,
    )


def controlnet_key_map(net: ControlNet) -> dict[str, str]:
    """ldmkit key → diffusers key: the identity (conv_in, time_embedding, class_embedding,
    controlnet_cond_embedding.{conv_in, blocks.k, conv_out}, down_blocks…, controlnet_down_blocks.k,
    mid_block…, controlnet_mid_block); diffusers' parameter-free `time_proj` has no keys."""
    return {k: k for k in net.state_dict()}


def _check_keys(what: str, ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor], key_map) -> None:
    """Raise LdmkitError naming missing / unexpected diffusers keys, then mismatched shapes."""
    missing = sorted(set(key_map.values()) - set(theirs))
    unexpected = sorted(set(theirs) - set(key_map.values()))
    if missing or unexpected:
        raise LdmkitError(
            f"{what} state dicts do not match: missing in diffusers {missing[:8]}{'…' if len(missing) > 8 else ''}, "
            f"unexpected in diffusers {unexpected[:8]}{'…' if len(unexpected) > 8 else ''}"
        )
    bad = [f"{k}: {tuple(ours[k].shape)} vs {tuple(theirs[d].shape)}" for k, d in key_map.items()
           if ours[k].shape != theirs[d].shape]  # fmt: skip
    if bad:
        raise LdmkitError(f"{what} parameter shapes do not match: " + "; ".join(bad[:8]))


def controlnet_from_diffusers(model: ControlNetModel, concat_channels: int = 0) -> ControlNet:
    """A `ControlNet` with the same weights (copied; same dtype and device) as a diffusers ControlNetModel."""
    cfg = controlnet_config_from_diffusers(model.config, concat_channels)
    with torch.device("meta"):  # no wasted random init; the weights come from `model`
        net = ControlNet(cfg)
    key_map = controlnet_key_map(net)
    theirs = model.state_dict()
    _check_keys("ControlNet", net.state_dict(), theirs, key_map)
    net.load_state_dict({k: theirs[d].detach().clone() for k, d in key_map.items()}, assign=True)
    return net.train(model.training)


def controlnet_to_diffusers(net: ControlNet, upcast_attention: bool = False) -> ControlNetModel:
    """A diffusers `ControlNetModel` with the same weights (copied) as `net`. `upcast_attention`: as in
    `unet_to_diffusers` (SD 2.1 sets it; no weights depend on it)."""
    from diffusers import ControlNetModel

    if not isinstance(net, ControlNet):
        hint = ": use adapter_to_diffusers (a T2IAdapter)" if isinstance(net, Adapter) else ""
        raise LdmkitError(f"controlnet_to_diffusers takes a ControlNet, got a {type(net).__name__}{hint}")
    groups = net.config.unet.norm_groups
    for name, m in net.named_modules():  # diffusers uses norm_num_groups as given, never a divisor
        if isinstance(m, torch.nn.GroupNorm) and m.num_groups != groups:
            raise LdmkitError(
                f"{name} has {m.num_channels} channels, not divisible by norm_groups={groups}; "
                "diffusers cannot express this model"
            )
    with torch.device("meta"):
        model = ControlNetModel(upcast_attention=upcast_attention, **controlnet_config_to_diffusers(net.config))
    key_map = controlnet_key_map(net)
    ours = net.state_dict()
    _check_keys("ControlNet", ours, model.state_dict(), key_map)
    model.load_state_dict({d: ours[k].detach().clone() for k, d in key_map.items()}, assign=True)
    return model.train(net.training)


# ---------------------------------------------------------------------------------------------
# T2I-Adapter


def adapter_from_diffusers(model: T2IAdapter) -> Adapter:
    """An `Adapter` with the same weights (copied) as a diffusers `T2IAdapter` of type "full_adapter"."""
    c = model.config
    if c.get("adapter_type", "full_adapter") != "full_adapter":
        raise LdmkitError(
            f"unsupported diffusers T2IAdapter: adapter_type={c['adapter_type']!r} (ldmkit maps 'full_adapter')"
        )
    try:
        cfg = AdapterConfig(
            channels=tuple(c["channels"]), hint_channels=c["in_channels"], latent_factor=c["downscale_factor"],
            num_res_blocks=c["num_res_blocks"], zero_init=False,
        )  # fmt: skip
    except ValueError as e:
        raise LdmkitError(f"diffusers T2IAdapter config does not translate: {e}") from None
    with torch.device("meta"):
        adapter = Adapter(cfg)
    key_map = {k: "adapter." + k for k in adapter.state_dict()}
    theirs = model.state_dict()
    _check_keys("T2IAdapter", adapter.state_dict(), theirs, key_map)
    adapter.load_state_dict({k: theirs[d].detach().clone() for k, d in key_map.items()}, assign=True)
    return adapter.train(model.training)


def adapter_to_diffusers(adapter: Adapter) -> T2IAdapter:
    """A diffusers `T2IAdapter` ("full_adapter") with the same weights (copied) as `adapter`."""
    from diffusers import T2IAdapter

    cfg = adapter.config
    if not cfg.multiscale:
        raise LdmkitError("this adapter has no diffusers T2IAdapter equivalent: multiscale=False")
    with torch.device("meta"):
        model = T2IAdapter(
            in_channels=cfg.hint_channels, channels=list(cfg.channels), num_res_blocks=cfg.num_res_blocks,
            downscale_factor=cfg.latent_factor, adapter_type="full_adapter",
        )  # fmt: skip
    key_map = {k: "adapter." + k for k in adapter.state_dict()}
    ours = adapter.state_dict()
    _check_keys("T2IAdapter", ours, model.state_dict(), key_map)
    model.load_state_dict({d: ours[k].detach().clone() for k, d in key_map.items()}, assign=True)
    return model.train(adapter.training)
