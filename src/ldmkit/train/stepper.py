"""One optimizer step of a global batch across micro-batches and ranks, with the checks every
step makes: a finite loss, and a SIGINT/SIGTERM turned into a checkpoint and a clean exit."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldmkit.errors import LdmkitError, TrainingInterrupted


class GracefulInterrupt:
    """Turn SIGINT/SIGTERM into a flag checked between steps, so the loop can save a checkpoint
    and exit cleanly; a second signal aborts at once (the last checkpoint is intact either way)."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):  # noqa: ARG002
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "GracefulInterrupt":
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class Stepper:
    """One optimizer step of a global batch: micro-batches on this rank, gradients averaged across
    ranks, the loss and stop requests agreed by all ranks, NaN check, clipping, update.

    `piece_loss(lo, hi)` returns the mean loss of rows [lo, hi) of the step's global batch; the
    pieces are equal, so weighting each by 1/accum (and DDP's average over ranks) gives the gradient
    of the global batch mean — the same update as one process with the whole batch.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, params, grad_clip: float | None,
                 batch_size: int, accum: int, dist, device: torch.device, out_dir: Path, precision: str = "fp32",
                 reduce=None):
        from ldmkit.train.distributed import StepSync, micro_batches

        self.model, self.opt, self.params, self.grad_clip = model, opt, list(params), grad_clip
        self.pieces = micro_batches(batch_size, dist, accum)
        self.sync = StepSync(dist, device)
        self.out_dir = out_dir
        self.reduce = reduce  # averages gradients the DDP wrapper does not hold (`Task.reduce_gradients`), or None
        # fp16's 5-bit exponent underflows small gradients: scale the loss up, unscale before clipping,
        # skip steps whose gradients overflowed (Micikevicius et al., 2018). bf16 needs none of it.
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.grad_norm: torch.Tensor | None = None  # measured only where optim.grad_clip computes it anyway

    def __call__(self, step: int, piece_loss, flags: tuple[bool, ...] = ()) -> tuple[torch.Tensor, tuple[bool, ...]]:
        """Run step `step`; returns (global mean loss, each flag OR-ed over the ranks)."""
        from ldmkit.train.distributed import no_sync

        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for i, (lo, hi) in enumerate(self.pieces):
            with no_sync(self.model, last=i == len(self.pieces) - 1):
                loss = piece_loss(lo, hi)
                scaled = loss / len(self.pieces)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total = total + loss.detach().float()
        if self.reduce is not None:  # before the clip and the update, which must see the global batch's gradient
            self.reduce()
        loss, flags = self.sync(total / len(self.pieces), flags)
        check_finite(loss, step, self.out_dir)  # before the update: the weights stay those of step − 1
        if self.scaler:
            self.scaler.unscale_(self.opt)
        if self.grad_clip:  # the norm before clipping, for the log (a tensor: reading it would sync a GPU)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        return loss, flags

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def stop_if_requested(requested: bool, bar, done: int, checkpoint) -> None:
    """After a SIGINT/SIGTERM on any rank: write a checkpoint at step `done`, raise TrainingInterrupted."""
    if requested:
        bar.close()
        folder = checkpoint(done)
        raise TrainingInterrupted(f"interrupted at step {done}; checkpoint saved to {folder}; continue with --resume")


def check_finite(loss: torch.Tensor, step: int, out_dir: Path) -> None:
    if not torch.isfinite(loss):
        latest = out_dir / "latest"
        where = f"the last good checkpoint is {out_dir / 'checkpoints' / latest.read_text().strip()}" if latest.is_file() else "no checkpoint was written yet"
        raise LdmkitError(
            f"loss became {loss.item()} at step {step}; {where}. Lower optim.lr or enable optim.grad_clip, then --resume"
        )
