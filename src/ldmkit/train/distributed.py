"""Running a training loop under `torchrun`: PyTorch's own process group, DDP and FSDP, nothing else.

`torchrun --nproc_per_node N -m ldmkit.cli train ...` (or `torchrun ... $(which ldmkit) train`) sets
RANK / WORLD_SIZE / LOCAL_RANK; `setup` joins the process group (NCCL on CUDA, gloo on CPU) and
picks this rank's device. The loops then

- split each optimizer step's *global* batch (`optim.batch_size`) into contiguous per-rank rows and,
  with `optim.grad_accum` > 1, into micro-batches (`micro_batches`); every random draw is made for
  the global batch and sliced (`ldmkit.rng.BatchRandom`), so the run does not depend on N;
- wrap the trained module in DistributedDataParallel (gradients averaged across ranks in buckets,
  overlapping the backward pass; Li et al., 2020) or, with `distributed: fsdp`, FSDP2's
  `fully_shard` per block (parameters, gradients and optimizer state sharded; Zhao et al., 2023);
- reduce the loss and the stop flags across ranks every step (`StepSync`), so every rank takes the
  same decision to stop, save or raise on a NaN at the same step;
- write logs, images and checkpoints from rank 0 only; a checkpoint holds full (unsharded) weights
  and optimizer state and does not record N, so a run resumes on any number of processes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ldmkit.device import pick_device
from ldmkit.errors import LdmkitError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size, local rank (1 process: 0, 1, 0)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device_pref: str = "auto") -> tuple[Dist, torch.device]:
    """Join the torchrun process group if there is one; returns (Dist, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), pick_device(device_pref)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise LdmkitError(f"local rank {local} but only {torch.cuda.device_count()} GPUs; lower --nproc_per_node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local), device


def wrap(module: nn.Module, d: Dist, device: torch.device, strategy: str = "ddp") -> nn.Module:
    """The module to call in training: itself (1 process), DDP, or FSDP2-sharded in place.

    DDP keeps `module` untouched inside (`wrapper.module is module`), so checkpoints are written from
    `module` as in one process. FSDP shards `module`'s parameters in place (they become DTensors);
    use `full_state_dict` / `full_optimizer_state` to write a checkpoint."""
    if not d.enabled:
        return module
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per top-level block, then the root: each unit's parameters are gathered just
        # before it runs and freed after, so only one block is ever whole on a rank.
        for child in _blocks(module):
            fully_shard(child)
        fully_shard(module)
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The children worth one FSDP unit each: entries of top-level ModuleLists, else the children."""
    out = []
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            out.extend(child)
        elif sum(p.numel() for p in child.parameters()):
            out.append(child)
    return out


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights of a (possibly FSDP-sharded) module; every rank must call it."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load unsharded weights into a (possibly sharded) module."""
    if not is_sharded(module):
        module.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    if not is_sharded(module):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    if not is_sharded(module):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, opt, state, options=StateDictOptions(full_state_dict=True))


def micro_batches(global_batch: int, d: Dist, accum: int) -> list[tuple[int, int]]:
    """This rank's rows of the global batch, as `accum` contiguous (lo, hi) micro-batches.

    Rank r owns rows [r·B/N, (r+1)·B/N); equal pieces everywhere, so averaging the per-piece mean
    losses (DDP averages gradients over ranks, accumulation weights each micro-batch by 1/accum)
    gives exactly the gradient of the global batch mean."""
    if global_batch % (d.world * accum):
        raise LdmkitError(
            f"optim.batch_size {global_batch} does not split into {d.world} processes x {accum} micro-batches; "
            f"use a multiple of {d.world * accum}"
        )
    per_rank = global_batch // d.world
    size = per_rank // accum
    start = d.rank * per_rank
    return [(start + i * size, start + (i + 1) * size) for i in range(accum)]


def average_gradients(params: list[nn.Parameter], d: Dist, device: torch.device) -> None:
    """Average the gradients of parameters outside the DDP wrapper over the ranks, as DDP averages its own (one
    all-reduce on `device`: NCCL reduces only GPU tensors, so a CPU module's gradients travel there and back).

    A rank whose pieces did not reach a parameter (its grad is None) adds zeros; the parameter keeps None only when
    no rank reached it, so the update is the one process's of the global batch (an optimizer skips None grads)."""
    if not d.enabled or not params:
        return
    flat = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=p.device) for p in params]
    reached = torch.tensor([float(p.grad is not None) for p in params])
    buf = torch.cat([torch.cat([f.to(device) for f in flat]), reached.to(device)])  # (Σ numel + len(params),)
    dist.all_reduce(buf)  # SUM
    values, reached = buf[: -len(params)] / d.world, buf[-len(params) :].cpu()
    offset = 0
    for p, any_rank in zip(params, reached.tolist()):
        grad = values[offset : offset + p.numel()].view(p.shape).to(device=p.device, dtype=p.dtype)
        offset += p.numel()
        p.grad = grad if any_rank > 0 else None


def no_sync(model: nn.Module, last: bool):
    """Skip DDP's gradient all-reduce on every micro-batch but the last (the gradients accumulate
    locally and are averaged once). FSDP2 reduce-scatters every backward; that is only slower."""
    if not last and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


class StepSync:
    """One all-reduce per step carrying what every rank must agree on: the global mean loss (for the
    log and the NaN check) and flags such as "a signal arrived" or "out of time" raised on any rank."""

    def __init__(self, d: Dist, device: torch.device):
        self.d, self.device = d, device

    def __call__(self, loss: torch.Tensor, flags: tuple[bool, ...] = ()) -> tuple[torch.Tensor, tuple[bool, ...]]:
        if not self.d.enabled:
            return loss.detach(), tuple(flags)
        buf = torch.tensor([float(loss.detach()), *map(float, flags)], device=self.device)
        dist.all_reduce(buf)  # SUM
        return buf[0] / self.d.world, tuple(bool(f > 0) for f in buf[1:])


def global_means(sums: dict[str, float], count: int, d: Dist, device: torch.device) -> dict[str, float]:
    """{name: Σ value·rows / Σ rows} over every rank's pieces, from each rank's sums and row count: the
    means of the global batch, for the log (one all-reduce; every rank must call it, with the same names)."""
    names = sorted(sums)
    buf = torch.tensor([*(sums[k] for k in names), float(count)], dtype=torch.float64, device=device)
    if d.enabled:
        dist.all_reduce(buf)  # SUM
    return {k: float(buf[i] / buf[-1]) for i, k in enumerate(names)} if buf[-1] > 0 else {}


def check_in_sync(module: nn.Module, d: Dist) -> list[float]:
    """Every rank's float64 sum of |weights| (one all-gather); raises if the replicas drifted apart —
    a bug (e.g. a rank-dependent draw) that would otherwise only show as a worse model."""
    sharded = is_sharded(module)  # then each rank holds a different piece by design: sums, no check
    total = torch.zeros((), dtype=torch.float64, device=next(module.parameters()).device)
    for p in module.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.detach().double().abs().sum()
    if not d.enabled:
        return [total.item()]
    sums = [torch.zeros_like(total) for _ in range(d.world)]
    dist.all_gather(sums, total)
    sums = [float(s) for s in sums]
    if not sharded and any(s != sums[0] for s in sums):
        raise LdmkitError(f"the {d.world} processes hold different weights (|w| sums {sums}); this is a bug, please report it")
    return sums


def cleanup(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
