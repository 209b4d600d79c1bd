"""Pieces every training loop here shares: a resumable data order, LR schedule, EMA, logging,
graceful interruption and NaN checks. The loops themselves live in their own files."""

from __future__ import annotations

import copy
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldmkit.errors import LdmkitError, TrainingInterrupted


# --- run folder ----------------------------------------------------------------------------------


def start_run(out: str | Path, resume: bool) -> Path:
    """Create OUT (and OUT/samples), refusing to overwrite an earlier run unless resuming."""
    out = Path(out)
    if (out / "latest").exists() and not resume:
        raise LdmkitError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    (out / "samples").mkdir(parents=True, exist_ok=True)
    return out


# --- data order ----------------------------------------------------------------------------------


def batch_indices(step: int, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Indices of the batch used at optimizer step `step`, a pure function of (step, seed).

    Each epoch is a fresh permutation seeded by (seed, epoch); the last partial batch is dropped.
    Because the order depends only on the step, resuming from a checkpoint's step continues the
    exact same sequence of batches (the "data position" is the step), and `rank/world` shard the
    global batch across processes.
    """
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise LdmkitError(f"the dataset has {n} items, fewer than one batch of {batch_size}; lower optim.batch_size")
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    idx = perm[k * batch_size : (k + 1) * batch_size]
    return idx[rank::world]


# --- learning rate -------------------------------------------------------------------------------


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up, then constant or cosine decay to 0 at `total` (Loshchilov & Hutter, 2017)."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


# --- EMA -----------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of weights, θ̄ ← d·θ̄ + (1 − d)·θ (Polyak averaging).

    The effective decay warms up as min(d, (1 + n) / (10 + n)) so early averages are not dominated
    by the random initialisation (the schedule used by TensorFlow and guided-diffusion).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_p = [e for e in self.module.parameters()]
        live_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, live_p, 1 - d)  # one fused kernel per dtype/device, not one per tensor
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])


# --- logging -------------------------------------------------------------------------------------


class TrainLog:
    """Append-only JSONL log (one line per logged step) and a loss-curve PNG drawn from it."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.path = out_dir / "log.jsonl"
        self.enabled = enabled

    def write(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the log matches the weights."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]

    def plot(self, keys: list[str], out: Path) -> None:
        """Loss curves as a PNG (matplotlib, headless)."""
        if not self.enabled:
            return
        recs = self.records()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in keys if any(k in r for r in recs)]
        if not keys:
            return
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, k in zip(axes[0], keys):
            pts = [(r["step"], r[k]) for r in recs if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts])
            ax.set_title(k)
            ax.set_xlabel("step")
            if k in ("loss", "rec") and all(p[1] > 0 for p in pts):
                ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(out, dpi=80)
        plt.close(fig)


# --- interruption and divergence -----------------------------------------------------------------


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


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params, grad_clip: float | None) -> None:
    """Backward, optional gradient-norm clipping, step: the update every loop here makes."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def stop_if_requested(stop: GracefulInterrupt, bar, done: int, checkpoint) -> None:
    """After a SIGINT/SIGTERM: write a checkpoint at step `done`, then raise TrainingInterrupted."""
    if stop.requested:
        bar.close()
        folder = checkpoint(done)
        raise TrainingInterrupted(f"interrupted at step {done}; checkpoint saved to {folder}; continue with --resume")


def periodic(done: int, total: int, logging, log: TrainLog, loss: torch.Tensor, opt, sample_grid, checkpoint) -> None:
    """The second-stage loops' bookkeeping after step `done`: log line, sample grid, checkpoint
    (the last two skipped at the final step, which the loop writes itself)."""
    if done % logging.log_every == 0 or done == total:
        log.write(done, loss=loss.item(), lr=opt.param_groups[0]["lr"])
    if done % logging.val_every == 0 and done != total:
        sample_grid(done)
    if done % logging.ckpt_every == 0 and done != total:
        checkpoint(done)


def check_finite(loss: torch.Tensor, step: int, out_dir: Path) -> None:
    if not torch.isfinite(loss):
        latest = out_dir / "latest"
        where = f"the last good checkpoint is {out_dir / 'checkpoints' / latest.read_text().strip()}" if latest.is_file() else "no checkpoint was written yet"
        raise LdmkitError(
            f"loss became {loss.item()} at step {step}; {where}. Lower optim.lr or enable optim.grad_clip, then --resume"
        )


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
