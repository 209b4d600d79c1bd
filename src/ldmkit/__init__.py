"""ldmkit: latent diffusion toolkit.

    import ldmkit
    ae = ldmkit.load("runs/demo/autoencoder")      # any checkpoint folder → its module, eval mode
"""

__version__ = "0.1.0"


def load(path, ema: bool = True, device="cpu"):
    """Return the module a checkpoint holds (autoencoder, LatentDiffusion, ControlNet, ...) in eval
    mode: an ldmkit checkpoint folder, a diffusers model or pipeline folder, or an original
    Stable Diffusion single file."""
    from ldmkit.checkpoint import is_checkpoint, load as load_native

    if is_checkpoint(path):  # the native folder needs no conversion code (nor diffusers)
        return load_native(path, ema=ema, device=device)
    from ldmkit.interop.convert import load_any

    return load_any(path, ema=ema, device=device)
