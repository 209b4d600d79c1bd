"""`DiffusionConfig`: the forward process and the training objective, typed and checked at load."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ldmkit.diffusion.parameterization import canonical_prediction_type


class DiffusionConfig(BaseModel):
    """The forward process and the training objective."""

    model_config = ConfigDict(extra="forbid")

    schedule: Literal["linear", "scaled_linear", "cosine"] = Field("scaled_linear", description="β schedule")
    num_timesteps: int = Field(1000, ge=1)
    beta_start: float = Field(0.00085, gt=0)
    beta_end: float = Field(0.012, gt=0)
    zero_terminal_snr: bool = Field(False, description="rescale to SNR(T) = 0 (Lin et al., 2024); use v-prediction")
    prediction_type: Literal["eps", "v", "x0"] = Field("eps", description="what the network predicts")
    weighting: Literal["uniform", "min_snr"] = Field("uniform", description="loss weight over t")
    min_snr_gamma: float = Field(5.0, gt=0)
    offset_noise: float = Field(0.0, ge=0)
    timestep_spacing: Literal["leading", "trailing", "linspace"] = Field("trailing", description="sampling timesteps")
    steps_offset: int = Field(0, ge=0, description="added to 'leading' timesteps (SD v1: 1)")
    latents: Literal["sample", "mean"] = Field(
        "sample", description="the clean latent z0 of the training loss: a fresh draw z ~ q(z|x) each step (the LDM "
        "recipe) or the posterior mean (for a first stage whose posterior is wide; docs/benchmarks.md)")

    @field_validator("prediction_type", mode="before")
    @classmethod
    def _canonical(cls, v):
        # diffusers' names ("epsilon", "v_prediction", "sample") are accepted and stored as ldmkit's.
        return canonical_prediction_type(v) if isinstance(v, str) and v in ("epsilon", "v_prediction", "sample") else v
