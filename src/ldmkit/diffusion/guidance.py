"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around model functions.

    ŷ = ŷ_uncond + w (ŷ_cond - ŷ_uncond)

on the raw network output (eps or v: both are affine in the score at fixed z_t, so this is the
usual guided score). w = 1 is the conditional model, w = 0 the unconditional one. The result is
again a model_fn(z_t, t), to be wrapped in a `Denoiser`; samplers never see conditions.

Guidance rescale (Lin et al. 2024, "rescale classifier-free guidance") pulls the per-sample std of the guided output
back to that of the conditional output, which removes over-exposure at large w:
    ŷ_rescaled = ŷ · std(ŷ_cond)/std(ŷ),   ŷ_final = φ ŷ_rescaled + (1 - φ) ŷ.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ldmkit.diffusion.parameterization import ModelFn


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2024 guidance rescale; std over every dimension but the batch."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * guided


def _combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float, rescale: float) -> torch.Tensor:
    guided = uncond + scale * (cond - uncond)
    return rescale_guidance(guided, cond, rescale) if rescale > 0 else guided


def classifier_free_guidance(
    model_fn_cond: ModelFn, model_fn_uncond: ModelFn, scale: float, *, rescale: float = 0.0
) -> ModelFn:
    """model_fn computing uncond + scale·(cond - uncond). scale == 1 returns model_fn_cond itself
    (no unconditional call). rescale: φ of guidance rescale, 0 (off) … 1."""
    if scale == 1.0:
        return model_fn_cond

    def guided(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _combine(model_fn_uncond(z_t, t), model_fn_cond(z_t, t), scale, rescale)

    return guided


class _CannotBatch(Exception):
    pass


def _cat(uncond: Any, cond: Any) -> Any:
    """[uncond; cond] along the batch for tensors, dicts, lists/tuples and dataclasses of them;
    equal non-tensor leaves (None, numbers, strings) pass through. Anything else: _CannotBatch."""
    if isinstance(uncond, torch.Tensor) and isinstance(cond, torch.Tensor):
        if uncond.shape != cond.shape or uncond.ndim == 0:
            raise _CannotBatch  # e.g. text contexts of different lengths
        return torch.cat([uncond, cond])
    if isinstance(uncond, dict) and isinstance(cond, dict) and uncond.keys() == cond.keys():
        return {k: _cat(uncond[k], cond[k]) for k in uncond}
    if isinstance(uncond, (list, tuple)) and type(uncond) is type(cond) and len(uncond) == len(cond):
        return type(uncond)(_cat(u, c) for u, c in zip(uncond, cond))
    if dataclasses.is_dataclass(uncond) and type(uncond) is type(cond) and not isinstance(uncond, type):
        fields = [f.name for f in dataclasses.fields(uncond) if f.init]
        return dataclasses.replace(uncond, **{f: _cat(getattr(uncond, f), getattr(cond, f)) for f in fields})
    if isinstance(uncond, torch.Tensor) or isinstance(cond, torch.Tensor):
        raise _CannotBatch
    try:
        same = bool(uncond == cond)
    except Exception:  # e.g. arrays: no single truth value
        same = False
    if not same:
        raise _CannotBatch
    return uncond


def batched_classifier_free_guidance(
    model_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    cond: Any,
    uncond: Any,
    scale: float | torch.Tensor,
    *,
    rescale: float = 0.0,
    cat: Callable[[Any, Any], Any] | None = None,
) -> ModelFn:
    """Guidance from one model_fn(z_t, t, cond): runs a single doubled batch [uncond; cond] when
    the two conditions can be stacked (tensors of equal shape, or dicts/dataclasses of them; `cat`,
    when given, stacks them instead, e.g. `cat_conds`, which pads token sequences), two calls
    otherwise. scale == 1 calls the conditional branch only. `scale` may be a tensor that broadcasts
    against the output, e.g. (B, 1, 1, 1): one scale per sample (a w-embedded student's teacher)."""
    if not isinstance(scale, torch.Tensor) and scale == 1.0:
        return lambda z_t, t: model_fn(z_t, t, cond)
    try:
        both = (cat or _cat)(uncond, cond)
    except _CannotBatch:
        both = None

    def guided(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if both is None:
            return _combine(model_fn(z_t, t, uncond), model_fn(z_t, t, cond), scale, rescale)
        out = model_fn(torch.cat([z_t, z_t]), torch.cat([t, t]), both)  # (2B, …)
        out_uncond, out_cond = out.chunk(2)
        return _combine(out_uncond, out_cond, scale, rescale)

    return guided
