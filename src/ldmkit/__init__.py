"""ldmkit: latent diffusion toolkit."""
__version__ = "0.1.0"

