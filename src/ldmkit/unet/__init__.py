"""The denoiser U-Net: `config` (architecture and presets), `blocks` (encoder level, middle, decoder
level), `model` (the network and its weight initialisation)."""

from ldmkit.unet.blocks import DownBlock, MidBlock, UpBlock
from ldmkit.unet.config import UNET_PRESETS, UNetConfig, unet_sd1, unet_sd2, unet_sdxl, unet_small, unet_tiny
from ldmkit.unet.model import UNet, init_weights

__all__ = ["DownBlock", "MidBlock", "UpBlock", "UNET_PRESETS", "UNetConfig", "UNet", "init_weights",
           "unet_sd1", "unet_sd2", "unet_sdxl", "unet_small", "unet_tiny"]
