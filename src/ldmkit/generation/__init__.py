"""Generation: one typed request in, images and their parameters out (`generate`)."""

from ldmkit.generation.request import GenerationRequest, HiresPass

__all__ = ["GenerationRequest", "HiresPass"]
