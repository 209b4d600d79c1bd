"""ldmkit: latent diffusion toolkit.

    import ldmkit
    ae = ldmkit.load("runs/demo/autoencoder")      # any checkpoint folder → its module, eval mode
    ldm = ldmkit.load("sd-folder")                  # a diffusers pipeline folder → LatentDiffusion
"""

__version__ = "0.1.0"


def load(path, ema: bool = True, device="cpu", config=None, skip=frozenset()):
    """Return the module a checkpoint holds (autoencoder, LatentDiffusion, ControlNet, ...) in eval
    mode: an ldmkit checkpoint folder, a diffusers model or pipeline folder, or an original
    Stable Diffusion single file. The one from-path loader: every command and trainer that reads a model
    loads it here and then checks what it got. `config`: for a single file only, the diffusers pipeline
    folder (or config) describing it (`ldmkit.interop.original.load_original`). `ema`: prefer EMA weights
    where the checkpoint has both. `skip`: parts of a LatentDiffusion ("unet", "text": a CLIP text model) to
    build on the meta device without reading their weights, because a converted model replaces them
    (`ldmkit.sample.load_skip`); CPU only. An ldmkit or diffusers pipeline folder honours it, a
    single file is read whole."""
    from ldmkit.checkpoint import is_checkpoint, load as load_native

    skip = frozenset(skip)
    if skip:
        import torch

        from ldmkit.errors import LdmkitError

        if torch.device(device).type != "cpu":
            raise LdmkitError(f"skip= leaves parts for a CPU backend; load with device='cpu', not {device!r}")
    if config is None and is_checkpoint(path):  # the native folder needs no conversion code (nor diffusers)
        return load_native(path, ema=ema, device=device, skip=skip)
    from ldmkit.interop.convert import load_any  # reads every format, and refuses config= for non-files

    return load_any(path, config=config, ema=ema, device=device, skip=skip)
