"""Building blocks shared by the autoencoder, the U-Net and ControlNet."""

from ldmkit.layers.attention import Attention, SpatialSelfAttention
from ldmkit.layers.embeddings import TimestepEmbedding, guidance_embedding, timestep_embedding
from ldmkit.layers.resnet import Downsample, ResBlock, Upsample, group_norm
from ldmkit.layers.sharing import with_children
from ldmkit.layers.transformer import GEGLU, FeedForward, SpatialTransformer, TransformerBlock

__all__ = [
    "Attention",
    "SpatialSelfAttention",
    "TimestepEmbedding",
    "guidance_embedding",
    "timestep_embedding",
    "Downsample",
    "ResBlock",
    "Upsample",
    "group_norm",
    "GEGLU",
    "FeedForward",
    "SpatialTransformer",
    "TransformerBlock",
    "with_children",
]
