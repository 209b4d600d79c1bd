"""An OpenVINO backend for CPU sampling (`ldmkit sample --backend openvino`, `ldmkit.generation.openvino_model`).

The U-Net, the first stage's decoder and the CLIP text transformer are converted once with
`openvino.convert_model` (traced from example inputs, batch and spatial sizes left dynamic) and saved as
OpenVINO IR under the cache folder, named by part and by a key: a second load reads the IR (no conversion).
The key of a model read from files (`ldmkit sample --checkpoint`, `ldmkit serve`) is `source_key`: the path,
size and modification time of every file it was read from, so a cache hit is known before any weight is read
and the loader builds the replaced parts without their weights (`ldmkit.sample.load_skip`, `ldmkit.load(…, skip=…)`);
a rewritten or touched file gets a new key. A model built or changed in memory (a fine-tune, a LoRA merged
with `--lora`) is keyed by a digest of that part's weights (`weights_digest`). Each input shape is compiled
once per process (a static shape compiles to faster kernels than a dynamic one); OpenVINO's own `CACHE_DIR`
keeps the compiled blobs for the next process, one folder per part, precision and input shape under
compiled-{hint}/, the least recently used of them removed past `COMPILED_BUDGET` bytes (an SD 1.5 U-Net's blob is
1.7 GB a shape, and a server asked for many sizes would otherwise fill the disk). The IRs themselves go the same
way past `IR_BUDGET` (each fine-tune or merged LoRA of SD 1.5 adds 2.3 GB of IR, and an IR of a precision no
longer asked for is never read again), with their compiled blobs; an IR behind a part still alive stays.

The parts are wrapped as torch modules with the call signatures of the parts they replace, in a new
`LatentDiffusion` container (the model given is left as it is), so `generate` and its sampler loop run
unchanged in Python: `unet(x, t, cond)`, the autoencoder's `decoder(z)`, the text encoder's
`model(ids, output_hidden_states=…)`. The encoder of img2img stays in torch.

What a traced graph cannot take is refused in one line: ControlNet / adapter residuals, textual-inversion
vectors put in by a hook, LoRAs applied per request (`<lora:…>`); a LoRA merged before conversion
(`--lora FILE`) is part of the weights and works.

Precision: the `INFERENCE_PRECISION_HINT` of the U-Net and the decoder is bf16 where `precision` resolves to
bf16 (`device.resolve_precision`: `auto` on a CPU with AVX512-BF16 / AMX) and f32 otherwise; the text
transformer runs f32.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import warnings
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ldmkit.conditioning.cond import Cond
from ldmkit.device import resolve_precision
from ldmkit.errors import LdmkitError
from ldmkit.layers.sharing import with_children

CONVERSIONS: dict[str, int] = {}  # part name → conversions run in this process (tests assert the cache is used)
PARTS = ("unet", "decoder", "text")  # what a converted model replaces, as `ldmkit.load(skip=…)` names them
IR_FORMAT = 1  # part of `source_key`: raise it when the traced forms or the parts' code change, so no older IR is served
# compiled blobs kept per precision under a cache folder: on this project's 2-core CPU a cached compile of SD 1.5's
# U-Net took 1.7-2.4 s and an uncached one 2.0-2.2 s, so a blob evicted costs little when its shape comes back
COMPILED_BUDGET = 8 << 30
# IRs (.xml + .bin) kept under a cache folder: converting SD 1.5 again costs about a minute here, so this is larger
IR_BUDGET = 16 << 30
_LIVE_PARTS: weakref.WeakSet = weakref.WeakSet()  # the `_Part`s of this process: their IRs are never removed


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldmkit" / "openvino"


def _cache(cache_dir: str | Path | None) -> Path:
    """The cache folder `--backend-cache` names, else the default one."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def weights_digest(module: nn.Module) -> str:
    """A digest of a module's weights: every tensor's name, shape and dtype and the exact bytes of up to 16,384
    evenly strided elements of it. Hashing all 3.4 GB of an SD U-Net, or summing it, costs seconds at every
    process start (measured 6-10 s on one core, most of a warm `ldmkit sample --backend openvino`); the sample
    costs milliseconds. What it can miss is a change confined to elements off the stride: a fine-tune moves
    every weight and a merged LoRA every element of the matrices it touches (ΔW = BA is dense), so both get a
    new digest; a hand edit of a few single weights would not, and reuses the old IR (remove the cache
    folder, or pass another `--backend-cache`)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 16384)].cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())  # the bytes as stored (bf16 included)
    return h.hexdigest()


def source_key(files: list[Path] | None, ema: bool = True) -> str | None:
    """The IR cache key of a model read from `files` (`ldmkit.checkpoint.source_files`), as `ldmkit.load(…,
    ema=ema)` reads it: each file's resolved path, size and modification time in nanoseconds, with this
    backend's IR layout (`IR_FORMAT`) and the versions that shape a traced graph. Reading no weights, it tells
    a cache hit before the model is loaded; a file rewritten (or touched) in place changes its time and so the
    key. None where the files are not known: the caller keys by the weights."""
    if files is None:
        return None

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    stats = [(str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in files]
    doc = {"ir": IR_FORMAT, "torch": torch.__version__, "ema": ema, "openvino": version("openvino"),
           "transformers": version("transformers"), "files": stats}
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


def _hint(precision: str) -> str:
    """The `INFERENCE_PRECISION_HINT` of the U-Net and the decoder for `--precision`: bf16 where the CPU has it."""
    return "bf16" if resolve_precision(precision, "cpu") == "bf16" else "f32"


def _stored(name: str, hint: str) -> str:
    """A part's IR file stem: the U-Net and the decoder compiled for bf16 keep their weights as fp16 in the IR
    (`-w16`); the rest keep f32. Reading and repacking the weights is most of a cached compile (OpenVINO reads
    the IR's .bin and converts it to the kernels' layout on one core): SD 1.5's U-Net, cached compile at batch 1,
    64x64, under load: 7.1 / 6.8 s from f32 weights, 5.5 / 5.7 s from fp16 (1.7 GB instead of 3.4 GB), the
    outputs against OpenVINO f32 0.0068 mean / 0.036 max instead of 0.0061 / 0.031 (bf16 rounds them anyway).
    An f32 compile keeps f32 weights: fp16 would round them past its 1e-4 tolerance."""
    return f"{name}-w16" if hint == "bf16" and name != "text" else name


def _source_xml(cache: Path, name: str, key: str, hint: str) -> Path:
    return cache / f"{_stored(name, hint)}-src-{key[:24]}.xml"


def cached_parts(cache_dir: str | Path | None, key: str | None, precision: str = "auto") -> frozenset[str]:
    """The parts (of `PARTS`) whose IR for `key` (and `precision`, which decides how the IR stores its weights)
    is in the cache: what `ldmkit.load(…, skip=…)` need not read."""
    if key is None:
        return frozenset()
    cache, hint = _cache(cache_dir), _hint(precision)
    return frozenset(n for n in PARTS
                     if (x := _source_xml(cache, n, key, hint)).exists() and x.with_suffix(".bin").exists())


def _openvino():
    try:
        import openvino
    except ImportError:
        raise LdmkitError("--backend openvino needs OpenVINO: pip install 'ldmkit[openvino]'") from None
    return openvino


class _StackT(ctypes.Structure):  # stack_t of sigaltstack(2) on Linux
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)  # once: every compile and inference call goes through it


@contextlib.contextmanager
def _own_signal_stack():
    """Keep the calling thread's alternate signal stack across an OpenVINO call.

    OpenVINO 2026.4's CPU plugin installs its own alternate signal stack (about 20 KB) on the thread that
    compiles a model and frees it with the plugin; freed from another thread (a garbage collection that
    happens to run in a server thread), the compiling thread is left with a dangling stack, and the next
    signal delivered to it (a DataLoader worker's SIGCHLD, Ctrl-C) kills the process with SIGSEGV (si_code
    SI_KERNEL: the kernel cannot build the signal frame), before any Python handler or faulthandler can run.
    Restoring the thread's own stack after each call leaves OpenVINO's unused."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = _libc()
    old = _StackT()
    if libc.sigaltstack(None, ctypes.byref(old)) != 0:
        yield
        return
    try:
        yield
    finally:
        if not old.ss_flags & 1:  # SS_ONSTACK (called from a signal handler on that stack): leave it alone
            libc.sigaltstack(ctypes.byref(old), None)


def _compiled_dir(xml: Path, hint: str, shapes: tuple) -> Path:
    """The `CACHE_DIR` of one part's IR compiled with `hint` at input `shapes`: compiled-{hint}/{IR stem}-{digest}.
    One folder per precision: OpenVINO 2026.4 served an f32 blob to a bf16 compile of the same IR from a shared one."""
    tag = hashlib.sha256(repr(tuple(tuple(s) for s in shapes)).encode()).hexdigest()[:12]
    return xml.parent / f"compiled-{hint}" / f"{xml.stem}-{tag}"


def _keep_recent(entries: list[Path], keep: set[Path], budget: int, size, remove) -> None:
    """Least recently used eviction: `entries` newest first (modification time), those in `keep` ahead of all;
    walking them, once the sizes summed (`size(entry)`, bytes) pass `budget`, each entry not kept is `remove`d.
    An entry another process removed meanwhile (OSError on its size) is skipped."""
    entries = sorted(entries, key=lambda e: (e not in keep, -e.stat().st_mtime_ns))
    total = 0
    for entry in entries:
        try:
            total += size(entry)
        except OSError:
            continue
        if total > budget and entry not in keep:
            remove(entry)


def _prune_compiled(used: Path, budget: int) -> None:
    """Mark `used` (the folder a compile just read or wrote) as the most recent, then remove the least recently
    used folders beside it until the blobs left fit `budget` bytes; `used` always stays. A compiled model already
    loaded keeps running (its blob was read at compile). Another process's files vanishing under it are skipped."""
    with contextlib.suppress(OSError):
        os.utime(used)
        for old in used.parent.glob("*.blob"):  # the layout before one folder per shape: never read again
            old.unlink(missing_ok=True)
        _keep_recent([d for d in used.parent.iterdir() if d.is_dir()], {used}, budget,
                     lambda d: sum(f.stat().st_size for f in d.iterdir() if f.is_file()),
                     lambda d: shutil.rmtree(d, ignore_errors=True))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _prune_irs(used: Path, budget: int) -> None:
    """Mark the IR `used` (just converted or read) as the most recent, then remove the least recently used IRs
    beside it, each .xml before its .bin (an IR is served only with both) and with its compiled blobs, until the
    rest fit `budget` bytes. `used` and the IRs of parts alive in this process stay; a process that loaded one
    weightless and finds it gone says so (`_convert`). The half-written files of a conversion whose process
    died go too."""
    keep = {used} | {p.xml for p in list(_LIVE_PARTS)}
    for tmp in used.parent.glob(".*.*.*"):  # `.{stem}.{pid}.xml/.bin` a conversion writes before it renames them
        with contextlib.suppress(ValueError, OSError):
            if not _alive(int(tmp.name.rsplit(".", 2)[-2])):  # its process was killed mid-write: never renamed
                tmp.unlink(missing_ok=True)

    def remove(xml: Path) -> None:
        xml.unlink(missing_ok=True)
        xml.with_suffix(".bin").unlink(missing_ok=True)
        for blobs in used.parent.glob(f"compiled-*/{xml.stem}-*"):
            shutil.rmtree(blobs, ignore_errors=True)

    with contextlib.suppress(OSError):
        os.utime(used)
        _keep_recent([x for x in used.parent.glob("*.xml") if not x.name.startswith(".")],  # `.…`: in flight
                     keep, budget, lambda x: x.stat().st_size + x.with_suffix(".bin").stat().st_size, remove)


class _Part(nn.Module):
    """A converted part: the IR on disk, compiled per input shape. Holds one empty parameter so code that
    asks a part for its device and dtype (`next(net.parameters())`) reads CPU float32."""

    def __init__(self, name: str, xml: Path, hint: str, core):
        super().__init__()
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)
        self.name, self.xml, self.hint, self.core = name, xml, hint, core
        self._compiled: dict[tuple, object] = {}
        _LIVE_PARTS.add(self)

    def run(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        arrays = [i.detach().cpu().contiguous().numpy() for i in inputs]
        key = tuple(a.shape for a in arrays)
        compiled = self._compiled.get(key) or self._compile(arrays, self.hint)
        out = self._outputs(compiled, arrays)
        if self.hint == "bf16" and not all(bool(torch.isfinite(o).all()) for o in out):
            # OpenVINO 2026.4's bf16 kernels gave NaN for a few shapes of the tiny test U-Net (batch 2 at
            # 16x24 latents, not batch 1 nor 16x16): such a shape is compiled again in f32, once
            warnings.warn(f"OpenVINO {self.name} gave non-finite values in bf16 at shapes {key}; running them in f32")
            out = self._outputs(self._compile(arrays, "f32"), arrays)
        return out

    def _compile(self, arrays, hint: str):
        shapes = tuple(a.shape for a in arrays)
        model = self.core.read_model(str(self.xml))
        model.reshape({k: list(a.shape) for k, a in enumerate(arrays)})
        folder = _compiled_dir(self.xml, hint, shapes)
        with _own_signal_stack():
            compiled = self.core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "CACHE_DIR": str(folder)})
        _prune_compiled(folder, COMPILED_BUDGET)
        self._compiled[shapes] = compiled
        return compiled

    @staticmethod
    def _outputs(compiled, arrays) -> list[torch.Tensor]:
        with _own_signal_stack():
            out = compiled(arrays)
        return [torch.from_numpy(out[k].copy()) for k in range(len(compiled.outputs))]


# ---- the traced forms: positional tensors in, tensors out


class _TracedUNet(nn.Module):
    def __init__(self, unet: nn.Module, routes: list[str]):
        super().__init__()
        self.unet, self.routes = unet, routes

    def forward(self, x, t, *routes):
        return self.unet(x, t, Cond(**dict(zip(self.routes, routes))))


class _TracedDecoder(nn.Module):
    def __init__(self, post_quant_conv: nn.Module | None, decoder: nn.Module):
        super().__init__()
        self.post_quant_conv, self.decoder = post_quant_conv, decoder

    def forward(self, z):
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))


class _TracedCLIP(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids):
        out = self.model(ids, output_hidden_states=True)
        return out.last_hidden_state, out.hidden_states[-2]


# ---- the wrappers with the replaced parts' call signatures


class OVUNet(_Part):
    """`unet(x, t, cond)` of the converted U-Net; routes are those of the model (context, its mask for an
    encoder that masks, labels, vector, concat, the student's guidance)."""

    def __init__(self, name, xml, hint, core, routes: list[str], config):
        super().__init__(name, xml, hint, core)
        self.routes, self.config = routes, config

    def forward(self, x: torch.Tensor, t, cond: Cond | None = None, **routes) -> torch.Tensor:
        cond = Cond.of(cond, **routes)
        for route in ("control", "down_residuals", "mid_residual", "adapter_residuals"):
            if getattr(cond, route) is not None:
                raise LdmkitError("--backend openvino runs the U-Net alone: ControlNets and adapters need --backend torch")
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(b)  # (B,)
        args = [x.float(), t]
        for r in self.routes:
            v = getattr(cond, r)
            if v is None:
                raise LdmkitError(f"the converted U-Net takes the {r} route, which this call does not give")
            args.append(v.float() if v.is_floating_point() else v)
        return self.run(*args)[0].to(x.device)  # (B, out_channels, H, W)


class OVDecoder(_Part):
    """The autoencoder's post_quant_conv + decoder as one graph: `decoder(z)` → (B, 3, H, W)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.run(z.float())[0]


class OVCLIPText(_Part):
    """A CLIPTextModel's call as the text encoder makes it: `model(ids, output_hidden_states=…)` with
    `last_hidden_state` and `hidden_states[-2]` (the penultimate layer SD 2 and SDXL read)."""

    def __init__(self, name, xml, hint, core, torch_model: nn.Module):
        super().__init__(name, xml, hint, core)
        self.final_layer_norm = getattr(torch_model, "text_model", torch_model).final_layer_norm
        self.config = torch_model.config
        self._table = torch_model.get_input_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        table = copy.copy(self._table)

        def refuse(*_):
            raise LdmkitError("--backend openvino cannot put textual-inversion vectors into the converted text "
                              "encoder; use --backend torch for prompts with embeddings")

        table.register_forward_hook = refuse
        return table

    def forward(self, ids: torch.Tensor, output_hidden_states: bool = False, **_):
        last, penultimate = self.run(ids.long())
        return SimpleNamespace(last_hidden_state=last, hidden_states=(penultimate, last))


# ---- conversion


def _convert(name: str, module: nn.Module, example: tuple, dynamic: list[list[int]], cache: Path, hint: str,
             source: str | None = None) -> Path:
    """The IR of `module` under `cache` for a compile with `hint` (`_stored`: how it keeps its weights), named by
    `source` (`source_key`) where given, else by its weights' digest; converted only when absent."""
    ov = _openvino()
    stem = _stored(name, hint)
    xml = _source_xml(cache, name, source, hint) if source is not None else cache / f"{stem}-{weights_digest(module)[:20]}.xml"
    if xml.exists() and xml.with_suffix(".bin").exists():
        _prune_irs(xml, IR_BUDGET)
        return xml
    if any(p.is_meta for p in module.parameters()):
        raise LdmkitError(f"the model's {name} was loaded without its weights for the OpenVINO IR {xml}, which is no "
                          "longer in the cache (removed meanwhile?); run the command again")
    from ldmkit.layers.attention import clear_context_cache

    clear_context_cache(module)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the traced shape checks: sizes stay dynamic
        model = ov.convert_model(module, example_input=example,
                                 input=[(ov.PartialShape(d), ov.Type.i64 if e.dtype == torch.long else
                                         ov.Type.boolean if e.dtype == torch.bool else ov.Type.f32)
                                        for d, e in zip(dynamic, example)])
    clear_context_cache(module)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = xml.with_name(f".{xml.stem}.{os.getpid()}.xml")
    ov.save_model(model, str(tmp), compress_to_fp16=stem != name)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))  # weights first: an .xml is only there with its .bin
    tmp.replace(xml)
    CONVERSIONS[name] = CONVERSIONS.get(name, 0) + 1
    _prune_irs(xml, IR_BUDGET)
    return xml


def _unet_routes(model) -> list[str]:
    u, text = model.config.unet, model.conditioner.text_encoder
    routes = []
    if u.context_dim:
        routes.append("context")
        if text is not None and not text.fixed_window:  # CLIP attends to its whole window: no mask to pass
            routes.append("context_mask")
    if u.num_classes:
        routes.append("labels")
    if u.vector_dim:
        routes.append("vector")
    if u.concat_channels:
        routes.append("concat")
    if u.time_cond_proj_dim:
        routes.append("guidance")
    return routes


def openvino_model(model, cache_dir: str | Path | None = None, precision: str = "auto", source: str | None = None):
    """A LatentDiffusion container whose U-Net, decoder and (CLIP) text transformer run in OpenVINO on the
    CPU; `model` itself is unchanged. IR cached under `cache_dir` (default ~/.cache/ldmkit/openvino).
    `source`: the `source_key` of the files `model` was read from, unchanged since (no LoRA merged); the parts
    `cached_parts` named for it may then be weightless (`ldmkit.sample.load_skip`). None: keyed by the weights."""
    ov = _openvino()
    if next(model.unet.parameters()).device.type not in ("cpu", "meta"):  # meta: skipped at load, its IR cached
        raise LdmkitError("--backend openvino runs on the CPU; use --device cpu")
    cache = _cache(cache_dir)
    hint = _hint(precision)
    core = ov.Core()  # compiled blobs: each compile names its own CACHE_DIR (`_compiled_dir`)
    cfg = model.config
    c, f = cfg.autoencoder.latent_channels, cfg.autoencoder.downsample_factor
    h = w = cfg.image_size // f
    routes = _unet_routes(model)
    b = 2  # a batch of 2 in the trace: a size-1 dimension can be folded into the graph as a constant
    examples = {"context": torch.randn(b, 8, cfg.unet.context_dim or 1), "context_mask": torch.ones(b, 8, dtype=torch.bool),
                "labels": torch.zeros(b, dtype=torch.long), "vector": torch.randn(b, cfg.unet.vector_dim or 1),
                "concat": torch.randn(b, cfg.unet.concat_channels or 1, h, w), "guidance": torch.full((b,), 2.0)}
    if "context_mask" in routes:
        examples["context_mask"][0, -2:] = False  # trace the masked path (an all-True mask is skipped by the U-Net)
    dyn = {"context": [-1, -1, cfg.unet.context_dim or 1], "context_mask": [-1, -1], "labels": [-1],
           "vector": [-1, cfg.unet.vector_dim or 1], "concat": [-1, cfg.unet.concat_channels or 1, -1, -1], "guidance": [-1]}
    unet_in = (torch.randn(b, cfg.unet.in_channels, h, w), torch.full((b,), 500.0), *[examples[r] for r in routes])
    unet_dyn = [[-1, cfg.unet.in_channels, -1, -1], [-1], *[dyn[r] for r in routes]]
    xml = _convert("unet", _TracedUNet(model.unet, routes), unet_in, unet_dyn, cache, hint, source)
    unet = OVUNet("unet", xml, hint, core, routes, model.unet.config)

    ae = model.autoencoder
    xml = _convert("decoder", _TracedDecoder(ae.post_quant_conv, ae.decoder), (torch.randn(b, c, h, w),),
                   [[-1, c, -1, -1]], cache, hint, source)
    ae = with_children(ae, decoder=OVDecoder("decoder", xml, hint, core), post_quant_conv=None)  # the given keeps its own

    parts = {"unet": unet, "autoencoder": ae}
    text = model.conditioner.text_encoder
    clip = getattr(text, "model", None)
    # SDXL's pair and MiniLM stay in torch; a skeleton is a CLIPTextModel loaded without weights (its IR cached)
    if clip is not None and type(clip).__name__ in ("CLIPTextModel", "CLIPTextSkeleton"):
        ids = torch.full((b, text.window), text.pad_id, dtype=torch.long)
        xml = _convert("text", _TracedCLIP(clip), (ids,), [[-1, -1]], cache, "f32", source)
        # f32 always: one pass per prompt costs little, and OpenVINO 2026.4's bf16 CLIP gave NaN at batch 1
        # (its causal mask; batch 2 was fine), measured on this backend's tests
        text = with_children(text, model=OVCLIPText("text", xml, "f32", core, clip))
        text._cache = {}
        conditioner = copy.copy(model.conditioner)
        conditioner.__dict__["_text"] = text  # kept outside the module tree (Conditioner.__init__ says why)
        parts["conditioner"] = conditioner
    return with_children(model, **parts).eval()


BACKENDS = ("torch", "openvino")


def with_backend(model, backend: str, precision: str = "auto", cache_dir: str | Path | None = None,
                 source: str | None = None, **unsupported):
    """`model` for `--backend`: torch → itself; openvino → `openvino_model` (`source`: its `source_key`).
    `unsupported` maps a flag to its value (`{"--lora-dir": …}`); a set one is refused in one line for
    OpenVINO, whose graphs are fixed at conversion (a LoRA merged with `--lora` before this call is part of
    the weights and works)."""
    refuse_unsupported(backend, **unsupported)
    return model if backend == "torch" else openvino_model(model, cache_dir, precision, source)


def refuse_unsupported(backend: str, **unsupported) -> None:
    """The refusals of `with_backend`, callable before a model is loaded."""
    if backend not in BACKENDS:
        raise LdmkitError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    for flag, value in unsupported.items():
        if value and backend == "openvino":
            raise LdmkitError(f"--backend openvino cannot take {flag} (its graphs are fixed when converted); "
                              f"use --backend torch, or merge a LoRA into the weights with --lora FILE")
