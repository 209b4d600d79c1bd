"""ldmkit ⇄ diffusers: single modules, model folders and whole Stable Diffusion pipeline folders.

    from_diffusers(module)   diffusers AutoencoderKL / UNet2DConditionModel / ControlNetModel / AutoencoderTiny → ldmkit module
    to_diffusers(module)     and back (same weights, copied)
    load_diffusers_model(folder) / save_diffusers_model(module, folder)           config.json + weights
    load_diffusers_pipeline(folder) / save_diffusers_pipeline(ldm, folder)       model_index.json + parts

ldmkit's autoencoder and U-Net carry diffusers' module names, so weights copy key for key; what
this module adds is the translation of configs (refusing, with the option named, whatever the other
side cannot express) and a strict key and shape check before any copy.

A pipeline folder maps to a `LatentDiffusion` like this:

| diffusers                         | ldmkit                                                        |
| --------------------------------- | ------------------------------------------------------------- |
| vae/                              | .autoencoder (scaling_factor, shift_factor in its config)     |
| unet/ (sample_size s)             | .unet; image_size = s · 2^(levels of the VAE − 1)             |
| scheduler/scheduler_config.json   | config.diffusion: beta_schedule, beta_start/end, num_train_timesteps, prediction_type, timestep_spacing, steps_offset, rescale_betas_zero_snr |
| text_encoder/ + tokenizer/ (CLIP) | conditioner: `CLIPTextEncoder` on the folder                  |

Written folders use a `DDIMScheduler` config (sampler choice is ldmkit's at sampling time, so
`clip_sample`/`set_alpha_to_one` are written as SD uses them and ignored when read). ldmkit settings
diffusers has no place for (loss weighting, condition dropout, the text encoder name) are kept in
model_index.json under `_ldmkit`; diffusers ignores keys that start with "_". A model that uses the
bundled MiniLM text encoder gets no text_encoder/ or tokenizer/ (MiniLM is a BERT model, not
something `StableDiffusionPipeline` can run): model_index.json marks them null, `_ldmkit`
records "minilm" and a README.md says so. ldmkit reloads such a folder with MiniLM; diffusers
needs `text_encoder=`/`tokenizer=` passed to `from_pretrained`.

diffusers is imported inside the functions, so ldmkit works without it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ldmkit.autoencoder import AutoencoderConfig, AutoencoderKL
from ldmkit.conditioning.conditioner import AESTHETIC_FIELDS, MICRO_DIM, MICRO_FIELDS
from ldmkit.errors import LdmkitError
from ldmkit.autoencoder.tiny import TinyAutoencoder
from ldmkit.imageio import staging_dir
from ldmkit.interop import diffusers_tiny
from ldmkit.interop.diffusers_unet import config_from_diffusers, config_to_diffusers, unet_from_diffusers, unet_to_diffusers
from ldmkit.unet import UNet, UNetConfig

if TYPE_CHECKING:  # pragma: no cover
    from ldmkit.pipeline import DiffusionConfig, LatentDiffusion

MODEL_INDEX = "model_index.json"
MODEL_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
LDMKIT_KEY = "_ldmkit"  # our settings inside model_index.json; diffusers skips "_" keys


def _diffusers():
    try:
        return importlib.import_module("diffusers")
    except ImportError as e:
        raise LdmkitError("reading and writing diffusers models needs diffusers: pip install 'ldmkit[interop]'") from e


def _controlnet_interop():
    """The ControlNet translation lives in its own module (written with ldmkit.control.controlnet and .adapter)."""
    try:
        return importlib.import_module("ldmkit.interop.diffusers_controlnet")
    except ModuleNotFoundError as e:
        if e.name not in ("ldmkit.interop.diffusers_controlnet", "ldmkit.control.controlnet"):
            raise
        raise LdmkitError("this ldmkit has no ControlNet support (ldmkit.interop.diffusers_controlnet is missing)") from e


def check_state_dicts(what: str, expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> None:
    """Raise LdmkitError naming missing and unexpected keys, then mis-shaped ones, of `found`
    against `expected` (both already in the same naming)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({', '.join(missing[:6])}{', …' if len(missing) > 6 else ''})")
        if unexpected:
            more = ", …" if len(unexpected) > 6 else ""
            parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:6])}{more})")
        raise LdmkitError(f"{what} does not match its config: {'; '.join(parts)}; is it the right file and config?")
    bad = [f"{k}: {tuple(found[k].shape)} vs {tuple(expected[k].shape)}" for k in expected if found[k].shape != expected[k].shape]
    if bad:
        raise LdmkitError(f"{what} has {len(bad)} tensors of the wrong shape (found vs expected): {'; '.join(bad[:4])}")


# ---------------------------------------------------------------------------------------------
# AutoencoderKL


def vae_config_from_diffusers(dcfg: Mapping[str, Any]) -> AutoencoderConfig:
    """A diffusers `AutoencoderKL.config` → `AutoencoderConfig`, or LdmkitError naming every option
    ldmkit's autoencoder cannot represent."""
    get = dcfg.get
    boc = list(get("block_out_channels", (64,)))
    n = len(boc)
    problems = []
    if get("act_fn", "silu") != "silu":
        problems.append(f"act_fn={get('act_fn')!r}")
    down, up = list(get("down_block_types", ())), list(get("up_block_types", ()))
    if down != ["DownEncoderBlock2D"] * n or up != ["UpDecoderBlock2D"] * n:
        problems.append(f"down_block_types={down}, up_block_types={up} (ldmkit: {n} plain encoder/decoder levels)")
    if get("in_channels", 3) != get("out_channels", 3):
        problems.append(f"in_channels={get('in_channels')} != out_channels={get('out_channels')}")
    if get("latents_mean") is not None or get("latents_std") is not None:
        problems.append("per-channel latents_mean/latents_std (ldmkit has one scalar scale and shift)")
    if any(c % boc[0] for c in boc):
        problems.append(f"block_out_channels={boc} (ldmkit needs multiples of the first width)")
    groups = get("norm_num_groups", 32)
    if any(c % groups for c in boc):
        problems.append(f"norm_num_groups={groups} does not divide block_out_channels={boc}")
    if get("use_quant_conv", True) != get("use_post_quant_conv", True):
        problems.append("use_quant_conv != use_post_quant_conv (ldmkit has one switch for both)")
    if problems:
        raise LdmkitError("unsupported diffusers AutoencoderKL config: " + ", ".join(problems))
    try:
        return AutoencoderConfig(
            in_channels=get("in_channels", 3),
            latent_channels=get("latent_channels", 4),
            base_channels=boc[0],
            channel_mult=tuple(c // boc[0] for c in boc),
            num_res_blocks=get("layers_per_block", 1),
            mid_attention=get("mid_block_add_attention", True),
            norm_groups=groups,
            variational=True,
            use_quant_conv=get("use_quant_conv", True),
            scaling_factor=get("scaling_factor", 0.18215),
            shift_factor=get("shift_factor") or 0.0,
        )
    except ValueError as e:  # pydantic's ValidationError
        raise LdmkitError(f"diffusers AutoencoderKL config does not translate: {e}") from None


def vae_config_to_diffusers(cfg: AutoencoderConfig, sample_size: int | None = None, force_upcast: bool = True) -> dict[str, Any]:
    """`AutoencoderConfig` → keyword arguments of diffusers' `AutoencoderKL`, or LdmkitError.

    `sample_size` (the image size diffusers tiles at) and `force_upcast` (fp16 decoding in float32)
    are diffusers-only settings that change no weights."""
    problems = []
    if not cfg.variational:
        problems.append("variational=False (a plain autoencoder; diffusers' AutoencoderKL is always a KL one)")
    if cfg.bicubic_shortcut:
        problems.append("bicubic_shortcut=True (diffusers' AutoencoderKL has no shortcut)")
    bad = [w for w in cfg.widths if w % cfg.norm_groups]
    if bad:
        problems.append(f"norm_groups={cfg.norm_groups} does not divide widths {bad} (diffusers uses it as given)")
    if problems:
        raise LdmkitError("this autoencoder has no diffusers AutoencoderKL equivalent: " + ", ".join(problems))
    n = len(cfg.channel_mult)
    kw: dict[str, Any] = dict(
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.widths),
        layers_per_block=cfg.num_res_blocks,
        act_fn="silu",
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        scaling_factor=cfg.scaling_factor,
        shift_factor=cfg.shift_factor if cfg.shift_factor != 0.0 else None,
        force_upcast=force_upcast,
        mid_block_add_attention=cfg.mid_attention,
    )
    if sample_size is not None:
        kw["sample_size"] = sample_size
    if not cfg.use_quant_conv:  # only newer diffusers (≥ 0.30) know these two
        kw |= dict(use_quant_conv=False, use_post_quant_conv=False)
    return kw


def vae_from_diffusers(model, copy: bool = True) -> AutoencoderKL:
    """An ldmkit `AutoencoderKL` with the same weights (copied; same dtype and device; `copy=False` shares them,
    for a diffusers model that is thrown away afterwards)."""
    cfg = vae_config_from_diffusers(model.config)
    with torch.device("meta"):  # no wasted random init; the weights come from `model`
        ae = AutoencoderKL(cfg)
    theirs = model.state_dict()
    check_state_dicts("the diffusers AutoencoderKL", ae.state_dict(), theirs)
    ae.load_state_dict({k: theirs[k].detach().clone() if copy else theirs[k].detach() for k in ae.state_dict()},
                       assign=True)
    return ae.train(model.training)


def vae_to_diffusers(ae: AutoencoderKL, sample_size: int | None = None, force_upcast: bool = True):
    """A diffusers `AutoencoderKL` with the same weights (copied) as `ae`."""
    dm = _diffusers()
    kw = vae_config_to_diffusers(ae.config, sample_size, force_upcast)
    try:
        with torch.device("meta"):
            model = dm.AutoencoderKL(**kw)
    except TypeError as e:
        raise LdmkitError(f"this diffusers ({dm.__version__}) cannot build the autoencoder ({e}); upgrade diffusers") from e
    ours = ae.state_dict()
    check_state_dicts("the ldmkit autoencoder", model.state_dict(), ours)
    model.load_state_dict({k: v.detach().clone() for k, v in ours.items()}, assign=True)
    return model.train(ae.training)


# ---------------------------------------------------------------------------------------------
# Dispatch


def from_diffusers(module, **kwargs) -> nn.Module:
    """diffusers `AutoencoderKL` / `UNet2DConditionModel` / `ControlNetModel` → the ldmkit module
    with the same weights. Extra keyword arguments go to the specific converter."""
    dm = _diffusers()
    if isinstance(module, dm.AutoencoderKL):
        return vae_from_diffusers(module, **kwargs)
    if isinstance(module, dm.UNet2DConditionModel):
        return unet_from_diffusers(module, **kwargs)
    if type(module).__name__ == "ControlNetModel":
        return _controlnet_interop().controlnet_from_diffusers(module, **kwargs)
    if type(module).__name__ == diffusers_tiny.CLASS_NAME:
        return diffusers_tiny.tiny_from_diffusers(module)
    raise LdmkitError(
        f"cannot convert a {type(module).__name__}: from_diffusers takes an AutoencoderKL, a "
        "UNet2DConditionModel or a ControlNetModel (or an AutoencoderTiny; whole pipelines: load_diffusers_pipeline(folder))"
    )


def to_diffusers(module: nn.Module, **kwargs):
    """ldmkit `AutoencoderKL` / `UNet` / ControlNet → the diffusers module with the same weights.
    Keyword arguments: diffusers-only settings (`sample_size`, …) of the specific converter."""
    if isinstance(module, AutoencoderKL):
        return vae_to_diffusers(module, **kwargs)
    if isinstance(module, UNet):
        return unet_to_diffusers(module, **kwargs)
    if isinstance(module, TinyAutoencoder):
        return diffusers_tiny.tiny_to_diffusers(module)
    if type(module).__module__ in ("ldmkit.control.controlnet", "ldmkit.control.adapter"):
        return _controlnet_interop().controlnet_to_diffusers(module, **kwargs)
    if type(module).__name__ == "LatentDiffusion":
        raise LdmkitError("a LatentDiffusion is a whole pipeline: write it with save_diffusers_pipeline(ldm, folder)")
    raise LdmkitError(f"a {type(module).__name__} has no diffusers equivalent")


# ---------------------------------------------------------------------------------------------
# Scheduler config ⇄ DiffusionConfig

_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def diffusion_config_from_scheduler(scfg: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> DiffusionConfig:
    """A diffusers scheduler config (any DDPM-family scheduler) → `DiffusionConfig`. `base` holds
    ldmkit-only fields (loss weighting …) to keep. Missing keys take diffusers' defaults."""
    from ldmkit.pipeline import DiffusionConfig

    get = scfg.get
    if get("trained_betas") is not None:
        raise LdmkitError("unsupported scheduler config: trained_betas (ldmkit builds β from a named schedule)")
    kind = get("beta_schedule", "linear")
    if kind not in _SCHEDULE:
        raise LdmkitError(f"unsupported scheduler config: beta_schedule={kind!r} (ldmkit: {', '.join(_SCHEDULE)})")
    prediction = get("prediction_type", "epsilon")
    if prediction not in _PREDICTION:
        raise LdmkitError(f"unsupported scheduler config: prediction_type={prediction!r} (ldmkit: {', '.join(_PREDICTION)})")
    fields = dict(base or {}) | dict(
        schedule=_SCHEDULE[kind],
        num_timesteps=get("num_train_timesteps", 1000),
        beta_start=get("beta_start", 0.0001),
        beta_end=get("beta_end", 0.02),
        zero_terminal_snr=bool(get("rescale_betas_zero_snr", False)),
        prediction_type=_PREDICTION[prediction],
        timestep_spacing=get("timestep_spacing", "leading"),  # diffusers' default, and SD's
        steps_offset=get("steps_offset", 0),
    )
    try:
        return DiffusionConfig(**fields)
    except ValueError as e:
        raise LdmkitError(f"scheduler config does not translate: {e}") from None


def diffusion_config_to_scheduler(d: DiffusionConfig) -> dict[str, Any]:
    """`DiffusionConfig` → keyword arguments of diffusers' `DDIMScheduler`."""
    inv_schedule = {v: k for k, v in _SCHEDULE.items()}
    inv_prediction = {v: k for k, v in _PREDICTION.items()}
    return dict(
        num_train_timesteps=d.num_timesteps,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        beta_schedule=inv_schedule[d.schedule],
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=d.steps_offset,
        prediction_type=inv_prediction[d.prediction_type],
        timestep_spacing=d.timestep_spacing,
        rescale_betas_zero_snr=d.zero_terminal_snr,
    )


# ---------------------------------------------------------------------------------------------
# Folders


def is_model_folder(path: str | Path) -> bool:
    """A diffusers model folder: config.json with a `_class_name` next to its weights."""
    path = Path(path)
    try:
        return path.is_dir() and "_class_name" in json.loads((path / MODEL_CONFIG).read_text())
    except (OSError, ValueError, TypeError):
        return False


def is_pipeline_folder(path: str | Path) -> bool:
    return (Path(path) / MODEL_INDEX).is_file()


@contextlib.contextmanager
def _quiet():
    """diffusers/transformers warnings off while we load: problems become one LdmkitError instead."""
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _from_pretrained(cls, folder: Path):
    """`cls.from_pretrained(folder)` offline, refusing the partial loads diffusers only warns about
    (missing keys are otherwise left randomly initialised)."""
    try:
        with _quiet():
            model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(ln for ln in lines if ln.startswith("size mismatch"))[:400]
        # with accelerate installed diffusers loads through another path, which words a mismatch its own way
        shapes = re.search(r"because (\S+) expected shape (torch\.Size\(\[[^\]]*\]\)), but got (torch\.Size\(\[[^\]]*\]\))",
                           str(e))
        if not detail and shapes:
            detail = f"size mismatch for {shapes[1]}: the file holds {shapes[3]}, the config asks for {shapes[2]}"
        detail = detail or (lines[0] if lines else type(e).__name__)
        raise LdmkitError(f"cannot load {folder}: {detail}") from e
    parts = []
    for label in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(label) or []]
        if keys:
            parts.append(f"{label.replace('_', ' ')} ({len(keys)}: {', '.join(keys[:5])}{', …' if len(keys) > 5 else ''})")
    if parts:
        raise LdmkitError(f"the weights in {folder} do not match its config.json: {'; '.join(parts)}")
    return model.eval()


_MODEL_CLASSES = ("AutoencoderKL", "UNet2DConditionModel", "ControlNetModel")


def load_diffusers_model(folder: str | Path, **kwargs) -> nn.Module:
    """A diffusers model folder (config.json + diffusion_pytorch_model.safetensors) → ldmkit module."""
    folder = Path(folder)
    if not is_model_folder(folder):
        raise LdmkitError(f"{folder} is not a diffusers model folder (no config.json with a _class_name)")
    name = json.loads((folder / MODEL_CONFIG).read_text())["_class_name"]
    if name == diffusers_tiny.CLASS_NAME:  # TAESD: read with safetensors alone, diffusers not needed
        return diffusers_tiny.load_diffusers_tiny(folder)
    if name not in _MODEL_CLASSES:
        raise LdmkitError(f"{folder} holds a diffusers {name}; ldmkit reads {', '.join(_MODEL_CLASSES)}, AutoencoderTiny")
    model = _from_pretrained(getattr(_diffusers(), name), folder)
    return from_diffusers(model, **kwargs).eval()


def save_diffusers_model(module: nn.Module, folder: str | Path, **kwargs) -> Path:
    """Write an ldmkit autoencoder / U-Net / ControlNet / tiny autoencoder as a diffusers model folder."""
    if isinstance(module, TinyAutoencoder):
        return diffusers_tiny.save_diffusers_tiny(module, folder)
    model = to_diffusers(module, **kwargs)
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise LdmkitError(f"{folder} exists and is not empty; remove it or choose another output folder")
    with staging_dir(folder) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
    return folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LdmkitError(f"cannot read {path} ({type(e).__name__}); is the folder complete?") from e


def pipeline_config(folder: str | Path):
    """The `LatentDiffusionConfig` a diffusers SD pipeline folder describes (no weights read), and
    the text encoder entry of its model_index.json."""
    from ldmkit.conditioning.conditioner import ConditionerConfig
    from ldmkit.pipeline import LatentDiffusionConfig

    folder = Path(folder)
    index = _read_json(folder / MODEL_INDEX)
    ours = index.get(LDMKIT_KEY) or {}
    for part, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        entry = index.get(part)
        if not entry or entry[1] != cls:
            raise LdmkitError(
                f"{folder} is a {index.get('_class_name', 'diffusers')} whose {part} is {entry and entry[1]}; "
                f"ldmkit reads Stable Diffusion-style pipelines ({part}: {cls})"
            )
    vae_cfg = vae_config_from_diffusers(_read_json(folder / "vae" / MODEL_CONFIG))
    unet_dcfg = _read_json(folder / "unet" / MODEL_CONFIG)
    unet_cfg = config_from_diffusers(unet_dcfg, ours.get("concat_channels"))
    # ldmkit-written folders keep the exact ldmkit configs (zero_init, how heads were given …): use
    # them when they describe the same diffusers model, i.e. the folder was not edited since
    if "unet" in ours:
        stored = UNetConfig.model_validate(ours["unet"])
        if config_to_diffusers(stored) == config_to_diffusers(unet_cfg):
            unet_cfg = stored
    if "autoencoder" in ours:
        stored = AutoencoderConfig.model_validate(ours["autoencoder"])
        if vae_config_to_diffusers(stored) == vae_config_to_diffusers(vae_cfg):
            vae_cfg = stored
    sched = _read_json(folder / "scheduler" / SCHEDULER_CONFIG) if (folder / "scheduler").is_dir() else {}
    diffusion = diffusion_config_from_scheduler(sched, ours.get("diffusion"))

    text = index.get("text_encoder") or [None, None]
    sdxl = _sdxl_parts(folder, index)
    if sdxl:
        text_encoder = str(folder.resolve())  # SDXLTextEncoder.from_folder reads both encoders and tokenizers
        refiner = bool(index.get("requires_aesthetics_score"))  # the refiner: bigG alone, aesthetic-score conditioning
        sdxl_fields = {"pooled_text": True, "micro_conditioning": True, "aesthetic_score": refiner,
                       "zero_uncond": bool(index.get("force_zeros_for_empty_prompt", True))}
        ours = ours | {"conditioner": sdxl_fields | ours.get("conditioner", {})}
        fields = AESTHETIC_FIELDS if refiner else MICRO_FIELDS
        want = unet_cfg.vector_dim - len(fields) * MICRO_DIM
        if unet_cfg.vector_dim and want <= 0:
            raise LdmkitError(f"{folder}: the U-Net's add_embedding takes {unet_cfg.vector_dim} features, too few for "
                              f"a pooled text embedding and SDXL's {len(fields)} micro-conditions ({len(fields)}·{MICRO_DIM})")
    elif text[1] == "CLIPTextModel":
        if not (folder / "tokenizer").is_dir():
            raise LdmkitError(f"{folder} has a text_encoder/ but no tokenizer/; copy the tokenizer folder next to it")
        text_encoder = str((folder / "text_encoder").resolve())
    elif text[1] is None:
        text_encoder = ours.get("text_encoder")  # "minilm" for ldmkit-written folders, else None
    else:
        raise LdmkitError(f"{folder}: text encoder {text[1]} is not supported (ldmkit reads CLIPTextModel)")
    conditioner = ConditionerConfig(**(ours.get("conditioner", {}) | {"text_encoder": text_encoder}))
    if unet_cfg.context_dim is not None and text_encoder is None:
        raise LdmkitError(f"{folder} has no text_encoder, but its U-Net cross-attends to text; add text_encoder/ and tokenizer/")
    sample_size = unet_dcfg.get("sample_size") or 64
    image_size = ours.get("image_size") or sample_size * vae_cfg.downsample_factor
    cfg = LatentDiffusionConfig(
        autoencoder=vae_cfg, unet=unet_cfg, conditioner=conditioner, diffusion=diffusion, image_size=image_size
    )
    return cfg, text


_SDXL_PARTS = {"text_encoder": "CLIPTextModel", "tokenizer": "CLIPTokenizer",
               "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": "CLIPTokenizer"}


def _sdxl_parts(folder: Path, index: Mapping[str, Any]) -> bool:
    """Whether model_index.json describes an SDXL pipeline (a second text encoder, or text_time in the U-Net);
    if so, that all four text parts are there (LdmkitError naming what is missing, else)."""
    unet_addition = _read_json(folder / "unet" / MODEL_CONFIG).get("addition_embed_type")
    if not (index.get("text_encoder_2") or [None, None])[1] and unet_addition != "text_time" \
            and "XL" not in str(index.get("_class_name", "")):
        return False
    # the refiner (requires_aesthetics_score) has OpenCLIP bigG alone, as diffusers' StableDiffusionXLImg2ImgPipeline
    # takes it with text_encoder=None
    parts = {k: v for k, v in _SDXL_PARTS.items() if k.endswith("_2")} if index.get("requires_aesthetics_score") \
        and (index.get("text_encoder") or [None, None])[1] is None else _SDXL_PARTS
    missing = [f"{name}/" for name in parts if not (folder / name).is_dir()]
    missing += [f"{name} in {MODEL_INDEX}" for name in parts if (folder / name).is_dir()
                and (index.get(name) or [None, None])[1] is None]
    if missing:
        raise LdmkitError(f"{folder} is an SDXL pipeline without {', '.join(missing)}: SDXL needs both text encoders "
                          "and both tokenizers (text_encoder/ + tokenizer/: CLIP ViT-L; text_encoder_2/ + tokenizer_2/: "
                          "OpenCLIP bigG with projection; a refiner the second pair alone); copy them from the release")
    wrong = [f"{name} is {(index.get(name) or [None, None])[1]}" for name, cls in parts.items()
             if (index.get(name) or [None, None])[1] not in (cls, cls + "Fast")]
    if wrong:
        raise LdmkitError(f"{folder}: {', '.join(wrong)}; ldmkit reads SDXL's "
                          + ", ".join(f"{k}: {v}" for k, v in _SDXL_PARTS.items()))
    return True


def assemble(config, autoencoder: AutoencoderKL, unet: UNet, conditioner) -> LatentDiffusion:
    """A `LatentDiffusion` around an autoencoder and U-Net that already hold their weights."""
    from ldmkit.pipeline import LatentDiffusion

    return LatentDiffusion(autoencoder, unet, conditioner, config).eval()


def load_diffusers_pipeline(folder: str | Path, device: str | torch.device = "cpu",
                            skip: frozenset[str] = frozenset()) -> LatentDiffusion:
    """A diffusers Stable Diffusion pipeline folder → `LatentDiffusion` (eval mode) with the same
    weights; the text encoder is a `CLIPTextEncoder` on its text_encoder/ and tokenizer/. `skip`: parts built
    on the meta device, their weights not read (`ldmkit.load` says which); the model then stays on the CPU."""
    from ldmkit.checkpoint import skeleton

    folder = Path(folder)
    if not is_pipeline_folder(folder):
        raise LdmkitError(f"{folder} is not a diffusers pipeline folder (no {MODEL_INDEX})")
    cfg, _ = pipeline_config(folder)
    # a float32 safetensors VAE is read from its file without diffusers, whose import was most of a converted
    # model's cache hit, where the U-Net and CLIP are skipped (a few seconds, to read 0.3 GB)
    ae = _vae_from_file(folder / "vae", cfg.autoencoder, "decoder" in skip)
    if ae is None:
        # the diffusers modules are temporaries: their tensors are taken over, not copied
        ae = vae_from_diffusers(_from_pretrained(_diffusers().AutoencoderKL, folder / "vae"), copy=False)
    ae.config = cfg.autoencoder  # the same model, possibly as ldmkit first wrote it
    unet = None if "unet" in skip else _unet_of(_diffusers(), folder, cfg)
    ldm = skeleton(cfg, skip, autoencoder=ae, unet=unet)  # the skipped U-Net and CLIP text model on meta
    if ldm.conditioner.vector_dim != cfg.unet.vector_dim:
        raise LdmkitError(f"{folder}: the U-Net's add_embedding takes {cfg.unet.vector_dim} features, the text encoders "
                          f"and size/crop values give {ldm.conditioner.vector_dim}; are unet/ and text_encoder_2/ from "
                          "the same model?")
    return ldm if skip else ldm.to(device)  # meta tensors cannot move; skip is for the CPU only


def _vae_from_file(folder: Path, cfg: AutoencoderConfig, skip_decoder: bool) -> AutoencoderKL | None:
    """The VAE of a pipeline folder read straight from its float32 safetensors file, whose keys are diffusers'
    current names, which ldmkit's AutoencoderKL shares (`check_state_dicts` in `vae_from_diffusers`); `skip_decoder`:
    the decoder and post_quant_conv stay on the meta device, unread. None for anything else (fp16 or .bin files,
    older attention names diffusers renames as it loads): diffusers reads those."""
    from safetensors import safe_open

    file = folder / "diffusion_pytorch_model.safetensors"
    if not file.is_file():
        return None
    with torch.device("meta"):
        ae = AutoencoderKL(cfg)
    own = ae.state_dict()
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
        if keys != set(own) or any(f.get_slice(k).get_dtype() != "F32" or f.get_slice(k).get_shape() != list(own[k].shape)
                                   for k in keys):
            return None
        wanted = [k for k in keys if not (skip_decoder and k.startswith(("decoder.", "post_quant_conv.")))]
        ae.load_state_dict({k: f.get_tensor(k) for k in wanted}, strict=False, assign=True)
    return ae.eval()


def _unet_of(dm, folder: Path, cfg) -> UNet:
    unet = unet_from_diffusers(_from_pretrained(dm.UNet2DConditionModel, folder / "unet"), cfg.unet.concat_channels,
                               copy=False)
    unet.config = cfg.unet  # the same model, possibly as ldmkit first wrote it
    return unet


def _text_encoder_parts(ldm: LatentDiffusion):
    """(CLIPTextModel, CLIPTokenizer) with diffusers' semantics (last hidden state), or None for
    a model without a CLIP text encoder. A penultimate-layer encoder is written truncated."""
    from ldmkit.conditioning.text import CLIPTextEncoder

    enc = ldm.conditioner.text_encoder
    if not isinstance(enc, CLIPTextEncoder):
        return None
    model = enc.model
    if enc.skip_last_layer:  # penultimate hidden state + final norm == a model one layer shorter
        import copy

        model = copy.deepcopy(model)
        del getattr(model, "text_model", model).encoder.layers[-1]  # transformers < 5.6 nests a text_model
        model.config.num_hidden_layers -= 1
    return model, enc.tokenizer


def _sdxl_text_parts(ldm: LatentDiffusion) -> dict[str, Any] | None:
    """{folder name: model or tokenizer} of an SDXL text encoder pair, or None. The vector route must be
    SDXL's (pooled bigG embedding, then the six size/crop values) for diffusers to read the folder as SDXL."""
    from ldmkit.conditioning.text import SDXLTextEncoder

    enc = ldm.conditioner.text_encoder
    if not isinstance(enc, SDXLTextEncoder):
        return None
    c = ldm.config.conditioner
    if not (c.pooled_text and c.micro_conditioning and not c.num_classes):
        raise LdmkitError("an SDXL text encoder pair is written as a StableDiffusionXLPipeline, whose U-Net takes the "
                          "pooled text and the size/crop values: set conditioner.pooled_text and micro_conditioning "
                          "(and no class labels)")
    first = {"text_encoder": enc.first.model, "tokenizer": enc.first.tokenizer} if enc.first is not None else {}
    return first | {"text_encoder_2": enc.second.model, "tokenizer_2": enc.second.tokenizer}


def _readme_minilm() -> str:
    return (
        "# ldmkit latent diffusion model (diffusers layout)\n\n"
        "This model was trained with ldmkit's bundled MiniLM text encoder (all-MiniLM-L6-v2, 384-d token\n"
        "embeddings), which is not a CLIP model, so text_encoder/ and tokenizer/ are absent and marked null\n"
        "in model_index.json (`_ldmkit.text_encoder = \"minilm\"`). ldmkit reloads it as is:\n\n"
        "    ldmkit.load(FOLDER)\n\n"
        "With diffusers, pass a text encoder and tokenizer that produce (B, 77, 384) hidden states yourself.\n"
    )


LCM_SAMPLING = {"sampler": "lcm", "steps": 4, "guidance": 1.0}  # a latent consistency model's usual call


def pipeline_sampling_defaults(folder: str | Path) -> dict[str, Any]:
    """How a pipeline folder asks to be sampled: what ldmkit stored (`_ldmkit.sampling`), else, for a
    pipeline whose scheduler is diffusers' LCMScheduler (a latent consistency model, e.g. an LCM-distilled
    SD), lcm at 4 steps without guidance; else {}."""
    index = _read_json(Path(folder) / MODEL_INDEX)
    ours = (index.get(LDMKIT_KEY) or {}).get("sampling")
    if ours:
        return dict(ours)
    return dict(LCM_SAMPLING) if (index.get("scheduler") or [None, None])[1] == "LCMScheduler" else {}


def save_diffusers_pipeline(ldm: LatentDiffusion, folder: str | Path, sampling: Mapping[str, Any] | None = None) -> Path:
    """Write a `LatentDiffusion` as a diffusers `StableDiffusionPipeline` folder (vae/, unet/,
    scheduler/, and text_encoder/ + tokenizer/ when it uses CLIP; see the module docstring for
    MiniLM). The folder is written under a temporary name and renamed into place.

    `sampling`: how the model asks to be sampled (an ldmkit checkpoint's meta.sampling). A consistency
    student (sampler lcm) gets diffusers' LCMScheduler, with the distillation grid as its
    original_inference_steps, so diffusers samples it as ldmkit does; ldmkit keeps the whole entry."""
    dm = _diffusers()
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise LdmkitError(f"{folder} exists and is not empty; remove it or choose another output folder")
    cfg = ldm.config
    f = cfg.autoencoder.downsample_factor
    if cfg.image_size % f:
        raise LdmkitError(f"image_size {cfg.image_size} is not a multiple of the autoencoder's factor {f}")
    vae = vae_to_diffusers(ldm.autoencoder, sample_size=cfg.image_size)
    unet = unet_to_diffusers(ldm.unet, sample_size=cfg.image_size // f)
    sampling = dict(sampling or {})
    if sampling.get("sampler") == "lcm":
        scheduler = dm.LCMScheduler(**diffusion_config_to_scheduler(cfg.diffusion),
                                    original_inference_steps=int(sampling.get("grid_steps", 50)))
    else:
        scheduler = dm.DDIMScheduler(**diffusion_config_to_scheduler(cfg.diffusion))
    text = _text_encoder_parts(ldm)
    sdxl = _sdxl_text_parts(ldm)
    ours: dict[str, Any] = {
        "diffusion": cfg.diffusion.model_dump(mode="json"),
        "conditioner": cfg.conditioner.model_dump(mode="json", exclude={"text_encoder"}),
        "image_size": cfg.image_size,
        "concat_channels": cfg.unet.concat_channels,
        "unet": cfg.unet.model_dump(mode="json"),
        "autoencoder": cfg.autoencoder.model_dump(mode="json"),
    }
    if sampling:
        ours["sampling"] = sampling
    if text is None and sdxl is None and cfg.conditioner.text_encoder is not None:
        if cfg.conditioner.text_encoder != "minilm":
            raise LdmkitError(
                f"text encoder {cfg.conditioner.text_encoder!r} is neither CLIP nor the bundled MiniLM; "
                "diffusers folders hold CLIP text encoders"
            )
        ours["text_encoder"] = "minilm"
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": dm.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"] if text else [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"] if text else [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        LDMKIT_KEY: ours,
    }
    if sdxl is not None:
        refiner = "text_encoder" not in sdxl  # bigG alone, aesthetic-score conditioning: diffusers' img2img pipeline
        index["_class_name"] = "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline"
        for name in ("feature_extractor", "image_encoder", "requires_safety_checker", "safety_checker"):
            index.pop(name)
        if refiner != cfg.conditioner.aesthetic_score:
            raise LdmkitError("diffusers reads an SDXL pipeline with bigG alone as a refiner, whose U-Net takes aesthetic "
                              "scores (conditioner.aesthetic_score), and one with both text encoders as a base model")
        index |= {"text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
                  "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
                  **({"requires_aesthetics_score": True} if refiner else {}),
                  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer_2": ["transformers", "CLIPTokenizer"],
                  "force_zeros_for_empty_prompt": cfg.conditioner.zero_uncond,
                  "feature_extractor": [None, None], "image_encoder": [None, None]}
        index = dict(sorted(index.items(), key=lambda kv: (kv[0] == LDMKIT_KEY, kv[0])))
    with staging_dir(folder) as tmp:
        if sdxl is not None:
            for name, part in sdxl.items():
                part.save_pretrained(str(tmp / name), **({} if "tokenizer" in name else {"safe_serialization": True}))
        vae.save_pretrained(str(tmp / "vae"), safe_serialization=True)
        unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        scheduler.save_pretrained(str(tmp / "scheduler"))
        if text:
            text[0].save_pretrained(str(tmp / "text_encoder"), safe_serialization=True)
            text[1].save_pretrained(str(tmp / "tokenizer"))
        elif "text_encoder" in ours:
            (tmp / "README.md").write_text(_readme_minilm())
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return folder
