"""ldmkit's `TinyAutoencoder` ⇄ diffusers' `AutoencoderTiny` (TAESD): config, key map, model folders.

diffusers keeps each half as one flat `nn.Sequential` (`decoder.layers.N`), activations and upsampling
layers counted among the N; ldmkit names levels and blocks. `key_map(cfg)` walks both layouts in
the same order and pairs the names, so a folder is read with safetensors alone (no diffusers needed):

| ldmkit                              | diffusers                                                   |
| ----------------------------------- | ----------------------------------------------------------- |
| encoder.levels.i.conv               | encoder.layers.N   (the level's first conv)                 |
| encoder.levels.i.blocks.j.convK     | encoder.layers.N.conv.{0,2,4}  (K = 1, 2, 3; ReLUs between)  |
| encoder.conv_out                    | encoder.layers.last                                          |
| decoder.conv_in                     | decoder.layers.0   (decoder.layers.1 is its ReLU)            |
| decoder.levels.i.blocks.j…          | decoder.layers.N…  (then an Upsample, no weights)            |
| decoder.levels.i.conv               | decoder.layers.N                                             |

diffusers' blocks have `skip` only where widths differ, which TAESD never has.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ldmkit.autoencoder.tiny import TinyAutoencoder, TinyAutoencoderConfig
from ldmkit.imageio import staging_dir
from ldmkit.errors import LdmkitError

CLASS_NAME = "AutoencoderTiny"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def config_from_diffusers(dcfg: Mapping[str, Any]) -> TinyAutoencoderConfig:
    """diffusers' `AutoencoderTiny.config` → `TinyAutoencoderConfig`, or LdmkitError naming what does not translate."""
    problems = []
    if dcfg.get("act_fn", "relu") != "relu":
        problems.append(f"act_fn={dcfg['act_fn']!r} (TAESD's is relu)")
    if dcfg.get("upsample_fn", "nearest") != "nearest":
        problems.append(f"upsample_fn={dcfg['upsample_fn']!r} (TAESD's is nearest)")
    if dcfg.get("upsampling_scaling_factor", 2) != 2:
        problems.append(f"upsampling_scaling_factor={dcfg['upsampling_scaling_factor']} (TAESD's is 2)")
    if dcfg.get("out_channels", 3) != dcfg.get("in_channels", 3):
        problems.append("out_channels different from in_channels")
    if problems:
        raise LdmkitError("unsupported diffusers AutoencoderTiny config: " + ", ".join(problems))
    try:
        return TinyAutoencoderConfig(
            in_channels=dcfg.get("in_channels", 3), latent_channels=dcfg.get("latent_channels", 4),
            encoder_channels=tuple(dcfg.get("encoder_block_out_channels", (64, 64, 64, 64))),
            encoder_blocks=tuple(dcfg.get("num_encoder_blocks", (1, 3, 3, 3))),
            decoder_channels=tuple(dcfg.get("decoder_block_out_channels", (64, 64, 64, 64))),
            decoder_blocks=tuple(dcfg.get("num_decoder_blocks", (3, 3, 3, 1))),
            latent_magnitude=float(dcfg.get("latent_magnitude", 3.0)), latent_shift=float(dcfg.get("latent_shift", 0.5)),
            scaling_factor=float(dcfg.get("scaling_factor", 1.0)), shift_factor=float(dcfg.get("shift_factor") or 0.0))
    except (ValueError, TypeError) as e:
        raise LdmkitError(f"diffusers AutoencoderTiny config does not translate: {str(e).splitlines()[0]}") from None


def config_to_diffusers(cfg: TinyAutoencoderConfig) -> dict[str, Any]:
    """`TinyAutoencoderConfig` → keyword arguments of diffusers' `AutoencoderTiny`."""
    if not cfg.encoder:
        raise LdmkitError("this tiny autoencoder has no encoder, and diffusers' AutoencoderTiny always has one; "
                          "use it as an ldmkit folder")
    if len(set(cfg.encoder_channels + cfg.decoder_channels)) > 1:
        raise LdmkitError("diffusers' AutoencoderTiny needs one width for every level; this one has "
                          f"{cfg.encoder_channels} / {cfg.decoder_channels}")
    return {"in_channels": cfg.in_channels, "out_channels": cfg.in_channels, "latent_channels": cfg.latent_channels,
            "encoder_block_out_channels": list(cfg.encoder_channels), "num_encoder_blocks": list(cfg.encoder_blocks),
            "decoder_block_out_channels": list(cfg.decoder_channels), "num_decoder_blocks": list(cfg.decoder_blocks),
            "act_fn": "relu", "upsample_fn": "nearest", "upsampling_scaling_factor": 2,
            "latent_magnitude": cfg.latent_magnitude, "latent_shift": cfg.latent_shift,
            "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor, "force_upcast": False}


def _block_keys(ours: str, theirs: str, in_ch: int, out_ch: int) -> dict[str, str]:
    keys = {}
    for k, idx in ((1, 0), (2, 2), (3, 4)):  # nn.Sequential(conv, act, conv, act, conv)
        for p in ("weight", "bias"):
            keys[f"{ours}.conv{k}.{p}"] = f"{theirs}.conv.{idx}.{p}"
    if in_ch != out_ch:
        keys[f"{ours}.skip.weight"] = f"{theirs}.skip.weight"
    return keys


def key_map(cfg: TinyAutoencoderConfig) -> dict[str, str]:
    """ldmkit state-dict key → diffusers key, for every parameter of `TinyAutoencoder(cfg)`."""
    keys: dict[str, str] = {}

    def conv(ours: str, theirs: str, bias: bool = True) -> None:
        keys[f"{ours}.weight"] = f"{theirs}.weight"
        if bias:
            keys[f"{ours}.bias"] = f"{theirs}.bias"

    if cfg.encoder:
        n = 0
        for i, (ch, blocks) in enumerate(zip(cfg.encoder_channels, cfg.encoder_blocks)):
            conv(f"encoder.levels.{i}.conv", f"encoder.layers.{n}", bias=i == 0)
            n += 1
            for j in range(blocks):
                keys.update(_block_keys(f"encoder.levels.{i}.blocks.{j}", f"encoder.layers.{n}", ch, ch))
                n += 1
        conv("encoder.conv_out", f"encoder.layers.{n}")
    conv("decoder.conv_in", "decoder.layers.0")
    n, last = 2, len(cfg.decoder_channels) - 1  # layers.1 is the ReLU after conv_in
    for i, (ch, blocks) in enumerate(zip(cfg.decoder_channels, cfg.decoder_blocks)):
        for j in range(blocks):
            keys.update(_block_keys(f"decoder.levels.{i}.blocks.{j}", f"decoder.layers.{n}", ch, ch))
            n += 1
        if i < last:
            n += 1  # the Upsample
        conv(f"decoder.levels.{i}.conv", f"decoder.layers.{n}", bias=i == last)
        n += 1
    return keys


def tiny_from_state(cfg: TinyAutoencoderConfig, theirs: Mapping[str, torch.Tensor], what: str) -> TinyAutoencoder:
    """A `TinyAutoencoder(cfg)` holding diffusers-named weights `theirs`; every key and shape checked."""
    model = TinyAutoencoder(cfg)
    own = model.state_dict()
    names = key_map(cfg)
    missing = [t for t in names.values() if t not in theirs]
    unexpected = sorted(set(theirs) - set(names.values()))
    shapes = [(o, t) for o, t in names.items() if t in theirs and theirs[t].shape != own[o].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})"] if missing else []
        parts += [f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})"] if unexpected else []
        if shapes:
            o, t = shapes[0]
            parts.append(f"{len(shapes)} keys of the wrong shape (e.g. {t}: {tuple(theirs[t].shape)} vs {tuple(own[o].shape)})")
        raise LdmkitError(f"{what} does not match its config: {'; '.join(parts)}")
    model.load_state_dict({o: theirs[t] for o, t in names.items()})
    return model.eval()


def tiny_from_diffusers(module) -> TinyAutoencoder:
    """A diffusers `AutoencoderTiny` → the ldmkit `TinyAutoencoder` with the same weights (copied)."""
    cfg = config_from_diffusers(dict(module.config))
    sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return tiny_from_state(cfg, sd, "the diffusers AutoencoderTiny").to(next(module.parameters()).device)


def tiny_to_diffusers(tiny: TinyAutoencoder):
    """An ldmkit `TinyAutoencoder` → diffusers' `AutoencoderTiny` with the same weights (copied)."""
    from diffusers import AutoencoderTiny

    model = AutoencoderTiny(**config_to_diffusers(tiny.config))
    sd = tiny.state_dict()
    model.load_state_dict({t: sd[o].detach().clone() for o, t in key_map(tiny.config).items()})
    return model.eval()


def load_diffusers_tiny(folder: str | Path) -> TinyAutoencoder:
    """A diffusers `AutoencoderTiny` folder (config.json + diffusion_pytorch_model.safetensors, e.g.
    madebyollin/taesd) → `TinyAutoencoder`, read with safetensors alone."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        dcfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise LdmkitError(f"cannot read {folder / 'config.json'} ({type(e).__name__}); restore the folder") from None
    if dcfg.get("_class_name") != CLASS_NAME:
        raise LdmkitError(f"{folder} holds a diffusers {dcfg.get('_class_name')}, not an {CLASS_NAME}")
    file = folder / WEIGHTS_NAME
    if not file.is_file():
        raise LdmkitError(f"{folder} has no {WEIGHTS_NAME}; ldmkit reads AutoencoderTiny weights as safetensors")
    try:
        sd = load_file(str(file))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise LdmkitError(f"cannot read weights {file} ({type(e).__name__}); the file is damaged") from None
    return tiny_from_state(config_from_diffusers(dcfg), {k: v.float() for k, v in sd.items()}, f"the weights in {file}")


def save_diffusers_tiny(tiny: TinyAutoencoder, folder: str | Path) -> Path:
    """Write `tiny` as a diffusers `AutoencoderTiny` folder (read by `AutoencoderTiny.from_pretrained`)."""
    from safetensors.torch import save_file

    doc = {"_class_name": CLASS_NAME, "_diffusers_version": "0.30.0", **config_to_diffusers(tiny.config)}
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise LdmkitError(f"{folder} exists and is not empty; remove it or choose another output folder")
    with staging_dir(folder) as tmp:
        sd = tiny.state_dict()
        save_file({t: sd[o].detach().cpu().contiguous() for o, t in key_map(tiny.config).items()}, str(tmp / WEIGHTS_NAME))
        (tmp / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
    return folder
