"""Building blocks shared by the autoencoder, the U-Net and ControlNet."""

from ldmkit.layers.attention import Attention, SpatialSelfAttention
from ldmkit.layers.embeddings import TimestepEmbedding, timestep_embedding
from ldmkit.layers.resnet import Downsample, ResBlock, Upsample, group_norm

__all__ = [
    "Attention",
    "SpatialSelfAttention",
    "TimestepEmbedding",
    "timestep_embedding",
    "Downsample",
    "ResBlock",
    "Upsample",
    "group_norm",
]
