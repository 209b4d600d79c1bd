"""The original (CompVis) single-file format's key layout: the component prefixes, the ldmkit ⇄ original
key maps of the U-Net and the VAE, and the architectures read back from the keys and shapes alone."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.errors import LdmkitError
from ldmkit.unet import UNet, UNetConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
# SDXL (Stability's `sgm` GeneralConditioner): its embedders in order, CLIP ViT-L (transformers names
# under OpenAI's `transformer.text_model.`) then OpenCLIP ViT-bigG (OpenCLIP names); the refiner has
# only the OpenCLIP one, as embedders.0 (its 1..3 are the size/crop/aesthetic scalars, without weights).
CONDITIONER_PREFIX = "conditioner.embedders."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# Keys of a CompVis checkpoint that are not model weights: the DDPM buffers, training leftovers.
_SCHEDULE_BUFFERS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
}  # fmt: skip
# `denoiser.`: sgm's DiscreteDenoiser buffers (`sigmas`, SDXL files saved by sgm training), the schedule again
_IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.", "loss.", "denoiser.")
_IGNORED_KEYS = {
    CLIP_PREFIX + "embeddings.position_ids",
    OPENCLIP_PREFIX + "text_projection",
    OPENCLIP_PREFIX + "logit_scale",
    OPENCLIP_PREFIX + "attn_mask",
    SDXL_CLIP_PREFIX + "embeddings.position_ids",
    SDXL_OPENCLIP_PREFIX + "logit_scale",  # CLIP's contrastive temperature: no part of the text features
    SDXL_OPENCLIP_PREFIX + "attn_mask",  # the causal mask, a buffer transformers builds itself
}


# ---------------------------------------------------------------------------------------------
# Key maps (ldmkit key → original key, without the component prefix)


def _map_keys(keys, modules: Mapping[str, tuple[str, Mapping[str, str]]]) -> dict[str, str]:
    """Map each ldmkit key through the longest module prefix in `modules`
    ({ldmkit module: (original module, renames of the parameter path inside it)})."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in modules:
                target, renames = modules[prefix]
                rest = ".".join(parts[cut:])
                for old, new in renames.items():
                    if rest == old or rest.startswith(old + "."):
                        rest = new + rest[len(old) :]
                        break
                out[key] = f"{target}.{rest}"
                break
        else:
            raise LdmkitError(f"internal: no original-format name for {key}")
    return out


_UNET_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
             "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
_SAME: dict[str, str] = {}


def check_unet_expressible(cfg: UNetConfig) -> None:
    """Refuse U-Net configs that the CompVis UNetModel would silently misread."""
    problems = [
        f"{name}=False"
        for name in ("use_skip_connections", "use_attention", "use_time_modulation", "multiscale")
        if not getattr(cfg, name)
    ]
    if not cfg.flip_sin_to_cos or cfg.freq_shift != 0:
        problems.append(f"flip_sin_to_cos={cfg.flip_sin_to_cos}, freq_shift={cfg.freq_shift} (CompVis: [cos, sin], shift 0)")
    if cfg.context_dim is None and cfg.has_any_attention:
        problems.append("attention without cross-attention (CompVis' transformer always has attn2)")
    if problems:
        raise LdmkitError("this U-Net has no original (CompVis) form: " + ", ".join(problems))


def unet_module_map(levels: int, n: int, attention_levels, mid_attention: bool) -> dict[str, tuple[str, Mapping[str, str]]]:
    """{ldmkit (= diffusers) module: (original module, renames inside it)} of a U-Net with `levels`
    levels of `n` ResBlocks, transformers at `attention_levels` (and in the middle if `mid_attention`).

    The structure alone decides the names: the number of transformer blocks inside a spatial
    transformer (SDXL: 1, 2, 10 per level) only changes the `transformer_blocks.k` indices, which both
    layouts share, while a level without attention (SDXL's first) leaves its input/output blocks with a
    ResBlock only and moves its upsampler from slot 2 to slot 1 (CompVis' TimestepEmbedSequential)."""
    m: dict[str, tuple[str, Mapping[str, str]]] = {
        "conv_in": ("input_blocks.0.0", _SAME),
        "time_embedding.linear_1": ("time_embed.0", _SAME),
        "time_embedding.linear_2": ("time_embed.2", _SAME),
        "class_embedding": ("label_emb", _SAME),
        # SDXL's text_time addition embedding: sgm's `label_emb = Sequential(Sequential(Linear, SiLU,
        # Linear))` over [pooled text, Fourier(size/crop values)] (the "adm" vector), diffusers' add_embedding
        "add_embedding.linear_1": ("label_emb.0.0", _SAME),
        "add_embedding.linear_2": ("label_emb.0.2", _SAME),
        "conv_norm_out": ("out.0", _SAME),
        "conv_out": ("out.2", _SAME),
    }
    k = 1
    for i in range(levels):
        for j in range(n):
            m[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{k}.0", _UNET_RES)
            m[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{k}.1", _SAME)
            k += 1
        if i < levels - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{k}.0.op", _SAME)
            k += 1
    m["mid_block.resnets.0"] = ("middle_block.0", _UNET_RES)
    m["mid_block.attentions.0"] = ("middle_block.1", _SAME)
    m["mid_block.resnets.1"] = ("middle_block.2" if mid_attention else "middle_block.1", _UNET_RES)
    for u in range(levels):
        level = levels - 1 - u
        for j in range(n + 1):
            m[f"up_blocks.{u}.resnets.{j}"] = (f"output_blocks.{u * (n + 1) + j}.0", _UNET_RES)
            m[f"up_blocks.{u}.attentions.{j}"] = (f"output_blocks.{u * (n + 1) + j}.1", _SAME)
        if level > 0:
            slot = 2 if level in attention_levels else 1
            m[f"up_blocks.{u}.upsamplers.0.conv"] = (f"output_blocks.{u * (n + 1) + n}.{slot}.conv", _SAME)
    return m


def unet_modules_of(cfg: UNetConfig) -> dict[str, tuple[str, Mapping[str, str]]]:
    """`unet_module_map` for the structure of `cfg`."""
    attention = [i for i in range(cfg.num_levels) if cfg.has_attention(i)]
    return unet_module_map(cfg.num_levels, cfg.num_res_blocks, attention, cfg.use_attention and cfg.mid_attention)


def unet_key_map(cfg: UNetConfig) -> dict[str, str]:
    """ldmkit U-Net key → original key (without `model.diffusion_model.`), for every key of `UNet(cfg)`."""
    with torch.device("meta"):
        keys = list(UNet(cfg).state_dict())
    return _map_keys(keys, unet_modules_of(cfg))


def original_unet_module(path: str, modules: Mapping[str, tuple[str, Mapping[str, str]]]) -> str:
    """The original name of one U-Net module path (a LoRA's layer), e.g. `down_blocks.1.attentions.0.
    transformer_blocks.0.attn1.to_q` → `input_blocks.4.1.transformer_blocks.0.attn1.to_q` (SDXL)."""
    return _map_keys([path + ".weight"], modules)[path + ".weight"].removesuffix(".weight")


_VAE_RES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_map(cfg: AutoencoderConfig) -> dict[str, str]:
    """ldmkit (= diffusers) autoencoder key → original key (without `first_stage_model.`)."""
    levels = len(cfg.channel_mult)
    m: dict[str, tuple[str, Mapping[str, str]]] = {"quant_conv": ("quant_conv", _SAME), "post_quant_conv": ("post_quant_conv", _SAME)}
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = (f"{part}.conv_in", _SAME)
        m[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _VAE_RES)
        m[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _VAE_RES)
        m[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTN)
        m[f"{part}.conv_norm_out"] = (f"{part}.norm_out", _SAME)
        m[f"{part}.conv_out"] = (f"{part}.conv_out", _SAME)
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RES)
        for j in range(cfg.num_res_blocks + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{levels - 1 - i}.block.{j}", _VAE_RES)
        m[f"encoder.down_blocks.{i}.downsamplers.0"] = (f"encoder.down.{i}.downsample", _SAME)
        m[f"decoder.up_blocks.{i}.upsamplers.0"] = (f"decoder.up.{levels - 1 - i}.upsample", _SAME)
    with torch.device("meta"):
        keys = list(AutoencoderKL(cfg).state_dict())
    return _map_keys(keys, m)


def _is_vae_attention_weight(ldmkit_key: str) -> bool:
    return ".mid_block.attentions.0." in ldmkit_key and ldmkit_key.endswith(
        ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    )


def vae_to_original(sd: Mapping[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    out = {}
    for k, o in vae_key_map(cfg).items():
        t = sd[k]
        out[o] = t[:, :, None, None] if _is_vae_attention_weight(k) else t  # Linear → 1x1 conv
    return out


def _sub(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def infer_vae_config(sd: Mapping[str, torch.Tensor], **overrides) -> AutoencoderConfig:
    """The autoencoder architecture of original-format VAE weights (no prefix). GroupNorm groups
    (32 in CompVis) and the latent scale are not in the weights: pass them in `overrides`."""
    try:
        base = sd["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
        widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
        blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
        latent = sd["decoder.conv_in.weight"].shape[1]
        moments = sd["encoder.conv_out.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise LdmkitError(f"the VAE weights are incomplete (no {e}); is this a Stable Diffusion VAE?") from None
    if moments != 2 * latent:
        raise LdmkitError(f"the VAE encoder outputs {moments} channels for {latent} latent channels; only KL VAEs are supported")
    if any(w % base for w in widths):
        raise LdmkitError(f"VAE widths {widths} are not multiples of the first width")
    if "norm_groups" not in overrides and any(w % 32 for w in widths):
        raise LdmkitError(f"VAE widths {widths} do not fit CompVis' 32 GroupNorm groups; pass config= with the real norm groups")
    fields = dict(
        in_channels=sd["encoder.conv_in.weight"].shape[1], latent_channels=latent, base_channels=base,
        channel_mult=tuple(w // base for w in widths), num_res_blocks=blocks,
        mid_attention="encoder.mid.attn_1.q.weight" in sd, norm_groups=32, variational=True,
        use_quant_conv="quant_conv.weight" in sd,
    )  # fmt: skip
    if "scaling_factor" not in overrides:
        if latent != 4:
            raise LdmkitError(
                f"the file does not store the latent scale of its {latent}-channel VAE; pass a config "
                "(e.g. ldmkit.interop.presets.VAE_PRESETS['sd3']() or a diffusers folder)"
            )
        fields["scaling_factor"] = 0.18215  # SD 1/2 (the value diffusers assumes too)
    return AutoencoderConfig(**(fields | overrides))


def infer_unet_config(sd: Mapping[str, torch.Tensor], **overrides) -> UNetConfig:
    """The U-Net architecture of original-format weights (no prefix). Attention heads are not in
    the weights: SD's are used for SD's shapes (8 heads with a 768-d context, 64-channel heads with a
    1024-d one, and with SDXL's 2048-d one); anything else needs `num_heads` or `head_dim` in `overrides` (or a config)."""
    try:
        c0 = sd["input_blocks.0.0.weight"].shape[0]
        in_ch = sd["input_blocks.0.0.weight"].shape[1]
        out_ch = sd["out.2.weight"].shape[0]
        n_in = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    except (KeyError, ValueError) as e:
        raise LdmkitError(f"the U-Net weights are incomplete (no {e}); is this a Stable Diffusion U-Net?") from None
    downs = sorted(int(k.split(".")[1]) for k in sd if re.match(r"input_blocks\.\d+\.0\.op\.weight$", k))
    levels = len(downs) + 1
    n = (n_in - 1 - len(downs)) // levels
    if n < 1 or n_in != 1 + levels * n + len(downs):
        raise LdmkitError("the U-Net's input_blocks do not form levels of equal depth; ldmkit cannot represent it")
    widths, attention = [], []
    for i in range(levels):
        k = 1 + i * (n + 1)
        widths.append(sd[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0])
        if f"input_blocks.{k}.1.proj_in.weight" in sd:
            attention.append(i)

    def depth(block: str) -> int:  # transformer blocks in one spatial transformer (SDXL: 1, 2, 10 per level)
        head = block + "transformer_blocks."
        return 1 + max((int(k[len(head) :].split(".")[0]) for k in sd if k.startswith(head)), default=0)

    depths = [depth(f"input_blocks.{1 + i * (n + 1)}.1.") if i in attention else None for i in range(levels)]
    mid_attention = "middle_block.1.proj_in.weight" in sd
    if mid_attention and depth("middle_block.1.") != (depths[-1] or depth("middle_block.1.")):
        raise LdmkitError(f"the middle block has {depth('middle_block.1.')} transformer blocks and the last level "
                          f"{depths[-1]}; ldmkit's U-Net gives the middle block the last level's depth")
    if mid_attention and depths[-1] is None:
        depths[-1] = depth("middle_block.1.")
    known = sorted({d for d in depths if d is not None})
    transformer_depth: int | tuple[int, ...] = known[0] if len(known) <= 1 else tuple(d or 1 for d in depths)
    first = f"input_blocks.{1 + attention[0] * (n + 1)}.1." if attention else "middle_block.1."
    to_k = sd.get(first + "transformer_blocks.0.attn2.to_k.weight")
    context = None if to_k is None else to_k.shape[1]
    proj = sd.get(first + "proj_in.weight")
    emb_rows = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    label = sd.get("label_emb.weight")
    adm = sd.get("label_emb.0.0.weight")  # SDXL's text_time embedding: (4·C0, pooled + k·256)
    fields: dict[str, Any] = dict(
        in_channels=out_ch if in_ch > out_ch else in_ch, out_channels=out_ch,
        concat_channels=max(in_ch - out_ch, 0), model_channels=c0, channel_mult=tuple(w // c0 for w in widths),
        num_res_blocks=n, attention_levels=tuple(attention), mid_attention=mid_attention,
        transformer_depth=transformer_depth or 1, context_dim=context,
        use_linear_projection=proj is not None and proj.ndim == 2,
        emb_mode="scale_shift" if emb_rows == 2 * widths[0] else "add",
        num_classes=0 if label is None else label.shape[0] - 1, vector_dim=0 if adm is None else adm.shape[1],
        zero_init=False,
    )  # fmt: skip
    if "norm_groups" not in overrides and any(w % 32 for w in widths):
        raise LdmkitError(f"U-Net widths {widths} do not fit CompVis' 32 GroupNorm groups; pass config= with the real norm groups")
    if "num_heads" not in overrides and "head_dim" not in overrides:
        if context == 768:
            fields["num_heads"] = 8  # SD 1.x
        elif context in (1024, 2048, 1280):
            fields |= {"head_dim": 64, "num_heads": None}  # SD 2.x, SDXL base (768 + 1280) and refiner (1280)
        else:
            raise LdmkitError(
                "the number of attention heads is not stored in the weights and this is not an SD 1/2 U-Net; "
                "pass config= (a diffusers folder with unet/config.json, or a LatentDiffusionConfig)"
            )
    try:
        return UNetConfig(**(fields | overrides))
    except ValueError as e:
        raise LdmkitError(f"the U-Net weights imply an invalid config: {e}") from None
