"""The original Stable Diffusion single-file format (CompVis `ldm` / Stability `.ckpt` / `.safetensors`).

One flat state dict holds the whole model under three prefixes:

    model.diffusion_model.   the U-Net     (ldm/modules/diffusionmodules/openaimodel.py UNetModel)
    first_stage_model.       the KL VAE    (ldm/modules/diffusionmodules/model.py Encoder/Decoder)
    cond_stage_model.        the text encoder: `transformer.text_model.*` (OpenAI CLIP, SD 1.x) or
                             `model.*` (OpenCLIP, SD 2.x)

plus the noise schedule as buffers (`betas`, `alphas_cumprod`, …) and, in unpruned files, EMA
copies (`model_ema.*`). A stand-alone VAE file has the VAE's keys with no prefix.

SDXL (Stability's `sgm`) keeps the U-Net and VAE prefixes and puts its text encoders under
`conditioner.embedders.`: 0 is CLIP ViT-L (`transformer.text_model.*`, transformers' names), 1 is
OpenCLIP ViT-bigG (`model.*`, OpenCLIP's names, all blocks and `text_projection`, which gives the pooled
embedding). Its U-Net adds `label_emb.0.0/0.2` (the text_time embedding of pooled text + size/crop
values, diffusers' `add_embedding`) and varies the transformer depth per level; its VAE is SD's network
with the latent scale 0.13025. A file with `conditioner.embedders.` is read as SDXL; the refiner has one
OpenCLIP bigG as embedders.0 (`model.*`) and aesthetic-score conditioning (`label_emb` input 1280 + 5·256).

The key maps below are written from the structure each config implies (levels, ResBlocks per
level, where the attention blocks are), not from a list of names, so they hold for every size:

    U-Net (ldmkit = diffusers name → CompVis name), n = num_res_blocks, L = levels:
      conv_in                        input_blocks.0.0
      time_embedding.linear_1 / _2   time_embed.0 / time_embed.2
      class_embedding                label_emb
      down_blocks.i.resnets.j        input_blocks.(1 + i(n+1) + j).0     ResBlock renames below
      down_blocks.i.attentions.j     input_blocks.(1 + i(n+1) + j).1     SpatialTransformer: same inner names
      down_blocks.i.downsamplers.0.conv  input_blocks.(1 + i(n+1) + n).0.op
      mid_block.resnets.0 / attentions.0 / resnets.1   middle_block.0 / .1 / .2
      up_blocks.u.resnets.j          output_blocks.(u(n+1) + j).0
      up_blocks.u.attentions.j       output_blocks.(u(n+1) + j).1
      up_blocks.u.upsamplers.0.conv  output_blocks.(u(n+1) + n).(2 if attention else 1).conv
      conv_norm_out / conv_out       out.0 / out.2
      ResBlock: norm1 → in_layers.0, conv1 → in_layers.2, time_emb_proj → emb_layers.1,
                norm2 → out_layers.0, conv2 → out_layers.3, conv_shortcut → skip_connection

    VAE: encoder.down_blocks.i.resnets.j → encoder.down.i.block.j, …downsamplers.0 → …down.i.downsample,
      decoder.up_blocks.u → decoder.up.(L-1-u) (CompVis numbers decoder levels by resolution),
      mid_block.resnets.0/1 → mid.block_1/2, mid_block.attentions.0 → mid.attn_1, conv_norm_out → norm_out,
      ResBlock conv_shortcut → nin_shortcut; attention group_norm/to_q/to_k/to_v/to_out.0 →
      norm/q/k/v/proj_out, which are 1x1 convolutions there: weights (C, C, 1, 1) vs Linear (C, C).

What the weights do not say (attention heads, GroupNorm groups, the latent scale, the schedule,
the image size, the tokenizer) comes, in this order, from an explicit `config`, from the ldmkit
metadata that `save_original` embeds in the file, or from Stable Diffusion's conventions (SD 1
heads / scale 0.18215 / ε; a 1024-d context means SD 2: 64-channel heads, v-prediction, 768 px);
when none applies the reader says what to pass instead of guessing.

A `.ckpt` is a pickle. It is read with `torch.load(weights_only=True)`, which refuses anything but
tensors and plain containers; a file that holds other Python objects is refused with the way to
re-save it, never unpickled "unsafely" behind the user's back.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.errors import LdmkitError
from ldmkit.interop.diffusers import assemble
from ldmkit.interop.original_clip import (
    _build_clip,
    _clip_config_from_weights,
    _tokenizer_files,
    _tokenizer_from_files,
    clip_canonical,
    clip_from_original,
    clip_to_original,
    sdxl_text_from_original,
    sdxl_text_to_original,
)
from ldmkit.interop.original_keys import (
    CONDITIONER_PREFIX,
    REFINER_OPENCLIP_PREFIX,
    SDXL_OPENCLIP_PREFIX,
    _IGNORED_KEYS,
    _IGNORED_PREFIXES,
    _SCHEDULE_BUFFERS,
    SINGLE_FILE_SUFFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    _is_vae_attention_weight,
    _sub,
    check_unet_expressible,
    infer_unet_config,
    infer_vae_config,
    unet_key_map,
    vae_key_map,
    vae_to_original,
)
from ldmkit.unet import UNet, UNetConfig

# ---------------------------------------------------------------------------------------------
# Reading files


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(flat state dict, ldmkit metadata or {}) of a .safetensors or .ckpt file."""
    path = Path(path)
    if not path.is_file():
        raise LdmkitError(f"{path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise LdmkitError(f"cannot read {path} as safetensors ({type(e).__name__}: {e}); the file is damaged or not safetensors") from e
        return sd, _ldmkit_meta(meta.get("ldmkit"), path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if not found:  # not a weights-only refusal: a damaged or foreign file
            detail = str(e).splitlines()[-1][:200]
            raise LdmkitError(f"cannot read {path} as a PyTorch checkpoint ({detail}); the file is damaged or not a .ckpt") from None
        raise LdmkitError(
            f"{path} contains arbitrary Python objects besides tensors (e.g. {found.group(1)}); ldmkit will not "
            "unpickle them, since that can run any code. If you trust the file, re-save its tensors once: "
            f"python -c \"import torch; from safetensors.torch import save_file; c = torch.load('{path}', "
            "weights_only=False); save_file({k: v.contiguous() for k, v in c.get('state_dict', c).items() "
            f"if isinstance(v, torch.Tensor)}}, '{path.with_suffix('.safetensors')}')\" and use the .safetensors file"
        ) from None
    except Exception as e:  # noqa: BLE001 - zip/EOF errors of a damaged file
        raise LdmkitError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, Mapping):
        raise LdmkitError(f"{path} holds a {type(obj).__name__}, not a state dict")
    meta = obj.get("ldmkit") or {}
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, Mapping):
        raise LdmkitError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a dict of tensors")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return tensors, _ldmkit_meta(meta, path)


def _ldmkit_meta(raw, path: Path) -> dict[str, Any]:
    """The ldmkit metadata a single file carries (a JSON object, or a dict in a .ckpt), or {}; a damaged
    one is refused naming the file rather than half-read."""
    if not raw:
        return {}
    try:
        meta = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as e:
        raise LdmkitError(f"{path}: its ldmkit metadata is not valid JSON ({e}); the file is damaged, "
                          "re-export it or remove the 'ldmkit' metadata entry") from None
    if not isinstance(meta, Mapping):
        raise LdmkitError(f"{path}: its ldmkit metadata is a {type(meta).__name__}, not a JSON object; the file is damaged")
    return dict(meta)


def _schedule_from_betas(betas: torch.Tensor | None, base) -> Any:
    """The DiffusionConfig whose β match the file's `betas` buffer (SD: scaled_linear), or `base`."""
    from ldmkit.diffusion.schedules import make_schedule

    if betas is None:
        return base
    candidates = [("scaled_linear", 0.00085, 0.012), ("linear", 0.0001, 0.02), ("linear", 0.00085, 0.012), ("cosine", 0.0001, 0.02)]
    for kind, start, end in candidates:
        for zsnr in (False, True):
            ref = make_schedule(kind, len(betas), start, end, zsnr).betas
            if torch.allclose(betas.double(), ref, rtol=1e-4, atol=1e-7):
                return base.model_copy(update=dict(schedule=kind, beta_start=start, beta_end=end,
                                                   num_timesteps=len(betas), zero_terminal_snr=zsnr))
    raise LdmkitError("the file's noise schedule (betas) is none ldmkit builds; pass config= with its DiffusionConfig")


def _check_extras(sd: Mapping[str, torch.Tensor], used: set[str], path: Path) -> None:
    """Refuse keys that found no place and are not known non-weights (schedule buffers, EMA, …)."""
    extra = sorted(
        k for k in sd
        if k not in used and k not in _SCHEDULE_BUFFERS and k not in _IGNORED_KEYS and not k.startswith(_IGNORED_PREFIXES)
    )  # fmt: skip
    if extra:
        more = ", …" if len(extra) > 6 else ""
        hint = " (diffusers names: put a diffusers file in a folder with its config.json)" if any(
            ".down_blocks." in k or k.startswith("down_blocks.") for k in extra) else ""  # fmt: skip
        raise LdmkitError(f"{path} has {len(extra)} keys ldmkit cannot place: {', '.join(extra[:6])}{more}{hint}")


def _load_mapped(what: str, module: nn.Module, key_map: Mapping[str, str], theirs: Mapping[str, torch.Tensor],
                 prefix: str, reshape=lambda k, t: t) -> set[str]:  # fmt: skip
    """Copy `theirs` (original names without `prefix`) into the meta-device `module` through
    `key_map`, after refusing missing, unexpected and mis-shaped keys, named as in the file.
    Returns the file keys consumed."""
    own = module.state_dict()
    inverse = {o: k for k, o in key_map.items()}
    missing = sorted(prefix + o for o in inverse if o not in theirs)
    unexpected = sorted(prefix + o for o in theirs if o not in inverse)
    if missing or unexpected:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{label} {len(keys)} keys ({', '.join(keys[:5])}{', …' if len(keys) > 5 else ''})")
        raise LdmkitError(f"{what} does not match its config: {'; '.join(parts)}; is it a complete checkpoint of this model?")
    found = {k: reshape(k, theirs[o]) for k, o in key_map.items()}
    bad = [f"{prefix}{key_map[k]}: {tuple(t.shape)} vs {tuple(own[k].shape)}" for k, t in found.items() if t.shape != own[k].shape]
    if bad:
        raise LdmkitError(f"{what} has {len(bad)} tensors of the wrong shape (file vs config): {'; '.join(bad[:4])}")
    # fresh float32 copies: tensors read from a file can sit at unaligned addresses, which makes
    # CPU kernels take other (equally valid, not bit-identical) code paths
    module.load_state_dict({k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True) for k, v in found.items()}, assign=True)
    return {prefix + o for o in theirs}


def _config_from(config, meta: Mapping[str, Any]):
    """(LatentDiffusionConfig | AutoencoderConfig | UNetConfig | None, CLIP config dict or None,
    tokenizer or None) from an explicit `config` (a config object or a diffusers pipeline folder) or,
    without one, the ldmkit metadata of the file."""
    from ldmkit.pipeline import LatentDiffusionConfig

    if config is None and meta.get("config"):
        cls = {"autoencoder": AutoencoderConfig, "unet": UNetConfig}.get(meta.get("kind"), LatentDiffusionConfig)
        tok = _tokenizer_from_files(meta["tokenizer"]) if meta.get("tokenizer") else None
        return cls.model_validate(meta["config"]), meta.get("text_encoder_config"), tok
    if config is None or isinstance(config, (LatentDiffusionConfig, AutoencoderConfig, UNetConfig)):
        return config, None, None
    from ldmkit.conditioning.text import find_tokenizer_folder
    from ldmkit.interop.diffusers import is_pipeline_folder, pipeline_config

    folder = Path(config)
    if not is_pipeline_folder(folder):
        raise LdmkitError(f"config {folder} is not a diffusers pipeline folder (model_index.json, unet/, vae/, …)")
    cfg, _ = pipeline_config(folder)
    text_cfg, tok = None, None
    if (folder / "text_encoder" / "config.json").is_file():
        text_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    tok_folder = find_tokenizer_folder(folder / "text_encoder")
    if tok_folder is not None:
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(str(tok_folder), local_files_only=True)
    return cfg, text_cfg, tok


SDXL_SCALE = 0.13025  # SDXL's VAE latent scale (its diffusers vae/config.json scaling_factor)


def _check_sdxl_file(sd: Mapping[str, torch.Tensor], path: Path, config, meta) -> bool | str:
    """Whether the file is an SDXL model with its text encoders ("refiner" for a refiner: bigG alone as
    embedders.0); an SDXL U-Net + VAE without its text encoders and no config folder to take them from is
    refused in one line."""
    if any(k.startswith(REFINER_OPENCLIP_PREFIX) for k in sd):
        return "refiner"
    if any(k.startswith(CONDITIONER_PREFIX) for k in sd):
        if not any(k.startswith(SDXL_OPENCLIP_PREFIX) for k in sd):
            raise LdmkitError(f"{path} has conditioner.embedders.0 but no OpenCLIP bigG text encoder "
                              "(conditioner.embedders.1.model.*): the file is incomplete; re-download it")
        return True
    if meta:  # ldmkit wrote it: its own config says what the model is (a vector route alone is not SDXL)
        return False
    # an SDXL U-Net by diffusers' rule (a label_emb MLP and a 2048-wide context) with a VAE: the text is missing
    context = next((v.shape[1] for k, v in sd.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")), None)
    if UNET_PREFIX + "label_emb.0.0.weight" not in sd or context != 2048 or not any(k.startswith(VAE_PREFIX) for k in sd):
        return False
    if config is None:
        raise LdmkitError(
            f"{path} holds an SDXL U-Net and VAE but not its two text encoders (conditioner.embedders.*); pass "
            "config= an SDXL diffusers folder (text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/), or load "
            "the complete single file")
    return False  # read as SD 1/2 files are: the folder given as config supplies every config and the text encoders


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _sdxl_text_encoder(sd: Mapping[str, torch.Tensor], path: Path, meta: Mapping[str, Any], config) -> tuple[nn.Module, set[str]]:
    """SDXL's two text encoders (ldmkit's `SDXLTextEncoder`) from the file's `conditioner.embedders.*`, their
    configs and tokenizers from the file's ldmkit metadata or the SDXL diffusers folder `config`; and the file
    keys consumed."""
    from transformers import CLIPTokenizer

    from ldmkit.conditioning.text import CLIPPenultimateEncoder, SDXLTextEncoder

    folder = Path(config) if isinstance(config, (str, Path)) else None
    clip_l, bigg, consumed = sdxl_text_from_original(sd)  # clip_l None: a refiner
    configs, tokenizers = [None, None], [None, None]
    for i, (sub, tok) in enumerate((("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))):
        canonical = (clip_l, bigg)[i]
        if canonical is None:
            continue
        c = meta.get(f"{sub}_config") or (_read_json(folder / sub / "config.json") if folder else None)
        if c is None:  # CLIP ViT-L (OpenAI: quick_gelu) and OpenCLIP bigG (gelu), 64-channel heads
            c = _clip_config_from_weights(canonical, "clip" if i == 0 else "openclip")
            if i == 1:
                c["projection_dim"] = canonical["text_projection.weight"].shape[0]
        configs[i] = c
        if meta.get(tok):
            tokenizers[i] = _tokenizer_from_files(meta[tok])
        elif folder is not None and (folder / tok).is_dir():
            tokenizers[i] = CLIPTokenizer.from_pretrained(str(folder / tok), local_files_only=True)
        else:
            raise LdmkitError(f"{path} holds SDXL's text encoders but not their tokenizers; pass config= an SDXL "
                              "diffusers folder with tokenizer/ and tokenizer_2/ (a refiner's: tokenizer_2/)")
    first = CLIPPenultimateEncoder.from_parts(_build_clip(clip_l, configs[0]), tokenizers[0]) if clip_l is not None else None
    second = CLIPPenultimateEncoder.from_parts(_build_clip(bigg, configs[1], projection=True), tokenizers[1])
    return SDXLTextEncoder(first, second, path=f"{path}#conditioner"), consumed


def load_original(path: str | Path, config=None, ema: bool = False, device: str | torch.device = "cpu") -> nn.Module:
    """An original-format single file → `LatentDiffusion` (U-Net + VAE [+ CLIP]), `AutoencoderKL`
    (a VAE file) or `UNet` (a U-Net alone), in eval mode, float32.

    `config`: a diffusers pipeline folder, a `LatentDiffusionConfig`, `AutoencoderConfig` or
    `UNetConfig`, for what the weights do not say (see the module docstring); files ldmkit wrote
    carry their own. `ema`: take the U-Net from the `model_ema.*` copy when the file has one
    (diffusers' `extract_ema`). Every key must find its place: a partial or mismatched file is
    refused with the keys named, never half-loaded."""
    from ldmkit.conditioning.conditioner import Conditioner
    from ldmkit.conditioning.text import CLIPTextEncoder
    from ldmkit.pipeline import LatentDiffusionConfig

    path = Path(path)
    sd, meta = read_state_dict(path)
    sdxl = _check_sdxl_file(sd, path, config, meta)
    cfg, text_cfg, tokenizer = _config_from(config, meta)
    has_unet = any(k.startswith(UNET_PREFIX) for k in sd)
    if any(k.startswith(VAE_PREFIX) for k in sd):
        vae_prefix: str | None = VAE_PREFIX
    else:  # a stand-alone VAE file has no prefix
        vae_prefix = "" if "encoder.conv_in.weight" in sd and "decoder.conv_in.weight" in sd else None
    if not has_unet and vae_prefix is None:
        sample = ", ".join(sorted(sd)[:4])
        raise LdmkitError(
            f"{path} is not a Stable Diffusion checkpoint: no model.diffusion_model. or first_stage_model. keys "
            f"(found {sample}{', …' if len(sd) > 4 else ''})"
        )
    part = lambda name: getattr(cfg, name, None) if isinstance(cfg, LatentDiffusionConfig) else None  # noqa: E731
    used: set[str] = set()

    ae = None
    if vae_prefix is not None:
        if vae_prefix:
            theirs = _sub(sd, vae_prefix)
        else:
            theirs = {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
        scale = {"scaling_factor": SDXL_SCALE} if sdxl else {}  # SDXL's VAE: SD's network, retrained, rescaled
        vcfg = cfg if isinstance(cfg, AutoencoderConfig) else part("autoencoder") or infer_vae_config(theirs, **scale)
        with torch.device("meta"):
            ae = AutoencoderKL(vcfg)
        reshape = lambda k, t: t.reshape(t.shape[0], -1) if _is_vae_attention_weight(k) else t  # noqa: E731
        used |= _load_mapped(f"the VAE in {path.name}", ae, vae_key_map(vcfg), theirs, vae_prefix, reshape)
        ae = ae.eval().requires_grad_(False)
    unet = None
    if has_unet:
        theirs = _sub(sd, UNET_PREFIX)
        ucfg = cfg if isinstance(cfg, UNetConfig) else part("unet") or infer_unet_config(theirs)
        check_unet_expressible(ucfg)
        key_map = unet_key_map(ucfg)
        flat = {"model_ema." + ("diffusion_model." + o).replace(".", ""): o for o in key_map.values()}
        if ema and all(f in sd for f in flat):
            theirs = {o: sd[f] for f, o in flat.items()}
        with torch.device("meta"):
            unet = UNet(ucfg)
        used |= _load_mapped(f"the U-Net in {path.name}", unet, key_map, theirs, UNET_PREFIX)
        unet = unet.eval()
    text = None
    text_sd = {k: v for k, v in sd.items() if k.startswith("cond_stage_model.")}
    if sdxl and ae is not None and unet is not None:
        text, consumed = _sdxl_text_encoder(sd, path, meta, config)
        used |= consumed
    elif text_sd and ae is not None and unet is not None:
        canonical, layout, consumed = clip_from_original(text_sd)
        used |= consumed
        model = _build_clip(canonical, text_cfg or _clip_config_from_weights(canonical, layout))
        if tokenizer is None:
            raise LdmkitError(
                f"{path} holds a CLIP text encoder but no tokenizer; pass config= a diffusers SD folder "
                "with tokenizer/ (SD 1 and SD 2 use the same CLIP tokenizer)"
            )
        text = CLIPTextEncoder.from_parts(model, tokenizer)
    _check_extras(sd, used, path)
    if unet is None:
        return ae.to(device)
    if ae is None:
        return unet.to(device)

    if not isinstance(cfg, LatentDiffusionConfig):
        from ldmkit.interop.presets import sd1, sd2, sdxl as sdxl_preset

        # SDXL: the preset's schedule, 1024 px and conditioning (pooled bigG + size/crop, zero negative text)
        preset = sdxl_preset() if sdxl else sd2() if unet.config.context_dim == 1024 else sd1()
        if sdxl == "refiner":  # aesthetic scores for the target size; stabilityai's refiner encodes the empty negative
            preset.conditioner = preset.conditioner.model_copy(update={"aesthetic_score": True, "zero_uncond": False})
        diffusion = _schedule_from_betas(sd.get("betas"), preset.diffusion)
        cfg = LatentDiffusionConfig(autoencoder=ae.config, unet=unet.config, diffusion=diffusion,
                                    conditioner=preset.conditioner, image_size=preset.image_size)  # fmt: skip
    cond_cfg = cfg.conditioner
    if text is not None:  # the weights are in the file; the name says so (and refuses a rebuild)
        where = "conditioner" if sdxl else "cond_stage_model"
        cond_cfg = cond_cfg.model_copy(update={"text_encoder": f"{path}#{where}"})
    elif unet.config.context_dim is not None and cond_cfg.text_encoder is None:
        raise LdmkitError(f"{path} has no text encoder (cond_stage_model) and no config names one; pass config=")
    conditioner = Conditioner(cond_cfg, text_encoder=text)
    full = LatentDiffusionConfig.model_validate(
        cfg.model_dump() | {"autoencoder": ae.config.model_dump(), "unet": unet.config.model_dump(), "conditioner": cond_cfg.model_dump()}
    )
    return assemble(full, ae, unet, conditioner).to(device)


# ---------------------------------------------------------------------------------------------
# Writing files


def _text_layout(enc, layout: str) -> str:
    if layout != "auto":
        return layout
    act = getattr(enc.model.config, "hidden_act", "quick_gelu")
    return "openclip" if act == "gelu" else "clip"  # OpenAI CLIP uses quick_gelu; OpenCLIP (SD 2) gelu


def to_original_state_dict(module: nn.Module, text_layout: str = "auto") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(original-format state dict, ldmkit metadata) of a LatentDiffusion, AutoencoderKL or UNet."""
    from ldmkit.interop.diffusers import _text_encoder_parts
    from ldmkit.pipeline import LatentDiffusion

    if isinstance(module, AutoencoderKL):
        if not module.config.variational:
            raise LdmkitError("a plain (non-variational) autoencoder has no Stable Diffusion form")
        if module.config.bicubic_shortcut:
            raise LdmkitError("an autoencoder with bicubic_shortcut=True has no Stable Diffusion form")
        return vae_to_original(module.state_dict(), module.config), {"kind": "autoencoder", "config": module.config.model_dump(mode="json")}
    if isinstance(module, UNet):
        check_unet_expressible(module.config)
        own = module.state_dict()
        meta = {"kind": "unet", "config": module.config.model_dump(mode="json")}
        return {UNET_PREFIX + o: own[k] for k, o in unet_key_map(module.config).items()}, meta
    if not isinstance(module, LatentDiffusion):
        raise LdmkitError(f"a {type(module).__name__} has no original Stable Diffusion single-file form")
    cfg = module.config
    if not cfg.autoencoder.variational:
        raise LdmkitError("a plain (non-variational) autoencoder has no Stable Diffusion form")
    if cfg.autoencoder.bicubic_shortcut:
        raise LdmkitError("an autoencoder with bicubic_shortcut=True has no Stable Diffusion form")
    check_unet_expressible(cfg.unet)
    own = module.unet.state_dict()
    sd = {UNET_PREFIX + o: own[k] for k, o in unet_key_map(cfg.unet).items()}
    sd |= {VAE_PREFIX + k: v for k, v in vae_to_original(module.autoencoder.state_dict(), cfg.autoencoder).items()}
    meta: dict[str, Any] = {"kind": "latent_diffusion", "config": cfg.model_dump(mode="json")}
    from ldmkit.conditioning.text import SDXLTextEncoder

    enc = module.conditioner.text_encoder
    parts = None if isinstance(enc, SDXLTextEncoder) else _text_encoder_parts(module)
    if isinstance(enc, SDXLTextEncoder):  # SDXL's pair: conditioner.embedders.0 (CLIP ViT-L) and .1 (OpenCLIP bigG)
        sd |= sdxl_text_to_original(clip_canonical(enc.first.model) if enc.first is not None else None,
                                    clip_canonical(enc.second.model))  # a refiner: bigG alone as embedders.0
        for i, (sub, tok) in enumerate((("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))):
            part = (enc.first, enc.second)[i]
            if part is None:
                continue
            meta[f"{sub}_config"] = {k: v for k, v in part.model.config.to_dict().items() if not k.startswith("_")}
            meta[tok] = _tokenizer_files(part.tokenizer)
        meta["config"]["conditioner"]["text_encoder"] = None  # the weights are in the file
    elif parts is not None:
        model, tokenizer = parts
        layout = _text_layout(module.conditioner.text_encoder, text_layout)
        sd |= clip_to_original(clip_canonical(model), layout)
        meta["text_encoder_config"] = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
        meta["tokenizer"] = _tokenizer_files(tokenizer)
        meta["config"]["conditioner"]["text_encoder"] = None  # the weights are in the file
    s = module.schedule
    sd["betas"] = s.betas.float()
    sd["alphas_cumprod"] = s.alphas_cumprod.float()
    return sd, meta


def save_original(module: nn.Module, path: str | Path, text_layout: str = "auto", dtype: torch.dtype | None = None) -> Path:
    """Write `module` as one original-format file (.safetensors, or a .ckpt pickle of tensors),
    atomically. The ldmkit config, the text encoder's config and the tokenizer files travel in the
    file's metadata so ldmkit reads it back with nothing else; other tools ignore them.
    `text_layout`: "clip" (SD 1), "openclip" (SD 2) or "auto" (by the CLIP activation)."""
    path = Path(path)
    if path.suffix not in SINGLE_FILE_SUFFIXES[:4]:
        raise LdmkitError(f"{path}: give a .safetensors or .ckpt file name")
    sd, meta = to_original_state_dict(module, text_layout)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous().clone() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, tmp, metadata={"format": "pt", "ldmkit": json.dumps(meta)})
        else:
            torch.save({"state_dict": sd, "ldmkit": json.dumps(meta)}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
