"""Typed, validated training configs, named presets, and loading from YAML/JSON with overrides.

A config is a pydantic model with `extra="forbid"`, so a misspelt key is an error that names the
key, not a silently ignored setting. Presets are plain factory functions in a dict (STYLE.md #3);
`--config NAME` picks a preset, `--config FILE` reads YAML or JSON, and `--set a.b=value`
overrides single fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ldmkit.autoencoder.losses import AutoencoderLossConfig
from ldmkit.autoencoder.model import AutoencoderConfig
from ldmkit.conditioning.concat import ConcatConfig
from ldmkit.conditioning.conditioner import ConditionerConfig
from ldmkit.diffusion.config import DiffusionConfig
from ldmkit.errors import LdmkitError
from ldmkit.unet import UNetConfig


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field("shapes", description="built-in name (shapes, shapes-free, digits, faces, photos), a folder of "
                         "images, tar shards ('shards/{00000..00099}.tar'), a Hugging Face dataset (save_to_disk folder "
                         "or *.parquet) or an `ldmkit encode` latent folder")
    size: int = Field(32, ge=8, description="image side in pixels")
    seed: int = Field(0, description="dataset generation / split seed")
    length: int | None = Field(None, ge=1, description="items in the training split (procedural datasets)")
    val_images: int = Field(256, ge=1, description="held-out images used for validation metrics")
    skip_bad_images: bool = Field(False, description="skip unreadable files in a folder instead of stopping")
    allow_outside_links: bool = Field(False, description="a folder's symlinks may point outside it (refused by default)")
    hflip: bool = Field(False, description="random horizontal flips (not for `shapes`: positions are labels)")
    crop: Literal["center", "random"] = Field("center", description="folders, shards, HF datasets: after resizing the "
                                              "shorter side to `size`, cut the square at the centre or at random")
    in_memory: Literal["auto"] | bool = Field(
        "auto", description="hold the decoded training set in memory (auto: built-in sets, and collections of at most "
        "256 MiB as float32); otherwise DataLoader workers read it lazily (tar shards always stream)")
    workers: int = Field(2, ge=0, description="DataLoader worker processes per training process for lazy sources")
    buckets: bool | list[tuple[int, int]] = Field(
        False, description="aspect-ratio buckets for image folders: true for (height, width) pairs of about size² "
        "pixels from 1:2 to 2:1 in steps of bucket_step, or a list of [height, width]; each batch one bucket")
    bucket_step: int | None = Field(None, ge=8, description="side step of automatic buckets (default: size/8, at least 8)")
    image_column: str | None = Field(None, description="Hugging Face datasets: the image column (default: image/img)")
    text_column: str | None = Field(None, description="Hugging Face datasets: the caption column (default: text/caption)")
    label_column: str | None = Field(None, description="Hugging Face datasets: the class column (default: label)")
    latent_cache: str | None = Field(
        None, description="second stage: folder for the on-disk latent cache, keyed by the autoencoder's weights, "
        "the images and the augmentation (None: encode in memory at every start)")
    vocabulary: Literal["basic", "extended"] = Field(
        "basic", description="shapes only: extended adds the colour white and the shape diamond (112 captions)")
    holdout: int = Field(0, ge=0, le=12, description="shapes only: leave this many of the 72 (shape, colour, position) "
                         "combinations out of training, no attribute pair twice (ldmkit.data.shapes.heldout_combos)")
    labels: Literal["class", "combo"] = Field(
        "class", description="shapes only: an item's label is its class shape·6 + colour (18) or its combination "
        "shape·24 + colour·4 + position (72)")
    caption_extension: str = Field(
        ".txt", pattern=r"^\.?[^./\\][^/\\]*$", description="folders: an image's caption is read from the file beside it "
        "with this extension (kohya's and SimpleTuner's convention; UTF-8, with or without BOM) when metadata.jsonl "
        "gives none; tar shards: the sample's field of this name")
    filename_captions: bool = Field(
        False, description="folders: an image with no caption (metadata, caption file or kohya folder word) is "
        "captioned by its file name's stem, underscores as spaces (off: no caption, as kohya)")
    shuffle_tags: bool = Field(False, description="shuffle a caption's comma-separated tags at every step")
    keep_tokens: int = Field(0, ge=0, description="the first K tags stay first and in place (kohya's keep_tokens): "
                             "never shuffled or dropped")
    tag_dropout: float = Field(0.0, ge=0, lt=1, description="P(a tag after keep_tokens is left out), per tag and step")
    mask: Literal["none", "alpha", "files"] = Field(
        "none", description="masked loss: weight each latent cell by a mask (0: not trained) taken from the image's "
        "alpha channel, or from NAME_mask.png beside it / metadata.jsonl's 'mask' column (folders; shards: alpha, "
        "or a KEY.mask.png field)")


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(2000, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="global batch size")
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy", "lion"] = Field(
        "adamw", description="adamw (torch); adamw8bit (bitsandbytes' AdamW8bit: 8-bit moments, ldmkit[adamw8bit]); "
        "adafactor (torch.optim.Adafactor, torch >= 2.5: factored second moment, no first moment; lr caps its relative "
        "step, torch's default 1e-2; betas unused); prodigy (prodigyopt, ldmkit[prodigy]: estimates the step size "
        "itself, set lr=1.0, which multiplies it; bias correction on, and its warm-up safeguard with warmup_steps; its "
        "authors suggest weight_decay 0.01 for diffusion); lion (lion-pytorch, ldmkit[lion]: sign updates, its paper's "
        "lr is 3-10x below AdamW's with betas (0.9, 0.99) and 3-10x the weight decay). Every one's state is "
        "checkpointed; the autoencoder's GAN discriminator keeps AdamW")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (after warm-up; prodigy: a multiplier of its own "
                      "estimate, 1.0)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw, adamw8bit, prodigy, lion: the moments' decay "
                                       "rates (adafactor has none)")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (every optimizer)")
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["constant", "cosine"] = Field("cosine", description="LR after warm-up")
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the weights (None: off)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast for the forward pass: bf16 (CPU/GPU) or fp16 with a gradient scaler (GPU only)")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step (batch_size is the global batch)")
    gradient_checkpointing: bool = Field(False, description="recompute block activations in backward: less memory, ~30 % more time")
    channels_last: bool = Field(False, description="NHWC memory format for the trained convolutions (faster on some hardware)")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: replicate (DDP) or shard (FSDP) the trained model")
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    seed: int = 0


class LoggingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    log_every: int = Field(25, ge=1)
    val_every: int = Field(500, ge=1, description="validation metrics + image grid")
    ckpt_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    tensorboard: bool = Field(False, description="also write TensorBoard event files to OUT/tensorboard (loss, LR, "
                              "gradient norm, images/s, validation figures, sample grids); needs ldmkit[tensorboard]")


class AutoencoderTrainConfig(BaseModel):
    """Everything `ldmkit train-autoencoder` needs. Saved with every checkpoint."""

    model_config = ConfigDict(extra="forbid")

    model: AutoencoderConfig = AutoencoderConfig()
    loss: AutoencoderLossConfig = AutoencoderLossConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    logging: LoggingConfig = LoggingConfig()
    latent_stat_batches: int = Field(50, ge=1, description="batches used to measure latent mean/std")


# --- presets -------------------------------------------------------------------------------------


def ae_shapes() -> AutoencoderTrainConfig:
    """shapes 32x32, f=4, 4 latent channels: > 30 dB held-out PSNR in < 5 CPU minutes.

    L2, not L1: on mostly-black images the L1 gradient (a sign) keeps pushing every background
    pixel, and after 300 steps L1 reached 18 dB where L2 reached 28.7 dB (same network, same LR).
    Gradient clipping at 1.0 slowed early training without buying stability here.
    """
    return AutoencoderTrainConfig(
        model=AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4),
        loss=AutoencoderLossConfig(reconstruction="l2"),
        data=DataConfig(dataset="shapes", size=32),
        optim=OptimConfig(steps=700, batch_size=32, lr=2e-3, warmup_steps=50, grad_clip=None),
        logging=LoggingConfig(val_every=350, ckpt_every=350),
    )


def ae_demo() -> AutoencoderTrainConfig:
    """`ldmkit demo`'s first stage: `shapes` at width 16 instead of 32 (2.7x less compute per step), 8 latent
    channels instead of 4, 2,800 steps.

    A first stage that softens edges caps every model decoded by it. The strict shape judge (issue 31,
    docs/shape-judge.md) on its reconstructions of 216 held-out renders: 24.5 % after 700 steps at width 16
    with 4 channels (31.5 dB), 85.6-89.8 % after 1,400 (35.7-36.3 dB), 90.3 % with 8 channels after 1,400
    (36.5 dB) and 100 % with 8 channels after 2,800 (39.9 dB). The second stage follows the cap: 2,400
    `ldm_demo` steps on those last three gave strict shape 84.7, 80.6 and 96.5 % of their samples
    (`ldmkit evaluate --seeds 2`). Twice the steps cost about 2.2 quiet minutes; 8 channels cost nothing
    measurable at this size (docs/benchmarks.md, "The demo under the strict shape judge")."""
    cfg = ae_shapes()
    cfg.model = cfg.model.model_copy(update={"base_channels": 16, "norm_groups": 8, "latent_channels": 8})
    cfg.optim = cfg.optim.model_copy(update={"steps": 2800})
    cfg.logging = LoggingConfig(val_every=2800, ckpt_every=1400)
    return cfg


def ae_shapes_free() -> AutoencoderTrainConfig:
    """The shapes first stage on `shapes-free` (shapes anywhere, any size and angle)."""
    cfg = ae_shapes()
    cfg.data.dataset = "shapes-free"
    return cfg


def ae_faces() -> AutoencoderTrainConfig:
    cfg = ae_shapes()
    cfg.data = DataConfig(dataset="faces", size=32, hflip=True)
    return cfg


def ae_photos() -> AutoencoderTrainConfig:
    """A first stage for photographs it has never seen: f = 4, 4 latent channels, trained on 64-px
    crops (several scales, flips, mild colour jitter) of every bundled photograph but the four held
    out. The bicubic shortcut (`model.bicubic_shortcut`) starts the codec as bicubic down/up, so
    training only learns what bicubic loses; without it the same network and budget stay ~6 dB
    below bicubic on the held-out photographs (docs/design.md, "A first stage for photographs")."""
    return AutoencoderTrainConfig(
        model=AutoencoderConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4,
                                bicubic_shortcut=True),
        loss=AutoencoderLossConfig(reconstruction="l2"),
        data=DataConfig(dataset="photos", size=64, length=20000, val_images=64),
        optim=OptimConfig(steps=1500, batch_size=16, lr=2e-3, warmup_steps=50, grad_clip=None),
        logging=LoggingConfig(val_every=500, ckpt_every=500),
    )


def ae_photos_f8() -> AutoencoderTrainConfig:
    """`photos` at f = 8 with 8 latent channels (SD's factor; 8 values per 8x8 block of 192)."""
    cfg = ae_photos()
    cfg.model = cfg.model.model_copy(update={"channel_mult": (1, 2, 2, 4), "latent_channels": 8})
    return cfg


def ae_digits() -> AutoencoderTrainConfig:
    cfg = ae_shapes()
    cfg.data = DataConfig(dataset="digits", size=32)
    return cfg


def ae_tiny() -> AutoencoderTrainConfig:
    """A seconds-long run for tests and smoke checks."""
    return AutoencoderTrainConfig(
        model=AutoencoderConfig(base_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4),
        data=DataConfig(dataset="shapes", size=16, length=64, val_images=16),
        optim=OptimConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=1),
        logging=LoggingConfig(log_every=2, val_every=3, ckpt_every=3),
        latent_stat_batches=2,
    )


AUTOENCODER_PRESETS: dict[str, Callable[[], AutoencoderTrainConfig]] = {
    "shapes": ae_shapes,
    "demo": ae_demo,
    "shapes-free": ae_shapes_free,
    "faces": ae_faces,
    "photos": ae_photos,
    "digits": ae_digits,
    "photos-f8": ae_photos_f8,
    "tiny": ae_tiny,
}


# --- loading -------------------------------------------------------------------------------------

C = TypeVar("C", bound=BaseModel)


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` items as one nested dict; VALUE is YAML (so `[1, 2]`, `null`, `1e-4` work)."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise LdmkitError(f"override {item!r} is not KEY=VALUE (e.g. --set optim.steps=100)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(p.isidentifier() for p in parts):
            raise LdmkitError(f"override {item!r}: {key!r} is not a dotted key like optim.steps")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise LdmkitError(f"override {item!r}: the value is not valid YAML ({first}); quote it inside the "
                              f"shell's quotes, e.g. --set '{key}=\"...\"'") from None
        node = nested
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LdmkitError(f"override {item!r}: {'.'.join(parts[: i + 1])} was set to a value by an earlier "
                                  "--set, so it has no keys")
        node[parts[-1]] = parsed
    return nested


def _merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validation_message(e: ValidationError, where: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{where}: {loc}: {err['msg']}{more}"


def load_config(spec: str, cls: type[C], presets: dict[str, Callable[[], C]], overrides: list[str] | None = None) -> C:
    """A preset name or a YAML/JSON file (which may name a `preset:` to start from), plus overrides."""
    if spec in presets:
        base = presets[spec]().model_dump(mode="json")
        where = f"preset '{spec}'"
    else:
        path = Path(spec)
        if not path.is_file():
            raise LdmkitError(f"config '{spec}' is neither a preset ({', '.join(presets)}) nor a file")
        try:
            text = path.read_text()
            doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
            raise LdmkitError(f"cannot parse config {path}: {str(e).splitlines()[0]}") from e
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise LdmkitError(f"config {path} must be a mapping of sections (model:, data:, ...), got {type(doc).__name__}")
        preset = doc.pop("preset", None)
        if preset is not None and (not isinstance(preset, str) or preset not in presets):
            raise LdmkitError(f"config {path}: unknown preset '{preset}' (known: {', '.join(presets)})")
        base = _merge(presets[preset]().model_dump(mode="json"), doc) if preset else doc
        where = f"config {path}"
    merged = _merge(base, parse_overrides(overrides))
    try:
        return cls.model_validate(merged)
    except ValidationError as e:
        raise LdmkitError(validation_message(e, where)) from e


def save_config(cfg: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# --- the second stage ----------------------------------------------------------------------------

class SampleConfig(BaseModel):
    """How periodic sample grids (and the demo's samples) are drawn."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(25, ge=1)
    sampler: Literal["ddpm", "ddim", "dpmpp_2m", "unipc", "euler", "euler_a", "lcm"] = Field("dpmpp_2m", description="diffusion.samplers")
    guidance: float = Field(1.0, ge=0, description="classifier-free guidance scale (1 = off)")
    prompts: list[str] | None = Field(None, description="captions for sample grids (default: from the data)")
    num: int = Field(16, ge=1, description="images in each periodic grid")


class EmbeddingConfig(BaseModel):
    """Textual inversion (`finetune.train: embedding`; Gal et al. 2022): a new word's vectors learned with every
    weight of the model frozen."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field("", description="the placeholder word the captions use for the concept; the files are named "
                       "after it (OUT/embeddings/WORD.safetensors) and a prompt names it the same way")
    init: str = Field("*", description="the initialiser word(s): the vectors start as its token embeddings "
                      "(spread over the vectors as A1111 does)")
    vectors: int = Field(1, ge=1, le=75, description="number of vectors (tokens the word takes in a prompt)")


class PriorConfig(BaseModel):
    """DreamBooth's prior preservation (Ruiz et al. 2023, eq. 2): class images the starting model draws from class
    prompts, trained beside the instance images so the class keeps its meaning."""

    model_config = ConfigDict(extra="forbid")

    prompts: str | None = Field(None, description="a text file of class prompts, one a line (None: off)")
    images: int = Field(100, ge=1, description="class images generated once by the starting model (cycling the prompts)")
    weight: float = Field(1.0, ge=0, description="λ: loss = instance + λ·prior")
    steps: int = Field(25, ge=1, description="sampling steps of the class images")
    guidance: float = Field(5.0, ge=0, description="guidance scale of the class images: draw them as you sample (the "
                            "prior teaches what they look like; the shapes demo's triangles at 5 came out rounder than "
                            "at its usual 2)")
    seed: int = Field(0, description="class images are drawn in blocks of 8, block k (images 8k…8k+7) with seed + 8k")
    unconditional: int = Field(64, ge=0, description="images the starting model also draws once from the empty "
                               "prompt, rehearsed beside the class images (by the class rows, with the empty prompt, "
                               "and by finetune.decoder_steps): the class prompts name one class, these keep the rest "
                               "of what the model draws (0: the class images alone)")
    cache: str | None = Field(None, description="folder of generated class images, shared by runs (each set in a "
                              "subfolder keyed by the model, prompts and settings); None: OUT/class_images")


class FinetuneConfig(BaseModel):
    """Starting from a trained model (`ldmkit train --init-from MODEL`)."""

    model_config = ConfigDict(extra="forbid")

    init_from: str | None = Field(None, description="an ldmkit run, a diffusers pipeline folder or an original SD "
                                  "single file: its U-Net weights start training, its first stage and text encoder "
                                  "are used (its model config replaces unet/autoencoder/conditioner's encoder)")
    train: Literal["unet", "unet+text", "lora", "embedding"] = Field(
        "unet", description="what is trained: the whole U-Net; the U-Net and the text encoder; only LoRA "
        "adapters (the `lora:` section); or a new word's vectors (textual inversion, `finetune.embedding`)")
    decoder_steps: int = Field(0, ge=0, description="first fine-tune the first stage's decoder for this many steps "
                               "(L2 reconstruction of the training images, encoder frozen so the latents and their "
                               "scale stay): for images the first stage never saw and cannot draw")
    decoder_lr: float = Field(1e-3, gt=0, description="the decoder's AdamW learning rate (cosine to 0)")
    # The model's diffusion process trains (its `diffusion` section replaces the config's); these three change the
    # loss only, so a fine-tune may choose them (kohya's --min_snr_gamma, --noise_offset). None: the model's.
    weighting: Literal["uniform", "min_snr"] | None = Field(None, description="loss weight over t (diffusion.weighting)")
    min_snr_gamma: float | None = Field(None, gt=0, description="γ of min-SNR weighting (Hang et al., 2023)")
    offset_noise: float | None = Field(None, ge=0, description="offset noise (diffusion.offset_noise)")
    embedding: EmbeddingConfig = EmbeddingConfig()
    prior: PriorConfig = PriorConfig()


class LoraConfig(BaseModel):
    """Low-rank adapters (peft) for `finetune.train: lora`; see ldmkit.interop.lora."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(4, ge=1, description="r: the adapters' rank")
    alpha: float | None = Field(None, gt=0, description="α: ΔW = (α / r)·BA (None: α = r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    targets: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1,
                               description="U-Net layer names to adapt (suffixes); add conv1, conv2 for the ResBlocks")
    text_encoder: bool = Field(False, description="also adapt the text encoder's attention projections (CLIP's "
                               "q/k/v/out_proj, BERT's query/key/value/attention.output.dense)")
    format: Literal["diffusers", "kohya"] = Field(
        "diffusers", description="OUT/lora.safetensors: diffusers' load_lora_weights layout, or kohya's (A1111, ComfyUI)")


class DiffusionTrainConfig(BaseModel):
    """Everything `ldmkit train` needs. Saved with every checkpoint."""

    model_config = ConfigDict(extra="forbid")

    autoencoder: str = Field("", description="first-stage checkpoint folder (from `ldmkit train-autoencoder`)")
    unet: UNetConfig
    conditioner: ConditionerConfig = ConditionerConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    concat: ConcatConfig | None = Field(None, description="concatenation route: inpaint | lowres (None: off); "
                                        "unet.concat_channels follows from it")
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig(lr=1e-3, ema_decay=0.999, grad_clip=1.0)
    logging: LoggingConfig = LoggingConfig(val_every=1000, ckpt_every=1000)
    sample: SampleConfig = SampleConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    lora: LoraConfig = LoraConfig()


def _small_unet(**kw) -> UNetConfig:
    base = dict(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
                attention_levels=(1,), mid_attention=True, num_heads=4, norm_groups=16, emb_mode="scale_shift")
    base.update(kw)
    return UNetConfig(**base)


def ldm_shapes_text() -> DiffusionTrainConfig:
    """Text-to-image on shapes 32x32: MiniLM tokens into cross-attention over 8x8x4 latents.

    Chosen by measurement at equal CPU time (~7 min): a 1.4M-parameter U-Net (widths 32, 64) for
    3,700 steps reached colour/position/shape 100/100/96 % where the 4.9M one (64, 128) managed
    only 1,800 steps and 100/69/92 %; adding the pooled caption as a vector did not help.
    """
    return DiffusionTrainConfig(
        unet=_small_unet(model_channels=32, norm_groups=8, context_dim=384, attention_levels=(0, 1)),
        conditioner=ConditionerConfig(text_encoder="minilm", drop_text=0.1),
        diffusion=DiffusionConfig(prediction_type="v", weighting="min_snr"),
        data=DataConfig(dataset="shapes", size=32),
        optim=OptimConfig(steps=3700, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999),
        sample=SampleConfig(guidance=2.0),
    )


def ldm_demo() -> DiffusionTrainConfig:
    """`ldmkit demo`'s second stage: shapes-text for 2,400 steps instead of 3,700 (cosine to zero over them), on
    the `demo` first stage, with the v-loss weighted uniformly over t instead of by min-SNR-γ.

    Colour and shape come within a few hundred steps; the quadrant comes suddenly, and later. It is decided at
    high noise, where min-SNR-γ with v-prediction weights the loss by min(SNR, γ)/(SNR + 1) → 0 (Hang et al.
    2023): with it, after 1,200 steps, one training seed of three put only 51 % of samples in the named
    quadrant (chance 25 %); weighted uniformly, every seed had it right by step 900 (docs/benchmarks.md,
    "Time to quality"). Twice those 1,200 steps for issue 31's strict shape judge: on the 1,400-step `demo`
    first stage, 1,200 steps gave colour / position / shape 100 / 100 / 97.2 % and strict shape 64.6 %, 2,400
    gave 100 / 100 / 100 % and 84.7 % (`ldmkit evaluate --seeds 2`), about 2.7 quiet minutes more; on the
    8-channel, 2,800-step first stage (`ae_demo`), 100 / 100 / 100 % and strict 96.5 % (docs/benchmarks.md,
    "The demo under the strict shape judge").

    z0 is the posterior mean, not a draw (`diffusion.latents: mean`). That first stage's posterior is wide (σ
    0.48-0.94 per channel against a spread of the means of 0.16-1.03), and its decoder, trained on draws, reads
    the shape through that noise; a second stage that learns the draws spends itself on the noise and blurs the
    corners. Every strict failure of the demo's samples was a triangle whose corners were not covered. On one
    first stage, trained on draws: 90.7 % strict; on means, two training seeds: 99.1 and 96.3 % (1,500 steps:
    97.2 and 94.0 %); colour, position and shape 100 % in all."""
    cfg = ldm_shapes_text()
    cfg.unet = cfg.unet.model_copy(update={"in_channels": 8, "out_channels": 8})  # the `demo` first stage's latents
    cfg.diffusion = cfg.diffusion.model_copy(update={"weighting": "uniform", "latents": "mean"})
    cfg.optim = cfg.optim.model_copy(update={"steps": 2400})
    cfg.logging = LoggingConfig(val_every=2400, ckpt_every=1200)
    return cfg


def ldm_shapes_free_text() -> DiffusionTrainConfig:
    """shapes-text on `shapes-free` (shapes anywhere in their quadrant, any size and angle): the base
    model of the spatial routes, whose caption names shape, colour and quadrant but not the place.
    Twice shapes-text's steps: at 3,700 the quadrant was right for only 52.8 % of samples (colour 100,
    shape 89.6 %); at 7,400, 100 / 100 / 97.9 % (`ldmkit evaluate`, 144 samples), 16.5 min on 2 cores."""
    cfg = ldm_shapes_text()
    cfg.data.dataset = "shapes-free"
    cfg.optim.steps = 7400
    return cfg


def ldm_digits_class() -> DiffusionTrainConfig:
    """Class-conditional digits: the label embedding added to the time embedding."""
    return DiffusionTrainConfig(
        unet=_small_unet(model_channels=32, norm_groups=8, num_classes=10),
        conditioner=ConditionerConfig(num_classes=10, drop_label=0.1),
        diffusion=DiffusionConfig(prediction_type="v", weighting="min_snr"),
        data=DataConfig(dataset="digits", size=32),
        optim=OptimConfig(steps=3000, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999),
        sample=SampleConfig(guidance=2.0),
    )


def ldm_shapes_class() -> DiffusionTrainConfig:
    """Class-conditional shapes, 18 classes (label = shape·6 + colour; position left free): the label
    embedding added to the time embedding, which every ResBlock takes as FiLM/AdaGN scale and shift.
    Measured (`ldmkit evaluate --seeds 8`, 144 samples): colour 100 %, shape 93.1 % after 3,000 steps
    in 588 s on the shared 2-core CPU."""
    return DiffusionTrainConfig(
        unet=_small_unet(model_channels=32, norm_groups=8, attention_levels=(1,), num_classes=18),
        conditioner=ConditionerConfig(num_classes=18, drop_label=0.1),
        diffusion=DiffusionConfig(prediction_type="v", weighting="min_snr"),
        data=DataConfig(dataset="shapes", size=32),
        optim=OptimConfig(steps=3000, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999),
        sample=SampleConfig(guidance=2.0),
    )


def ldm_shapes_class_bias() -> DiffusionTrainConfig:
    """shapes-class with the other injection: the (time + label) embedding is a per-channel bias added
    inside each ResBlock (SD's `add`) instead of a scale-shift; everything else identical, so the two
    presets compare the routes. Measured the same way: colour 100 %, shape 92.4 %."""
    cfg = ldm_shapes_class()
    cfg.unet = cfg.unet.model_copy(update={"emb_mode": "add"})
    return cfg


def ldm_faces() -> DiffusionTrainConfig:
    """Unconditional faces."""
    return DiffusionTrainConfig(
        unet=_small_unet(model_channels=32, norm_groups=8),
        diffusion=DiffusionConfig(prediction_type="v", weighting="min_snr"),
        data=DataConfig(dataset="faces", size=32, hflip=True),
        optim=OptimConfig(steps=3000, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999),
    )


def ldm_photos() -> DiffusionTrainConfig:
    """Unconditional 64-px photograph crops on the `photos` first stage (16x16x4 latents): the second
    stage of the photographs recipe. A few CPU minutes give textures, not scenes."""
    return DiffusionTrainConfig(
        unet=_small_unet(model_channels=64, channel_mult=(1, 2, 2), attention_levels=(2,)),
        diffusion=DiffusionConfig(prediction_type="v", weighting="min_snr"),
        data=DataConfig(dataset="photos", size=64, length=5000, val_images=64),
        optim=OptimConfig(steps=2000, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999),
    )


def ldm_tiny() -> DiffusionTrainConfig:
    """Seconds-long run for tests: text + labels on a 16x16 shapes subset."""
    return DiffusionTrainConfig(
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                        attention_levels=(1,), mid_attention=False, num_heads=2, norm_groups=4, context_dim=384,
                        num_classes=18),
        conditioner=ConditionerConfig(text_encoder="minilm", num_classes=18),
        data=DataConfig(dataset="shapes", size=16, length=64, val_images=16),
        optim=OptimConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=1, ema_decay=0.9),
        logging=LoggingConfig(log_every=2, val_every=3, ckpt_every=3),
        sample=SampleConfig(steps=3, num=4),
    )


def ldm_shapes_inpaint() -> DiffusionTrainConfig:
    """Text-guided inpainting on shapes (SD layout: mask + masked-image latent concatenated).
    Same U-Net and budget as shapes-text; the concat is never dropped (drop 0, as SD inpainting).
    Measured only at 1,500 steps (12 min on the shared 2-core CPU): kept-region PSNR 27.3 dB against the
    first stage's 32.9 dB on the same pixels, so 3,700 steps are not yet shown to reach the 1 dB target."""
    cfg = ldm_shapes_text()
    cfg.concat = ConcatConfig(kind="inpaint", drop=0.0)
    return cfg


def ldm_shapes_free_inpaint() -> DiffusionTrainConfig:
    """Text-guided inpainting on `shapes-free`. Besides random rectangles, 40 % of the training holes
    are the grown box around the shape (mask mode 5): the hole left by removing an object, which the
    caption must fill, so "remove the shape, ask for another" is a task the model has seen. Measured
    (`ldmkit evaluate`, 128 held-out shapes replaced by another colour and shape): colour in the hole
    99.2 %, shape 90.6 % after 7,400 steps (1,105 s on 2 cores); 100 % / 80.5 % after 3,700."""
    cfg = ldm_shapes_free_text()
    cfg.concat = ConcatConfig(kind="inpaint", drop=0.0, mask_modes=(0.3, 0.1, 0.1, 0.1, 0.4))
    return cfg


def ldm_shapes_sr() -> DiffusionTrainConfig:
    """4x super-resolution on shapes: the latent of the 8x8 → 32x32 bicubic image concatenated.
    Unconditional otherwise (the low-res image says almost everything). Measured on the 2-core CPU
    (shared): 1,500 steps in 8.9 min, held-out PSNR 32.2 dB against bicubic's 22.2 dB (the first
    stage alone reconstructs at 33.0 dB)."""
    return DiffusionTrainConfig(
        unet=_small_unet(model_channels=32, norm_groups=8, attention_levels=(1,)),
        concat=ConcatConfig(kind="lowres", lowres_factor=4, drop=0.0),
        diffusion=DiffusionConfig(prediction_type="v", weighting="min_snr"),
        data=DataConfig(dataset="shapes", size=32),
        optim=OptimConfig(steps=1500, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.999),
    )


def ldm_tiny_inpaint() -> DiffusionTrainConfig:
    """Seconds-long inpainting run for tests."""
    cfg = ldm_tiny()
    cfg.concat = ConcatConfig(kind="inpaint")
    return cfg


def ldm_shapes_lora() -> DiffusionTrainConfig:
    """Teach a shapes-text model white and diamond with LoRA (issue 15): `ldmkit train --init-from RUN
    --config shapes-lora`. Adapters on every attention projection; the data is the extended vocabulary
    (all 112 captions, so the 72 old ones are rehearsed and not forgotten). Measured figures: README,
    "Fine-tuning and LoRA"."""
    cfg = ldm_shapes_text()
    cfg.data.vocabulary = "extended"
    # The demo's first stage decodes white as orange-red and a diamond as a teardrop (it saw neither), so
    # its decoder learns them first. Judged strictly (docs/shape-judge.md) on 160 held-out new-word and 288
    # old-word reconstructions of the demo's first stage: 0 / 99.7 % before, 79.4 / 94.8 % after 300 steps
    # (lr 1e-3), 98.8 / 97.9 % after 1,000 (lr 2e-3: 98.8 / 97.2; 600 at 3e-4: 80.6 / 93.4).
    cfg.finetune = FinetuneConfig(train="lora", decoder_steps=1000)
    # Rank 16 on the attention projections and the ResBlock convolutions: with the 1,000 decoder steps, the strict
    # judge passed 79.2 % of new-word samples and 88.4 % of old captions all right, against 48.3 / 85.6 % for
    # rank 8 on attention alone (benchmarks/lora_shapes.py; a full U-Net fine-tune: 81.7 / 88.9 %).
    cfg.lora = LoraConfig(rank=16, alpha=16, targets=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    cfg.optim = OptimConfig(steps=1000, batch_size=32, lr=2e-3, warmup_steps=50, ema_decay=None, grad_clip=1.0)
    cfg.logging = LoggingConfig(val_every=500, ckpt_every=500)
    cfg.sample.prompts = ["a white diamond in the bottom left", "a white circle in the top right",
                          "a red diamond in the top left", "a blue square in the bottom right"]
    return cfg


def ldm_shapes_finetune() -> DiffusionTrainConfig:
    """shapes-lora as a full fine-tune: every U-Net weight trained, at a lower learning rate."""
    cfg = ldm_shapes_lora()
    cfg.finetune = FinetuneConfig(train="unet", decoder_steps=1000)
    cfg.optim = OptimConfig(steps=1000, batch_size=32, lr=2e-4, warmup_steps=50, ema_decay=None, grad_clip=1.0)
    return cfg


# --- the conditioning-routes study (`ldmkit study routes`, ldmkit.study.routes) --------------------
# One U-Net for every class arm (widths 32, 64; transformers at both levels and the middle, as
# shapes-text), one task: the class (shape x colour) of `shapes`, trained on the 60 combinations left by
# data.holdout=12 so the same runs answer the composition question. Short: the study sets optim.steps
# from its budget. Cross-attention at the 8x8 level too: at 300 steps with it only at 4x4 and the middle,
# the caption route placed shapes in the named quadrant no better than chance (23 %); with it, 48 %.


def _routes_unet(**kw) -> UNetConfig:
    return _small_unet(model_channels=32, norm_groups=8, **({"attention_levels": (0, 1)} | kw))


def ldm_routes_film() -> DiffusionTrainConfig:
    """The class as FiLM: its embedding, added to the time embedding, drives every ResBlock's
    GroupNorm scale and shift (`emb_mode: scale_shift`; AdaGN, Dhariwal & Nichol 2021, §3).

    Every routes preset weights the v-loss uniformly over t, as `demo` does: the position a caption or
    label names is decided at high noise, where min-SNR-γ's weight goes to 0. With min-SNR-γ and 300
    steps the caption route put 48, 25 and 10 % of its held-out captions' samples in the named quadrant
    (seeds 0-2, chance 25 %); weighted uniformly, after 600 steps 100, 42 and 44 % (`ldmkit study
    routes`, docs/faq/routes)."""
    return DiffusionTrainConfig(
        unet=_routes_unet(num_classes=18),
        conditioner=ConditionerConfig(num_classes=18, drop_label=0.1),
        diffusion=DiffusionConfig(prediction_type="v", weighting="uniform"),
        data=DataConfig(dataset="shapes", size=32, holdout=12),
        optim=OptimConfig(steps=1200, batch_size=32, lr=2e-3, warmup_steps=50, ema_decay=0.995),
        logging=LoggingConfig(val_every=100000, ckpt_every=100000),
        sample=SampleConfig(guidance=2.0, steps=20),
    )


def ldm_routes_bias() -> DiffusionTrainConfig:
    """The class as a bias: the same embedding added to the time embedding, which each ResBlock adds to
    its features as a per-channel bias (`emb_mode: add`, as Stable Diffusion's class_embedding)."""
    cfg = ldm_routes_film()
    cfg.unet = cfg.unet.model_copy(update={"emb_mode": "add"})
    return cfg


def ldm_routes_onehot() -> DiffusionTrainConfig:
    """The class as 18 constant one-hot maps concatenated to the U-Net's input (`concat.kind: onehot`);
    zeros for dropped labels, the null condition of guidance."""
    cfg = ldm_routes_film()
    cfg.unet = cfg.unet.model_copy(update={"num_classes": 0})
    cfg.conditioner = ConditionerConfig()
    cfg.concat = ConcatConfig(kind="onehot", onehot_factors=(18,), drop=0.1)
    return cfg


def ldm_routes_caption() -> DiffusionTrainConfig:
    """The condition as a caption ('a red circle in the top left') through cross-attention on MiniLM tokens."""
    cfg = ldm_routes_film()
    cfg.unet = cfg.unet.model_copy(update={"num_classes": 0, "context_dim": 384})
    cfg.conditioner = ConditionerConfig(text_encoder="minilm", drop_text=0.1)
    return cfg


def ldm_routes_factors() -> DiffusionTrainConfig:
    """A label that can compose: the combination's shape, colour and position as three one-hot groups
    (3 + 6 + 4 maps) concatenated to the input (`data.labels: combo`, `concat.onehot_factors: [3, 6, 4]`)."""
    cfg = ldm_routes_onehot()
    cfg.data.labels = "combo"
    cfg.concat = ConcatConfig(kind="onehot", onehot_factors=(3, 6, 4), drop=0.1)
    return cfg


def ldm_routes_free() -> DiffusionTrainConfig:
    """Unconditional `shapes-free`: the base model the study's ControlNet and adapter learn on (self-attention
    at the 4x4 level and the middle only: there is no condition to attend to)."""
    cfg = ldm_routes_film()
    cfg.unet = _routes_unet(attention_levels=(1,))
    cfg.conditioner = ConditionerConfig()
    cfg.data = DataConfig(dataset="shapes-free", size=32)
    cfg.sample.guidance = 1.0
    return cfg


def ldm_routes_free_map() -> DiffusionTrainConfig:
    """`shapes-free` with the shape's mask concatenated (pixel-unshuffled onto the 8x8 latent grid,
    16 channels; `concat.kind: map`), trained from scratch: the concatenation spatial route."""
    cfg = ldm_routes_free()
    cfg.concat = ConcatConfig(kind="map", map_factor=4, drop=0.0)
    return cfg


DIFFUSION_PRESETS: dict[str, Callable[[], DiffusionTrainConfig]] = {
    "shapes-text": ldm_shapes_text,
    "demo": ldm_demo,
    "shapes-free-text": ldm_shapes_free_text,
    "digits-class": ldm_digits_class,
    "shapes-class": ldm_shapes_class,
    "shapes-class-bias": ldm_shapes_class_bias,
    "faces": ldm_faces,
    "photos": ldm_photos,
    "tiny": ldm_tiny,
    "shapes-inpaint": ldm_shapes_inpaint,
    "shapes-free-inpaint": ldm_shapes_free_inpaint,
    "shapes-sr": ldm_shapes_sr,
    "tiny-inpaint": ldm_tiny_inpaint,
    "shapes-lora": ldm_shapes_lora,
    "shapes-finetune": ldm_shapes_finetune,
    "routes-film": ldm_routes_film,
    "routes-bias": ldm_routes_bias,
    "routes-onehot": ldm_routes_onehot,
    "routes-caption": ldm_routes_caption,
    "routes-factors": ldm_routes_factors,
    "routes-free": ldm_routes_free,
    "routes-free-map": ldm_routes_free_map,
}
