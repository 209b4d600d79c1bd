"""Attention: multi-head (self or cross) attention, the transformer block of the LDM U-Net, and the
single-head spatial self-attention of the autoencoder's middle block.

All of them call `F.scaled_dot_product_attention`, which picks a fused kernel (flash / memory
efficient on GPU, a blocked kernel on CPU) instead of materialising the N×N matrix by hand.
Parameter names follow diffusers (`to_q`, `to_k`, `to_v`, `to_out.0`) so checkpoints map directly.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.layers.resnet import group_norm

# Up to this many query x key pairs, reduced-precision attention on CPU runs in float32 (below).
_CPU_UPCAST_MAX_PAIRS = 2**18


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √d) v (Vaswani et al., 2017, eq. 1) through `F.scaled_dot_product_attention`.
    q (B, heads, N, d), k and v (B, heads, M, d), mask broadcastable to (B, heads, N, M), True = attend.

    Training on CPU, bf16/fp16 inputs with a small score matrix (N·M ≤ 2^18, every U-Net attention on
    CPU-sized latents) are attended in float32 and cast back: PyTorch's CPU flash kernel is 1.5-3.5x slower
    for forward + backward in bf16 than in fp32 at head widths of 8-64 (docs/benchmarks.md, torch 2.13),
    and fp32 is also the more exact of the two. Inference (no autograd; no consistent gain measured), large
    score matrices and all GPU work keep the input dtype."""
    small = q.shape[-2] * k.shape[-2] <= _CPU_UPCAST_MAX_PAIRS
    reduced = q.dtype in (torch.bfloat16, torch.float16)
    if q.device.type == "cpu" and reduced and small and torch.is_grad_enabled():
        return _attention_fp32(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _attention_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA in float32 on reduced-precision q, k, v, keeping for the backward pass what the
    reduced-precision kernel keeps: q, k, v and the output in their own dtype (q, k, v are cast back
    exactly; the output is stored as rounded, as that kernel stores it), so memory does not grow."""
    qkv = [(t.float(), t) for t in (q, k, v)]  # (fp32 copy, original)
    boxes: list[list] = []  # [tensor to keep, cast to fp32 when the backward pass asks for it]

    def pack(t: torch.Tensor) -> list:
        low = next((lo for hi, lo in qkv if t is hi), None)
        boxes.append([t, False] if low is None else [low, True])
        return boxes[-1]

    def unpack(box: list) -> torch.Tensor:
        return box[0].float() if box[1] else box[0]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack), torch.autocast("cpu", enabled=False):
        h = F.scaled_dot_product_attention(*(hi for hi, _ in qkv), attn_mask=mask)  # autocast would cast back
    out = h.to(q.dtype)
    for box in boxes:
        if box[0] is h:
            box[:] = [out, True]
    qkv.clear()  # the hooks live as long as the saved tensors: they must not keep the fp32 copies alive
    boxes.clear()
    return out


class Attention(nn.Module):
    """Attention(Q = x W_q, K = c W_k, V = c W_v) with `heads` heads (Vaswani et al., 2017, eq. 1).

    Self-attention when `context` is None, cross-attention on `context` (B, M, context_dim)
    otherwise: this is how text tokens enter the U-Net (Rombach et al., 2022, eq. 3).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        head_dim: int = 64,
        qkv_bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    _kv_cache: _ContextKV | None = None  # see _context_kv; a cache, not state: never saved or copied

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, heads, N, d)
        k, v = self._project_kv(x) if context is None else self._context_kv(context)  # (B, heads, M, d) each
        if mask is not None and bool(mask.all()):
            mask = None  # nothing to hide: let SDPA take its unmasked (faster) kernel
        if mask is not None:  # (B, M) True = attend; padding tokens of a text encoder are False
            mask = mask[:, None, None, :].to(torch.bool)
        h = attention(q, k, v, mask)  # (B, heads, N, d)
        h = h.transpose(1, 2).reshape(b, n, -1)  # (B, N, heads*d)
        return self.to_out[1](self.to_out[0](h))  # (B, N, query_dim)

    def _project_kv(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, m, _ = c.shape
        k = self.to_k(c).view(b, m, self.heads, -1).transpose(1, 2)  # (B, heads, M, d)
        v = self.to_v(c).view(b, m, self.heads, -1).transpose(1, 2)  # (B, heads, M, d)
        return k, v

    def _context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the context tokens. Without autograd (sampling) they are kept and reused for as long
        as the same, unmodified context tensor comes back with unchanged weights, as at every step of a
        sampler: the text tokens are constant over the steps, and projecting them again is up to a quarter
        of an SD-like U-Net's FLOPs at small latents. Any change (a new or in-place modified context, an
        optimizer step or load_state_dict on to_k/to_v, autocast switched) recomputes them."""
        if torch.is_grad_enabled() or context.is_inference() or _compiling():
            self._kv_cache = None
            return self._project_kv(context)
        key = _ContextKV.key(context, self.to_k, self.to_v)
        cache = self._kv_cache
        if cache is not None and cache.ref() is context and cache.key == key:
            return cache.k, cache.v
        k, v = self._project_kv(context)
        self._kv_cache = _ContextKV(self, context, key, k, v)
        return k, v

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(), ...: cached K/V would be stale
        self._kv_cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self):  # deepcopy / pickle: the cache (weak reference included) does not travel
        state = dict(self.__dict__)
        state["_kv_cache"] = None
        return state


def clear_context_cache(module: nn.Module) -> None:
    """Drop the cross-attention K/V that every `Attention` in `module` keeps from its last context (see
    `Attention._context_kv`). They go anyway when the context tensor is freed; this frees them sooner,
    e.g. between the last denoising step and decoding, where they would add to the decoder's peak."""
    for m in module.modules():
        if isinstance(m, Attention):
            m._kv_cache = None


class _ContextKV:
    """Cached K, V of one context tensor (`Attention._context_kv`). `key` pins what they depend on: the
    context's version counter, each to_k/to_v parameter's storage and version counter, and autocast.
    `pinned` holds those storages, so a freed one cannot come back at the same address; a weak reference
    to the context drops the cache once the context is gone."""

    def __init__(self, owner: Attention, context: torch.Tensor, key: tuple, k: torch.Tensor, v: torch.Tensor):
        owner_ref = weakref.ref(owner)

        def drop(ref: weakref.ref) -> None:
            # Straight to the instance dict, not through nn.Module.__setattr__: at interpreter exit this callback
            # can run after torch's module globals are torn down, where __setattr__'s isinstance(value, Parameter)
            # raises (issue 28, defect 7). The class attribute `_kv_cache = None` shows through once it is gone.
            o = owner_ref()
            if o is not None and o.__dict__.get("_kv_cache") is not None and o.__dict__["_kv_cache"].ref is ref:
                del o.__dict__["_kv_cache"]

        self.ref = weakref.ref(context, drop)
        self.key, self.k, self.v = key, k, v
        self.pinned = [p.detach() for m in (owner.to_k, owner.to_v) for p in m.parameters()]

    @staticmethod
    def key(context: torch.Tensor, *linears: nn.Linear) -> tuple:
        params = tuple((p.data_ptr(), p._version) for m in linears for p in m.parameters())
        return (context._version, _autocast_state(context.device.type), params)


def _autocast_state(device_type: str) -> tuple:
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError):  # torch < 2.4: per-device functions
        return (torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype(),
                torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype())  # fmt: skip


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H·W positions with a residual connection.

    Used in the autoencoder's middle block (Esser et al., 2021; Rombach et al., 2022), where it
    gives the otherwise local convolutional encoder/decoder a global receptive field.
    """

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        self.group_norm = group_norm(channels, groups, eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(t)[:, None], self.to_k(t)[:, None], self.to_v(t)[:, None]  # (B, 1, HW, C)
        a = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        a = self.to_out[0](a).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W), a view with channels-last strides
        # a first: the sum keeps that channels-last layout, so the convolutions after this block (the rest of
        # the decoder) run in oneDNN's native NHWC layout, on CPU ~10% faster and with less transient memory
        # than NCHW (docs/benchmarks.md). diffusers' VAE gets the same layout from the same order.
        return a + x
