"""The first stage: KL-regularised and plain autoencoders, and their losses."""

from ldmkit.autoencoder.model import AutoencoderConfig, AutoencoderKL, DiagonalGaussian, PointPosterior
from ldmkit.train.checkpoint import register_kind


def _build(config: AutoencoderConfig, meta: dict) -> AutoencoderKL:
    return AutoencoderKL(config)


register_kind("autoencoder", AutoencoderConfig, _build)

__all__ = ["AutoencoderConfig", "AutoencoderKL", "DiagonalGaussian", "PointPosterior"]
