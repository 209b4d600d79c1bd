"""`ldmkit train`: picks the second-stage task the config asks for and runs the training loop.

A plain run trains `DiffusionTask` (train/diffusion_task.py: first stage frozen, latents cached, the U-Net
learned from scratch); `finetune.init_from` or a LoRA/embedding route trains `FinetuneTask`
(train/finetune.py), which builds on it. The choice lives here, above both, so neither task module needs
the other's caller.
"""

from __future__ import annotations

from pathlib import Path

from ldmkit.train.config import DiffusionTrainConfig
from ldmkit.train.diffusion_task import DiffusionTask
from ldmkit.train.distributed import cleanup, setup
from ldmkit.train.finetune import FinetuneTask, needs_finetune
from ldmkit.train.loop import fit


def train_diffusion(cfg: DiffusionTrainConfig, out: str | Path, resume: bool = False, progress: bool = True,
                    time_limit: float | None = None) -> Path:
    """Train a LatentDiffusion; returns the final checkpoint folder. `time_limit` (seconds) ends
    training early at a step boundary — the same checkpoint logic applies. Under torchrun every
    process calls this; see `ldmkit.train.distributed`."""
    task = FinetuneTask if needs_finetune(cfg) else DiffusionTask  # --init-from, LoRA (train/finetune.py)
    dist_info, device = setup(cfg.optim.device)
    try:
        return fit(task, cfg, Path(out), resume, progress, time_limit, dist_info, device)
    finally:
        cleanup(dist_info)
