"""The first stage: KL-regularised and plain autoencoders (`model`), and their losses (`losses`)."""

from ldmkit.autoencoder.model import AutoencoderConfig, AutoencoderKL, DiagonalGaussian, PointPosterior

__all__ = ["AutoencoderConfig", "AutoencoderKL", "DiagonalGaussian", "PointPosterior"]
