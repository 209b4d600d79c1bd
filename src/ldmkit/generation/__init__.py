"""Generation: one typed request in, images and their parameters out (`generate`)."""

from ldmkit.generation.compat import sample
from ldmkit.generation.decoders import tiny_decoder
from ldmkit.generation.generate import Generated, Interrupted, Networks, fit, generate, split_loras
from ldmkit.generation.infotext import A1111_SAMPLERS, infotext
from ldmkit.generation.request import GenerationRequest, HiresPass, granularity

__all__ = ["A1111_SAMPLERS", "Generated", "GenerationRequest", "HiresPass", "Interrupted", "Networks", "fit",
           "generate", "granularity", "infotext", "sample", "split_loras", "tiny_decoder"]
