"""Exponential moving average of a model's weights, kept beside the trained model by `fit`."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """Exponential moving average of weights, θ̄ ← d·θ̄ + (1 − d)·θ (Polyak averaging).

    The effective decay warms up as min(d, (1 + n) / (10 + n)) so early averages are not dominated
    by the random initialisation (the schedule used by TensorFlow and guided-diffusion); `warmup=False`
    keeps d from the first update (a model that starts from trained weights has no such start to forget).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates)) if self.warmup else self.decay
        ema_p = [e for e in self.module.parameters()]
        live_p = [p.detach() for p in model.parameters()]
        if not any(hasattr(e, "full_tensor") for e in ema_p):  # a whole average: gather FSDP-sharded weights
            live_p = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in live_p]
        # One fused kernel per dtype/device, not one per tensor. Under FSDP the trainer shards `module` like
        # the weights (DTensors), and each rank averages its own shard: DTensor ops act on the local pieces.
        torch._foreach_lerp_(ema_p, live_p, 1 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
