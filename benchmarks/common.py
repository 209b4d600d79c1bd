"""Shared pieces of the ldmkit-vs-diffusers benchmarks (imported by the scripts next to it).

- `measure_peak`: the machine's dense matmul peak, measured in the same run (square matmuls of a
  few sizes, best of N), per dtype — the denominator of every "fraction of peak" figure;
- `count_flops`: FLOPs of one call of a function, counted by `torch.utils.flop_counter`
  (matmuls, convolutions and attention; elementwise work such as GroupNorm or SiLU counts zero);
- `interleave`: time several functions in alternating order, so slow drift of a shared machine
  hits every side alike; report the median;
- `child_peak_rss`: run a measurement in a fresh subprocess and read back the growth of its peak
  resident memory (Linux VmHWM, reset with /proc/self/clear_refs), the honest CPU memory figure;
  freed memory is handed back to the OS first (`release_freed_memory`) and large allocations are
  mmapped one by one in that process, so the figure is the peak of live tensors;
- the benchmark U-Net configurations (`UNET_CONFIGS`) and `FixedTextEncoder`, a stand-in text
  encoder that gives every caption fixed random tokens so no model is loaded;
- the fine-tuning experiments' pieces: `shapes` drawings for a training folder (`shapes_image`,
  `write_folder`), a run trained once and kept (`train_once`), samples at unseen seeds (`draw`) and the
  extended judge per sample (`judged`).

    python benchmarks/common.py --help      # prints the matmul peak table
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------------
# Hardware peak


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_peak(
    dtype: torch.dtype,
    device: str = "cpu",
    sizes: Sequence[int] = (512, 1024, 2048),
    repeats: int = 5,
    min_seconds: float = 0.05,
) -> tuple[float, int]:
    """Best achieved FLOP/s of C = A @ B (n x n, `dtype`) over `sizes` and `repeats`; returns
    (FLOP/s, the n that reached it). Each timing loops until `min_seconds` so tiny sizes are not
    dominated by the timer."""
    best, best_n = 0.0, 0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm-up (thread pool, kernel selection)
        sync(device)
        for _ in range(repeats):
            k, t0 = 0, time.perf_counter()
            while True:
                a @ b
                k += 1
                sync(device)
                dt = time.perf_counter() - t0
                if dt >= min_seconds:
                    break
            flops = 2.0 * n**3 * k / dt
            if flops > best:
                best, best_n = flops, n
    return best, best_n


def peak_table(peaks: dict[str, tuple[float, int]]) -> str:
    rows = [[name, f"{v / 1e9:.1f}", str(n)] for name, (v, n) in peaks.items()]
    return markdown_table(["dtype", "matmul peak GFLOP/s", "best n"], rows)


# ---------------------------------------------------------------------------------------------
# FLOPs and timing


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (forward and, if `fn` runs it, backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def interleave(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of each function, `repeats` times each, in alternating order
    (A B, B A, A B, ...) after `warmup` untimed calls of each."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> float:
    """Relative half-range of the timings: a quick noise indicator."""
    m = statistics.median(xs)
    return (max(xs) - min(xs)) / (2 * m) if m > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Memory (CPU): peak resident set growth, measured in a fresh process per configuration


def _status_kb(key: str) -> int:
    s = Path("/proc/self/status").read_text()
    return int(re.search(key + r":\s+(\d+)", s).group(1))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Hand memory that Python and malloc hold but no longer use back to the OS (glibc `malloc_trim`),
    so a measurement that follows cannot reuse pages faulted in earlier (e.g. by a model deleted just
    before) and look smaller than it is. No-op where glibc is absent."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """`with RssPeak() as p: ...` then `p.mib`: how far the peak resident set rose above the RSS at
    entry (MiB). It includes everything the process touched: activations, gradients, optimizer state,
    allocator caches, and any memory freed by torch but kept by malloc. Entering first releases freed
    memory (`release_freed_memory`), so pages freed earlier cannot be reused uncounted."""

    def __enter__(self) -> "RssPeak":
        release_freed_memory()
        self.exact = reset_peak_rss()
        self.base = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_kb("VmHWM")
        self.mib = (peak - self.base) / 1024 if self.exact else float("nan")


def child_peak_rss(script: str, args: list[str], timeout: float = 1800) -> float:
    """Run `python script args...` (which must print one JSON line {"peak_mib": ...} last) in a
    fresh process and return its figure; NaN if the child failed.

    The child runs with glibc's mmap threshold fixed at 64 KiB: every tensor of 64 KiB or more gets
    its own mapping, returned to the OS when freed, so the peak resident set tracks the peak of live
    tensors instead of whatever malloc happened to keep (repeat runs then agree within ~1 MiB rather
    than ~20). Only the memory child runs so; the timed runs use the default allocator."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        sys.stderr.write(f"memory child failed ({' '.join(args)}):\n{proc.stderr[-2000:]}\n")
        return float("nan")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])


# ---------------------------------------------------------------------------------------------
# Models under test


def unet_config(name: str, **overrides):
    """The U-Net configurations the benchmarks compare (random weights, no zero-init so the network
    computes something non-trivial and both sides' outputs can be compared):

    - demo: the U-Net of `ldmkit demo` (`ldm_shapes_text`): widths 32/64, scale-shift time
      modulation, attention at both levels, MiniLM context (384), 8x8 latents at 32 px;
    - mid: SD-v1-like at 1/5 width: widths 64/128/256/256, two ResBlocks per level, transformers at
      levels 0-2 and the middle, 4 heads, context 768 (CLIP-L width), linear-free SD1 projections;
    - sd1: Stable Diffusion v1 (860M parameters; GPU only in practice);
    - tiny: ldmkit's tiny preset with context 32 (smoke tests).
    """
    from ldmkit.train.config import ldm_shapes_text
    from ldmkit.unet import UNetConfig, unet_sd1, unet_tiny

    if name == "demo":
        base = ldm_shapes_text().unet.model_dump()
        base.update(in_channels=4, out_channels=4, context_dim=384, zero_init=False)
        return UNetConfig(**(base | overrides))
    if name == "mid":
        return unet_sd1(model_channels=64, num_heads=4, zero_init=False, **overrides)
    if name == "sd1":
        return unet_sd1(zero_init=False, **overrides)
    if name == "tiny":
        return unet_tiny(context_dim=32, norm_groups=8, zero_init=False, **overrides)
    raise SystemExit(f"unknown U-Net config {name!r}; choose one of demo, mid, sd1, tiny")


UNET_CONFIGS = ("demo", "mid", "sd1", "tiny")

# Text tokens per caption for each config: MiniLM captions of the demo are ~12 tokens; SD's CLIP
# always gives 77.
CONTEXT_TOKENS = {"demo": 16, "mid": 77, "sd1": 77, "tiny": 8}


def build_unets(name: str, device: str = "cpu", seed: int = 0):
    """(ldmkit UNet, diffusers UNet2DConditionModel) with the same weights, both in train mode."""
    from ldmkit.interop.diffusers import to_diffusers
    from ldmkit.unet import UNet

    torch.manual_seed(seed)
    with torch.device(device):  # initialise where it will run: SD-v1 on a GPU takes seconds, not a minute
        ours = UNet(unet_config(name))
    theirs = to_diffusers(ours).to(device)  # built on the meta device, then given copies of our weights
    return ours.train(), theirs.train()


def parse_cases(specs: Sequence[str]) -> list[tuple[str, int, int]]:
    """'config:batch:latent_res' strings → tuples."""
    out = []
    for s in specs:
        try:
            name, b, r = s.split(":")
            out.append((name, int(b), int(r)))
        except ValueError:
            raise SystemExit(f"bad case {s!r}: write CONFIG:BATCH:LATENT_RES, e.g. demo:32:8") from None
    return out


class FixedTextEncoder:
    """Stand-in for a frozen text encoder: every caption gets `tokens` fixed random vectors of
    width `dim` (seeded from the caption), mask all True, like CLIP's 77 padded tokens that SD
    attends to in full. Built lazily as a `CachedTextEncoder` subclass so importing this module does
    not import ldmkit."""

    def __new__(cls, dim: int, tokens: int):
        from ldmkit.conditioning.text import CachedTextEncoder

        class _Fixed(CachedTextEncoder):
            def __init__(self):
                super().__init__()
                self.dim = dim

            def _encode(self, texts):
                out = torch.stack(
                    [torch.randn(tokens, dim, generator=torch.Generator().manual_seed(hash_text(t))) for t in texts]
                )
                return out, torch.ones(len(texts), tokens, dtype=torch.bool)

        return _Fixed()


def hash_text(t: str) -> int:
    h = 0
    for ch in t.encode():
        h = (h * 131 + ch) % (2**31)
    return h


# ---------------------------------------------------------------------------------------------
# Fine-tuning experiments on `shapes` (dreambooth_shapes.py, inversion_shapes.py, masked_loss.py)

JUDGE_SEED = 7000  # sampling seeds JUDGE_SEED + 97·s: no training run, class image or demo sample draws them


def shapes_image(shape: str, colour: str, position: str, seed: int, size: int = 32):
    """One jittered `shapes` drawing (uint8 (size, size, 3), bool mask (size, size)) from its own seed, outside the
    bundled dataset's streams; `shape` may be the extended vocabulary's diamond, `colour` white."""
    import numpy as np

    from ldmkit.data.shapes import render_shape

    image, mask, _ = render_shape(shape, colour, position, size, np.random.default_rng([seed, 4242]))
    return image, mask


def write_folder(folder: Path, items: Sequence[tuple], held_out: tuple | None = None, root: Path | None = None) -> None:
    """Write (uint8 image, caption[, uint8 mask]) items as NAME.png + NAME.txt (+ NAME_mask.png): a kohya-style
    folder (`data.caption_extension` .txt; `data.mask=files` reads the masks). An image folder holds out the files
    whose name hashes below 5 % for validation, and at least one: the names are chosen so that every item trains
    and `held_out` (another item of the same kind; default: the first) is the one validation image. `root`: the
    data folder `folder` lies in (a kohya repeat folder's parent; default: `folder` itself)."""
    from PIL import Image

    from ldmkit.data.folder import _hash_fraction  # the folder's train/val rule

    folder.mkdir(parents=True, exist_ok=True)
    rel = folder.relative_to(root).as_posix() + "/" if root is not None and root != folder else ""

    def names(val: bool):
        k = 0
        while True:
            name = f"{k:04d}" if not val else f"val{k:04d}"
            if (_hash_fraction(f"{rel}{name}.png") < 0.05) == val:
                yield name
            k += 1

    train, val = names(False), names(True)
    for name, item in [*((next(train), it) for it in items), (next(val), held_out or items[0])]:
        Image.fromarray(item[0]).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(item[1])
        if len(item) > 2 and item[2] is not None:
            Image.fromarray(item[2]).save(folder / f"{name}_mask.png")


def train_once(out: Path, base: str, config: str, sets: Sequence[str], threads: int | None = None) -> float:
    """`ldmkit train --init-from BASE --config CONFIG --set ...` into OUT, in this process; its wall seconds. A
    finished run already in OUT is kept (its recorded seconds), so a script reruns only its judging; a killed one
    is resumed (its seconds are then the resumed part's)."""
    from ldmkit.checkpoint import read_config
    from ldmkit.cli import main as ldmkit_main

    started = (out / "latest").is_file()
    if started and "train_seconds" in read_config(str(out))[3]:  # finished
        wall = out / "wall_seconds.txt"
        return float(wall.read_text()) if wall.is_file() else float(read_config(str(out))[3]["train_seconds"])
    args = [*(["--threads", str(threads)] if threads else []), "train", "--init-from", base, "--config", config,
            "--out", str(out), "--quiet", *(["--resume"] if started else [])]  # a killed run goes on
    for s in sets:
        args += ["--set", s]
    t0 = time.time()
    if ldmkit_main(args) != 0:
        raise SystemExit(f"training failed: ldmkit {' '.join(args)}")
    seconds = time.time() - t0
    (out / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    return seconds


def draw(ldm, captions: Sequence[str], seeds: int, steps: int = 25, guidance: float = 2.0,
         batch: int = 72) -> tuple[torch.Tensor, list[str]]:
    """Every caption at `seeds` unseen sampling seeds (dpmpp_2m): images (N, 3, H, W) in [-1, 1] and their captions,
    seed by seed."""
    from ldmkit.generation import GenerationRequest, generate

    images, caps = [], []
    for s in range(seeds):
        for i in range(0, len(captions), batch):
            part = list(captions[i : i + batch])
            request = GenerationRequest(prompt=part, num_images=len(part), batch_size=len(part), steps=steps,
                                        sampler="dpmpp_2m", guidance=guidance, seed=JUDGE_SEED + 97 * s + i)
            images.append(generate(ldm, request).images)
            caps += part
    return torch.cat(images), caps


def judged(images: torch.Tensor, want: Sequence[tuple[str, str, str]]) -> dict[str, float]:
    """Each sample read by the extended judge against (colour, shape, position): the share with each attribute,
    all three, and `strict` (all three and the shape drawn right: `shape_fidelity(...).passed`)."""
    from ldmkit.evaluate.attributes import check_attributes, shape_fidelity

    hits = {"colour": 0, "position": 0, "shape": 0, "all": 0, "strict": 0}
    for image, (colour, shape, position) in zip(images, want, strict=True):
        found = check_attributes(image, "extended")
        ok = [found["colour"] == colour, found["position"] == position, found["shape"] == shape]
        for key, v in zip(("colour", "position", "shape"), ok):
            hits[key] += v
        hits["all"] += all(ok)
        fidelity = shape_fidelity(image, shape) if all(ok) else None
        hits["strict"] += bool(fidelity is not None and fidelity.passed)
    return {k: v / max(len(want), 1) for k, v in hits.items()} | {"n": len(want)}


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


# ---------------------------------------------------------------------------------------------
# Output


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(device: str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"device: CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description="Measure this machine's dense matmul peak (fp32 and bf16).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    peaks = {str(dt).removeprefix("torch."): measure_peak(dt, args.device, args.sizes, args.repeats)
             for dt in (torch.float32, torch.bfloat16)}  # fmt: skip
    print(machine_line(args.device))
    print(peak_table(peaks))


if __name__ == "__main__":
    main()
