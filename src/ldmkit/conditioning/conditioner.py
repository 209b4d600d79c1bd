"""The Conditioner: a batch of raw conditions → `Cond`, with per-route condition dropout.

Classifier-free guidance (Ho & Salimans, 2022) needs one model that is both conditional and
unconditional; it is trained by replacing conditions with their "null" values. Two draws per item, as
Stability's generative-models (SGM) conditioner: each route is dropped with its own probability p_route
(`drop_text`, `drop_label`: SGM's `ucg_rate` per embedder), and with probability `drop_all` every route
is dropped together. Guidance's unconditional branch (`uncond`) nulls all routes at once, so that is the
condition it needs trained: with independent draws alone, text and label at 0.1 each give it 1 % of the
items; P(all null) = p_all + (1 − p_all)·p_text·p_label. Null values: the empty caption "" for text (as
Stable Diffusion), the extra class index `num_classes` for labels; the micro-conditions are never dropped.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ldmkit.conditioning.cond import Cond
from ldmkit.conditioning.labels import label_condition
from ldmkit.conditioning.text import CachedTextEncoder, build_text_encoder
from ldmkit.errors import LdmkitError
from ldmkit.layers.embeddings import timestep_embedding
from ldmkit.rng import BatchRandom

MICRO_FIELDS = ("original height", "original width", "crop top", "crop left", "target height", "target width")
# SDXL refiner's (SGM's `aesthetic_score` embedder in place of the target size; diffusers' requires_aesthetics_score)
AESTHETIC_FIELDS = ("original height", "original width", "crop top", "crop left", "aesthetic score")
AESTHETIC_DEFAULTS = (6.0, 2.5)  # diffusers' StableDiffusionXLImg2ImgPipeline: aesthetic_score, negative_aesthetic_score
MICRO_DIM = 256  # SDXL's addition_time_embed_dim


def micro_features(values: torch.Tensor) -> torch.Tensor:
    """(B, k) size/crop (or aesthetic-score) values → (B, k·256) Fourier features: each value through the
    timestep embedding (cos first, no shift), concatenated (Podell et al. 2023, §2.2; diffusers'
    `add_time_proj` of SDXL's U-Net)."""
    n = values.shape[0]
    return timestep_embedding(values.reshape(-1).float(), MICRO_DIM).reshape(n, -1)  # (B, k·256)


def sdxl_vector(pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's vector condition: the pooled text embedding (B, P) then the Fourier features of the
    micro-conditions `time_ids` (B, 6) → (B, P + 6·256); what diffusers' UNet2DConditionModel builds from
    `added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}` before `add_embedding`."""
    return torch.cat([pooled, micro_features(time_ids).to(pooled.device, pooled.dtype)], dim=1)  # (B, P + 6·256)


class ConditionerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text_encoder: str | None = Field(None, description="'minilm' (bundled), a local folder, or None: no text route")
    pooled_text: bool = Field(False, description="also give the caption as a vector (time-embedding route): the text "
                              "encoder's own pooled embedding where it has one (SDXL: OpenCLIP bigG's projected end "
                              "token), else the mean caption token")
    zero_uncond: bool = Field(False, description="the unconditional branch of guidance without a negative prompt is "
                              "all zeros (context and pooled text), not the empty caption encoded: SDXL base's "
                              "force_zeros_for_empty_prompt (diffusers: when negative_prompt is None)")
    micro_conditioning: bool = Field(
        False, description="SDXL's size and crop conditioning: (original height, width, crop top, left, target height, "
        "width) as Fourier features on the vector route, so a model trained on crops and buckets learns what a crop is")
    aesthetic_score: bool = Field(
        False, description="with micro_conditioning: the SDXL refiner's five values (original height, width, crop top, "
        "left, aesthetic score) in place of the six; the score is the image's rated aesthetics (LAION's 0-10 scale)")
    num_classes: int = Field(0, ge=0, description="class-label route (0: off)")
    drop_text: float = Field(0.1, ge=0, le=1, description="P(caption → '') in training, drawn per item on its own "
                             "(SGM's ucg_rate of the text embedder); the text is also dropped with drop_all")
    drop_label: float = Field(0.1, ge=0, le=1, description="P(label → null class) in training, drawn per item on its "
                              "own (SGM's ucg_rate of the class embedder); the label is also dropped with drop_all")
    drop_all: float = Field(0.0, ge=0, le=1, description="P(every route → null together) in training: the condition "
                            "guidance's unconditional branch uses. Independent drops alone give it "
                            "drop_text·drop_label (1 % at 0.1 each); 0 keeps that (and earlier configs' draws). "
                            "P(text null) = drop_all + (1 − drop_all)·drop_text, likewise for the label")


class Conditioner(nn.Module):
    def __init__(self, cfg: ConditionerConfig, text_encoder: CachedTextEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        # The text encoder is frozen and not part of the checkpoint (it is rebuilt from its name),
        # so it is kept out of the module tree: not in state_dict(), not moved by .to().
        text = text_encoder if text_encoder is not None else (build_text_encoder(cfg.text_encoder) if cfg.text_encoder else None)
        self.__dict__["_text"] = text

    @property
    def context_dim(self) -> int | None:
        return self._text.dim if self._text is not None else None

    @property
    def text_encoder(self) -> CachedTextEncoder | None:
        return self._text

    @property
    def vector_dim(self) -> int:
        """Width of the vector route: the pooled caption, then the micro-conditioning features."""
        pooled = 0
        if self.cfg.pooled_text and self._text is not None:
            pooled = getattr(self._text, "pooled_dim", None) or self.context_dim
        return pooled + len(self.micro_fields) * MICRO_DIM

    @property
    def micro_fields(self) -> tuple[str, ...]:
        """The micro-conditions this model takes, in order: none, SDXL base's six, or the refiner's five."""
        if not self.cfg.micro_conditioning:
            return ()
        return AESTHETIC_FIELDS if self.cfg.aesthetic_score else MICRO_FIELDS

    def micro_values(self, n: int, height: int, width: int, original: tuple[int, int] | None = None,
                     crop: tuple[int, int] | None = None, target: tuple[int, int] | None = None,
                     aesthetic: float | None = None) -> torch.Tensor | None:
        """(n, 6) or the refiner's (n, 5) micro-conditions of images made at (height, width), None for a model
        without them. Defaults as diffusers' SDXL pipelines: original = target = (height, width), crop (0, 0),
        aesthetic score 6.0; a refiner takes no target size, a base model no score (`GenerationRequest.check`)."""
        if not self.cfg.micro_conditioning:
            return None
        oh, ow = original or (height, width)
        last = [AESTHETIC_DEFAULTS[0] if aesthetic is None else aesthetic] if self.cfg.aesthetic_score \
            else list(target or (height, width))
        return torch.tensor([[oh, ow, *(crop or (0, 0)), *last]], dtype=torch.float32).expand(n, -1)

    def default_size_crop(self, n: int, height: int, width: int) -> torch.Tensor | None:
        """The micro-conditions of an uncropped image made at its own size (SDXL's sampling default); None
        for a model without them."""
        return self.micro_values(n, height, width)

    def _micro(self, size_crop: torch.Tensor | None, n: int) -> torch.Tensor:
        """(B, k) micro-conditions → (B, k·256) Fourier features (Podell et al. 2023, §2.2: each value through
        the timestep embedding, concatenated)."""
        fields = self.micro_fields
        if size_crop is None:
            raise LdmkitError(f"this model takes SDXL size/crop conditioning; pass size_crop (B, {len(fields)}) or "
                              "sample through ldmkit.generation.generate, which fills it in")
        if size_crop.shape != (n, len(fields)):
            raise LdmkitError(f"size_crop must be ({n}, {len(fields)}): {', '.join(fields)}; got "
                              f"{tuple(size_crop.shape)}")
        return micro_features(size_crop)  # (B, k·256)

    def forward(
        self,
        texts: list[str] | None = None,
        labels: torch.Tensor | None = None,
        batch_size: int | None = None,
        train: bool = False,
        generator: torch.Generator | BatchRandom | None = None,
        size_crop: torch.Tensor | None = None,
        prompt_syntax: bool = False,
    ) -> Cond:
        """Build the Cond for a batch. In training, drop every route of an item with probability drop_all, and
        each route on its own with its probability (module docstring).
        `size_crop` (B, 6) (the refiner's (B, 5)): the micro-conditions of a model with `micro_conditioning` (never dropped).
        `prompt_syntax`: read the captions as prompts in the A1111 web UI's syntax (emphasis, BREAK, chunks
        past the encoder's window, embedding names); generation sets it, training never does (a caption's
        parentheses are text)."""
        n = batch_size or (len(texts) if texts is not None else (labels.shape[0] if labels is not None else 0))
        cond = Cond()
        # drop_all first, then each route's own draw, all from the step's generator (exact resume); with drop_all = 0
        # nothing extra is drawn, so a config without it draws exactly what it drew before the option existed
        null_all = None
        if train and self.cfg.drop_all > 0:
            null_all = (BatchRandom.of(generator, n).rand() < self.cfg.drop_all).cpu()  # (n,) bool
        if self._text is not None:
            if texts is None:
                texts = [""] * n
            if len(texts) != n:
                raise LdmkitError(f"got {len(texts)} captions for a batch of {n}")
            if train and (self.cfg.drop_text > 0 or null_all is not None):
                keep = torch.ones(n, dtype=torch.bool)
                if self.cfg.drop_text > 0:
                    keep = (BatchRandom.of(generator, n).rand() >= self.cfg.drop_text).cpu()  # (n,)
                if null_all is not None:
                    keep &= ~null_all
                texts = [t if k else "" for t, k in zip(texts, keep.tolist())]
            cond.context, cond.context_mask = self._text(list(texts), syntax=prompt_syntax)
            if self.cfg.pooled_text and getattr(self._text, "pooled_dim", None):
                cond.vector = self._text.pooled(list(texts), syntax=prompt_syntax)  # (B, P) the encoder's own
            elif self.cfg.pooled_text:
                # Mean over real tokens: all-MiniLM-L6-v2's own sentence embedding is this mean pooling.
                m = cond.context_mask[..., None].to(cond.context.dtype)  # (B, M, 1)
                cond.vector = (cond.context * m).sum(1) / m.sum(1).clamp_min(1)  # (B, D)
        elif texts is not None and any(texts):
            raise LdmkitError("this model has no text conditioning; train it with a text encoder to use prompts")
        if self.cfg.micro_conditioning:
            micro = self._micro(size_crop, n)
            cond.vector = micro if cond.vector is None else torch.cat([cond.vector, micro.to(cond.vector.device)], 1)
        if self.cfg.num_classes:
            drop = self.cfg.drop_label if train else 0.0
            cond.labels = label_condition(labels, self.cfg.num_classes, n, drop, generator, force_null=null_all)
        elif labels is not None and (labels >= 0).any():
            raise LdmkitError("this model has no class conditioning; train it with num_classes > 0 to use labels")
        return cond

    def uncond(self, batch_size: int, size_crop: torch.Tensor | None = None) -> Cond:
        """Every route at its null value: the unconditional branch of guidance (the micro-conditions, which
        are never dropped, as the conditional branch's). With `zero_uncond` (SDXL base) the text is zeros
        where the empty caption would be: the context of its shape and the pooled part of the vector."""
        cond = self.forward(texts=[""] * batch_size if self._text is not None else None, labels=None,
                            batch_size=batch_size, size_crop=size_crop)
        if self.cfg.zero_uncond and cond.context is not None:
            cond.context = torch.zeros_like(cond.context)  # (B, M, D) diffusers: zeros_like(prompt_embeds)
            if self.cfg.pooled_text:
                pooled = self.vector_dim - len(self.micro_fields) * MICRO_DIM
                cond.vector = cond.vector.clone()
                cond.vector[:, :pooled] = 0  # (B, P) zeros_like(pooled_prompt_embeds); the micro-conditions stay
        return cond
