"""ldmkit: latent diffusion toolkit.

    import ldmkit
    ae = ldmkit.load("runs/demo/autoencoder")      # any checkpoint folder → its module, eval mode
"""

__version__ = "0.1.0"


def load(path, ema: bool = True, device="cpu"):
    """Return the module a checkpoint folder holds (autoencoder, LatentDiffusion, ...) in eval mode."""
    from ldmkit.train.checkpoint import load as _load

    return _load(path, ema=ema, device=device)
