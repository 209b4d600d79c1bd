"""The one training skeleton (`fit`) and the small pieces it is made of: the run folder, a resumable
data order, the LR schedule, the optimizer and the memory format.

Every trainer (autoencoder, diffusion, control) is a `Task`: it builds its models and data and says
how to compute the loss of a piece of a step's batch; `fit` does the rest once for all of them —
resume (weights, optimizer, EMA, Stepper), wrapping for DDP/FSDP, the step loop with its log lines,
periodic samples and checkpoints, interruption and time limit, and the final checkpoint.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel
from torch import nn
from tqdm.auto import tqdm

from ldmkit.checkpoint import EMA_WEIGHTS, WEIGHTS, load_training_state, load_weights, resolve, save_checkpoint
from ldmkit.errors import LdmkitError
from ldmkit.imageio import make_dir
from ldmkit.train.config import save_config
from ldmkit.train.ema import EMA
from ldmkit.train.lock import run_lock
from ldmkit.train.log import TrainLog
from ldmkit.train.stepper import GracefulInterrupt, Stepper, stop_if_requested


# --- run folder ----------------------------------------------------------------------------------


def start_run(out: str | Path, resume: bool) -> Path:
    """Create OUT (and OUT/samples), refusing to overwrite an earlier run unless resuming."""
    out = Path(out)
    if (out / "latest").exists() and not resume:
        raise LdmkitError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    make_dir(out / "samples", "--out")
    return out


# --- data order ----------------------------------------------------------------------------------


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the global batch used at optimizer step `step`, a pure function of (step, seed).

    Each epoch is a fresh permutation seeded by (seed, epoch); the last partial batch is dropped.
    Because the order depends only on the step, resuming from a checkpoint's step continues the
    exact same sequence of batches (the "data position" is the step) on any number of processes;
    each process trains its rows of it (`distributed.micro_batches`).
    """
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise LdmkitError(f"the dataset has {n} items, fewer than one batch of {batch_size}; lower optim.batch_size")
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    idx = perm[k * batch_size : (k + 1) * batch_size]
    return idx


def apply_memory_format(model: nn.Module, optim) -> None:
    """`optim.channels_last`: NHWC weights (inputs follow in the loops), which oneDNN / cuDNN
    convolutions run without layout conversions; `optim.gradient_checkpointing`: the model's own
    switch (U-Net and autoencoder recompute each block's activations in the backward pass)."""
    if optim.channels_last:
        model.to(memory_format=torch.channels_last)
    if optim.gradient_checkpointing:
        if hasattr(model, "set_gradient_checkpointing"):
            model.set_gradient_checkpointing(True)
        elif hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = True
        else:
            raise LdmkitError(f"{type(model).__name__} has no gradient checkpointing; set optim.gradient_checkpointing=false")


# --- optimizer -----------------------------------------------------------------------------------


def adamw(params, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter, 2019) with PyTorch's fused kernel where it has one (CPU and CUDA float
    parameters): the same update as the default per-tensor loop, in one pass per tensor instead of a dozen
    elementwise ops. The default loop is 27 % of a 37M-parameter U-Net's CPU training step; fused, the
    optimizer step is 5.5x faster (134 → 25 ms, benchmarks/train_step.py's `mid`)."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


def build_optimizer(params, o, device: torch.device, sharded: bool = False) -> torch.optim.Optimizer:
    """The optimizer `optim.optimizer` names, over `params` (config.OptimConfig: every one gets lr, weight decay and,
    where it has moments to decay, betas; `fit` sets each group's lr every step from `lr_at`). Each comes from the
    library that maintains it, an optional extra; a missing library or a device it cannot run on is one line naming
    the install command. Every state is a plain optimizer `state_dict` (tensors, numbers), checkpointed and loaded
    back by `fit`, so `--resume` continues bit for bit (tests/test_optimizers.py)."""
    name = o.optimizer
    params = list(params)  # all of them, frozen ones too (each library skips a parameter without a gradient), so
    # the state's parameter indices are those of checkpoints written before there was a choice
    if name == "adamw":
        return adamw(params, o.lr, o.betas, o.weight_decay)
    if name == "adafactor":
        # torch's own (Shazeer & Stern 2018, Algorithm 4 without the first moment, as the paper's large-scale runs):
        # no extra dependency, a foreach kernel, and one algorithm whatever else is installed. transformers' Adafactor
        # is another parameterisation (relative_step, scale_parameter, warmup_init), which one name cannot cover.
        if not hasattr(torch.optim, "Adafactor"):
            raise LdmkitError(f"optim.optimizer=adafactor needs torch >= 2.5 (torch.optim.Adafactor); this is torch "
                              f"{torch.__version__}: upgrade torch or choose another optim.optimizer")
        return torch.optim.Adafactor(params, lr=o.lr, weight_decay=o.weight_decay)
    if name == "prodigy":
        # Mishchenko & Defazio 2024: D-Adaptation's estimate of the distance to the solution sets the step; lr
        # multiplies it (1.0, as the authors advise). Its running sums are param-group entries (d, d_numerator, ...):
        # plain floats in state_dict(), so they resume exactly. Under FSDP each rank sees a shard: the library sums
        # the estimate across ranks when told (fsdp_in_use). Bias correction, and the safeguard that keeps `fit`'s
        # linear warm-up out of the estimate's denominator: what its authors advise for diffusion models (README).
        import contextlib
        import io
        import warnings

        if o.lr < 0.1:  # kept as given (a user may mean it), but said: an AdamW-sized lr leaves it ~1000x too slow
            warnings.warn(f"optim.optimizer=prodigy multiplies its own step-size estimate by optim.lr={o.lr:g}; its "
                          "authors use lr=1.0 (--set optim.lr=1)", stacklevel=2)
        Prodigy = _import("prodigyopt", "Prodigy", "prodigy")
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay" on every build
            return Prodigy(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, use_bias_correction=True,
                           safeguard_warmup=o.warmup_steps > 0, fsdp_in_use=sharded)
    if name == "lion":
        # Chen et al. 2023 ("Symbolic Discovery of Optimization Algorithms"): lucidrains' lion-pytorch, the
        # implementation kohya's sd-scripts use; weight decay p ← p·(1 − lr·λ) as torch's AdamW
        Lion = _import("lion_pytorch", "Lion", "lion")
        return Lion(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    if name == "adamw8bit":
        if sharded:
            raise LdmkitError("optim.optimizer=adamw8bit does not run with optim.distributed=fsdp (its block-quantised "
                              "moments do not follow the weights' shards); use ddp or another optimizer")
        return _adamw8bit(params, o, device)
    raise LdmkitError(f"unknown optim.optimizer {name!r}")  # the config's Literal refuses it first


def _import(module: str, attr: str, extra: str):
    import importlib

    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise LdmkitError(f"optim.optimizer={extra} needs the {module} package: pip install 'ldmkit[{extra}]'") from e


def _adamw8bit(params: list, o, device: torch.device) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): both moments
    stored as 8-bit block-quantised codes (tensors of 4096+ elements; smaller ones keep 32-bit moments). bitsandbytes
    runs it on CUDA, and on the CPU from the releases that ship a CPU kernel (0.50 does): one 8-bit update of a
    throw-away tensor on `device` finds out before training starts."""
    import logging

    # bitsandbytes' CPU backend tries, at import, to fetch an optional 4-bit matmul kernel from a hub and logs a
    # warning when it cannot (no network, untrusted repo); ldmkit uses only the optimizer, so the line is noise
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        AdamW8bit = _import("bitsandbytes.optim", "AdamW8bit", "adamw8bit")
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
    try:
        probe = torch.zeros(4096, device=device, requires_grad=True)
        probe.grad = torch.ones_like(probe)
        AdamW8bit([probe], lr=1e-3).step()
    except Exception as e:  # noqa: BLE001 - the library raises several types for an unsupported device
        raise LdmkitError(f"optim.optimizer=adamw8bit: this bitsandbytes cannot run on {device} ({type(e).__name__}); "
                          f"it needs a CUDA device (or a bitsandbytes with a CPU kernel: pip install -U "
                          f"'ldmkit[adamw8bit]'), or choose another optim.optimizer") from e
    return AdamW8bit(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


# --- learning rate -------------------------------------------------------------------------------


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up, then constant or cosine decay to 0 at `total` (Loshchilov & Hutter, 2017)."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


# --- RNG state -----------------------------------------------------------------------------------


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed the global torch RNG (CPU and every CUDA device) for training step `step` on rank `rank`.

    The step's own draws (noise, timesteps, condition dropout) come from `rng.step_generator`; what is left on
    the global RNG are the draws inside modules: the U-Net's dropout and peft's `lora_dropout` masks. Seeding it
    per step makes those a function of (seed, step, rank), so a run resumed at any step draws the masks the
    uninterrupted run drew (re-seeding once at the start, as `_fit` does for the weights' initialisation, would
    restart the stream). The masks depend on the rank's rows (dropout acts on the local batch), so exactness holds
    for the same number of processes and micro-batches, not across them. The seed is a hash, not seed·k + step,
    so its stream is not the step generator's (a mask would otherwise repeat the step's noise draws)."""
    import hashlib

    digest = hashlib.blake2b(f"ldmkit global rng {seed} {step} {rank}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(digest, "little") >> 1)


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --- the skeleton --------------------------------------------------------------------------------


class Task(ABC):
    """One kind of training, as `fit` sees it. The constructor builds the models and data (after
    `fit` has seeded the global RNG, so the construction order is the task's own) and sets `module`
    (the bare trained module: the optimizer's parameters, the EMA, the checkpoint's weights), `kind`
    and `model_config` (the checkpoint's kind and config). `fit` then sets `trained` (`module` as the
    stepper runs it, wrapped for DDP/FSDP), `ema` and `log`.

    The defaults suit the second stage (diffusion, control): sample grids every val_every steps and
    at the end; the autoencoder overrides them with its discriminator step and validation."""

    name = "train"  # the progress bar's label
    fsdp_refusal: str | None = None  # why optim.distributed=fsdp is refused, for tasks that refuse it
    saves_rng = False  # record the RNG state in the training state (the autoencoder's checkpoints do)
    ema_warmup = True  # the EMA's decay warms up (ema.EMA); False: optim.ema_decay from the first step
    plot_keys: tuple[str, ...] = ("loss",)  # log keys drawn in OUT/loss.png
    module: nn.Module
    kind: str
    model_config: BaseModel

    def __init__(self, cfg, out: Path, dist, device: torch.device, progress: bool):
        self.cfg, self.optim, self.out, self.dist, self.device = cfg, cfg.optim, out, dist, device
        self.main, self.progress = dist.main, progress and dist.main
        self.trained: nn.Module | None = None
        self.ema: EMA | None = None
        self.log: TrainLog | None = None

    @abstractmethod
    def piece_loss_at(self, step: int) -> Callable[[int, int], torch.Tensor]:
        """`piece_loss(lo, hi)` for step `step`: the mean loss of rows [lo, hi) of its global batch."""

    def load_weights(self, folder: Path) -> None:
        """On resume: the trained weights from checkpoint `folder`."""
        load_weights(self.module, folder / WEIGHTS)

    def load_ema(self, ema_module: nn.Module, path: Path) -> None:
        """On resume: the EMA weights (EMA_WEIGHTS of the checkpoint) into `ema_module`."""
        load_weights(ema_module, path)

    def forward_module(self) -> nn.Module:
        """What the stepper runs (and DDP/FSDP wraps); called once, after the memory format is applied."""
        return self.module

    def attach(self, state: dict) -> None:
        """After the optimizer and stepper exist: set up anything else trained (`state`: the resumed
        training state, {} on a fresh run)."""

    def reduce_gradients(self) -> None:
        """After the step's last backward, before clipping: average across ranks the gradients of anything trained
        outside the module `forward_module` gives DDP (a CPU text encoder beside a GPU U-Net)."""

    def after_update(self, step: int) -> None:
        """After step `step`'s optimizer update, before the EMA update."""

    def log_values(self) -> dict[str, float]:
        """Values added to a log line, besides loss and lr (every rank calls this at a log step)."""
        return {}

    def periodic(self, done: int) -> None:
        """After step `done`: a sample grid every val_every steps (the final one comes from `finish`)."""
        if done % self.cfg.logging.val_every == 0 and done != self.optim.steps:
            self.sample_grid(done)

    def sample_grid(self, step: int) -> None:
        """Write OUT/samples/samples_{step}.png (every rank calls this)."""

    def postfix(self) -> dict[str, str]:
        """Progress bar values besides the loss."""
        return {}

    def weights(self) -> nn.Module | dict[str, torch.Tensor]:
        """The checkpoint's weights; collective where the module is sharded."""
        return self.module

    def ema_weights(self) -> nn.Module | dict[str, torch.Tensor]:
        """The checkpoint's EMA weights; collective where the average is sharded."""
        return self.ema.module

    def extra_state(self) -> dict[str, Any]:
        """More training state to checkpoint (and read back in `attach`)."""
        return {}

    def checkpoint_meta(self, step: int, meta: dict | None) -> dict:
        return meta or {"step": step}

    def checkpoint_files(self, folder: Path) -> tuple[BaseModel, Callable[[Path], None] | None]:
        """The model config the checkpoint at `folder` records, and a function writing more files into it before
        it is renamed into place (`save_checkpoint`'s `files`), or None. A task whose text encoder trains saves
        the encoder there, and the config names it at `folder`."""
        return self.model_config, None

    @abstractmethod
    def finish(self, step: int, t0: float) -> dict:
        """After the last step (`step`; training started at time `t0`): the final checkpoint's meta."""


def fit(task_cls: type[Task], cfg, out: Path, resume: bool, progress: bool, time_limit: float | None,
        dist, device: torch.device) -> Path:
    """Train `task_cls(cfg, ...)` from scratch or from OUT's latest checkpoint to cfg.optim.steps (or
    until `time_limit` seconds have passed); returns the final checkpoint folder. Every process of a
    torchrun job calls this."""
    with run_lock(out, held=dist.main):  # one run per --out; rank 0 writes it
        return _fit(task_cls, cfg, out, resume, progress, time_limit, dist, device)


def _fit(task_cls: type[Task], cfg, out: Path, resume: bool, progress: bool, time_limit: float | None,
         dist, device: torch.device) -> Path:
    o = cfg.optim
    if dist.main:
        start_run(out, resume)
    dist.barrier()
    if task_cls.fsdp_refusal and o.distributed == "fsdp" and dist.enabled:
        raise LdmkitError(task_cls.fsdp_refusal)
    torch.manual_seed(o.seed)
    task = task_cls(cfg, out, dist, device, progress)
    if dist.main:  # once the task is built: a fine-tune replaces the config's model sections with its model's
        save_config(cfg, out / "train_config.yaml")
    start, state = _restore(task, resume)
    opt, stepper = _prepare(task, state, resume)
    checkpoint = _checkpointer(task, opt, stepper)
    t0 = time.time()
    bar = tqdm(total=o.steps, initial=start, desc=task.name, disable=not task.progress, dynamic_ncols=True)
    step = _run_steps(task, start, opt, stepper, bar, checkpoint, t0, time_limit)
    bar.close()
    meta = task.finish(step, t0)
    task.log.plot(list(task.plot_keys), out / "loss.png")
    task.log.close()
    return checkpoint(step, meta)


def _restore(task: Task, resume: bool) -> tuple[int, dict]:
    """The log, and on resume the weights, the step and the EMA; returns (start step, training state)."""
    task.log = TrainLog(task.out, enabled=task.main, tensorboard=task.cfg.logging.tensorboard)
    start, state, folder = 0, {}, None
    if resume:
        folder = resolve(task.out)
        state = load_training_state(folder)
        task.load_weights(folder)
        start = int(state["step"])
        task.log.truncate_after(start)
        positions = state.get("data")
        if positions and getattr(task, "source", None) is not None:
            if len(positions) != task.dist.world:
                raise LdmkitError(f"{folder} was trained by {len(positions)} processes reading a stream; resume it with "
                                  f"as many (torchrun --nproc_per_node {len(positions)})")
            task.source.load_state_dict(positions[task.dist.rank])
    # from the (resumed) live weights, before sharding
    task.ema = EMA(task.module, task.optim.ema_decay, task.ema_warmup) if task.optim.ema_decay else None
    if folder is not None and task.ema is not None and (folder / EMA_WEIGHTS).is_file():
        task.load_ema(task.ema.module, folder / EMA_WEIGHTS)
        task.ema.load_state_dict(state.get("ema", {"num_updates": start}))
    return start, state


def _prepare(task: Task, state: dict, resume: bool) -> tuple[torch.optim.Optimizer, Stepper]:
    """Memory format, DDP/FSDP wrapping, then the optimizer over the (possibly sharded) parameters."""
    from ldmkit.train.distributed import is_sharded, load_optimizer_state, wrap

    o = task.optim
    apply_memory_format(task.module, o)
    task.trained = wrap(task.forward_module(), task.dist, task.device, o.distributed)
    if task.ema is not None and is_sharded(task.module):  # the average sharded like the weights: 1/world per rank
        wrap(task.ema.module, task.dist, task.device, o.distributed)
    opt = build_optimizer(task.module.parameters(), o, task.device, is_sharded(task.module))
    stepper = Stepper(task.trained, opt, task.module.parameters(), o.grad_clip, o.batch_size, o.grad_accum, task.dist,
                      task.device, task.out, o.precision, reduce=task.reduce_gradients)
    if resume:
        load_optimizer_state(task.module, opt, state["optimizer"])
        stepper.load_state_dict(state.get("stepper", {}))
    task.attach(state)
    return opt, stepper


def _checkpointer(task: Task, opt: torch.optim.Optimizer, stepper: Stepper) -> Callable[..., Path]:
    """`checkpoint(step, meta=None)`: weights, EMA and training state under OUT/checkpoints/. Every rank
    calls it; gathering sharded weights/optimizer state is collective, then rank 0 alone writes."""
    from ldmkit.train.distributed import full_optimizer_state, is_sharded

    def checkpoint(step: int, meta: dict | None = None) -> Path:
        folder = task.out / "checkpoints" / f"step_{step:08d}"
        positions = _data_positions(task)  # collective: every rank's place in a streamed source
        if not (task.main or is_sharded(task.module)):
            task.dist.barrier()
            return folder
        weights = task.weights()
        ema_weights = task.ema_weights() if task.ema is not None else None
        state: dict[str, Any] = {"step": step, "optimizer": full_optimizer_state(task.module, opt)}
        if task.saves_rng:
            state["rng"] = rng_state()
        state["stepper"] = stepper.state_dict()
        state.update(task.extra_state())
        if positions:
            state["data"] = positions
        if task.ema is not None:
            state["ema"] = task.ema.state_dict()
        if task.main:
            config, files = task.checkpoint_files(folder)
            folder = save_checkpoint(task.out, step, task.kind, weights, config,
                                     meta=task.checkpoint_meta(step, meta), ema=ema_weights, training_state=state,
                                     keep=task.cfg.logging.keep_checkpoints, files=files)
        task.dist.barrier()
        return folder

    return checkpoint


def _data_positions(task: Task) -> list[dict] | None:
    """Each rank's `source.state_dict()` (a stream's reader places), gathered; None when no source has one."""
    source = getattr(task, "source", None)
    local = source.state_dict() if source is not None else {}
    if task.dist.enabled:
        import torch.distributed as dist

        gathered: list[dict] = [{} for _ in range(task.dist.world)]
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    return gathered if any(gathered) else None


def _run_steps(task: Task, start: int, opt: torch.optim.Optimizer, stepper: Stepper, bar, checkpoint,
               t0: float, time_limit: float | None) -> int:
    """Steps from `start`: LR, one `stepper` step over `task.piece_loss_at(step)`, the task's hook, EMA,
    log line, the task's periodic work, checkpoint; stopping on a signal (checkpoint + TrainingInterrupted)
    or after `time_limit` seconds since `t0`, agreed by all ranks. Returns the step reached."""
    o, logging = task.optim, task.cfg.logging
    since_step, since_time = start, time.time()  # throughput over each logging interval
    with GracefulInterrupt() as stop:
        for step in range(start, o.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, o.lr, o.warmup_steps, o.steps, o.schedule)
            out_of_time = time_limit is not None and time.time() - t0 > time_limit
            seed_step(o.seed, step, task.dist.rank)  # dropout masks: a function of the step, so resume is exact
            loss, (interrupted, out_of_time) = stepper(step, task.piece_loss_at(step), (stop.requested, out_of_time))
            task.after_update(step)
            if task.ema is not None:
                task.ema.update(task.module)
            done = step + 1
            if done % logging.log_every == 0 or done == o.steps:
                now = time.time()
                rate = {"images_per_s": round((done - since_step) * o.batch_size / max(now - since_time, 1e-9), 2)}
                if stepper.grad_norm is not None:  # FSDP's is a DTensor: its full value
                    norm = stepper.grad_norm
                    rate["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                task.log.write(done, loss=loss.item(), lr=opt.param_groups[0]["lr"], **rate, **task.log_values())
                since_step, since_time = done, now
            task.periodic(done)
            if done % logging.ckpt_every == 0 and done != o.steps:  # the final one is written by `fit`
                checkpoint(done)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", **task.postfix())
            stop_if_requested(interrupted, bar, done, checkpoint)
            if out_of_time:
                return done
    return o.steps
