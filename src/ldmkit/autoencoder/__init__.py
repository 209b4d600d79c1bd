"""The first stage: KL-regularised and plain autoencoders (`model`), their losses (`losses`), and the tiny
autoencoder (TAESD) that decodes the same latents fast (`tiny`)."""

from ldmkit.autoencoder.model import AutoencoderConfig, AutoencoderKL, DiagonalGaussian, PointPosterior
from ldmkit.autoencoder.tiny import TinyAutoencoder, TinyAutoencoderConfig

__all__ = ["AutoencoderConfig", "AutoencoderKL", "DiagonalGaussian", "PointPosterior", "TinyAutoencoder",
           "TinyAutoencoderConfig"]
