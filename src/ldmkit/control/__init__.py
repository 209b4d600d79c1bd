"""Spatial control of a frozen U-Net: `controlnet` (ControlNet, Zhang et al. 2023, and several at once),
`adapter` (T2I-Adapter, Mou et al. 2023) and `control_image` (the control map a net reads, checked and
converted). They sit above `ldmkit.unet` (each is built from, or feeds, a U-Net) and below the pipeline,
apart from `ldmkit.conditioning`, whose routes the U-Net itself reads.
"""

from ldmkit.control.adapter import Adapter, AdapterConfig
from ldmkit.control.control_image import prepare_control_image
from ldmkit.control.controlnet import (
    ControlNet,
    ControlNetConfig,
    MultiControlNet,
    controlled_unet,
)

__all__ = ["Adapter", "AdapterConfig", "ControlNet", "ControlNetConfig", "MultiControlNet", "controlled_unet",
           "prepare_control_image"]
