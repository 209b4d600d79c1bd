"""Speed and memory switches of the U-Net that must not change what it computes: gradient
checkpointing (same loss and gradients, less kept activation memory, nothing in config or state dict),
the cross-attention K/V cache used while sampling (same outputs, recomputed on any change), and the
float32 attention path for bf16 on CPU."""

from __future__ import annotations

import copy
import gc
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import ldmkit.unet.model as unet_module
from ldmkit.layers import Attention
from ldmkit.layers.attention import clear_context_cache
from ldmkit.layers.attention import attention
from ldmkit.unet import UNet, UNetConfig

B, H, W = 2, 8, 8


def tiny(**kw) -> UNetConfig:
    base = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_heads=2,
                norm_groups=8, context_dim=12, zero_init=False)  # fmt: skip
    return UNetConfig(**(base | kw))


def batch(cfg: UNetConfig, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(B, cfg.in_channels, H, W, generator=g),
        "t": torch.tensor([10, 500]),
        "context": torch.randn(B, 5, cfg.context_dim, generator=g),
        "context_mask": torch.tensor([[True, True, True, False, False], [True] * 5]),
    }


def loss_and_grads(unet: UNet, kw: dict, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    unet.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks on both runs
    target = torch.randn(B, unet.config.out_channels, H, W, generator=torch.Generator().manual_seed(1))
    loss = F.mse_loss(unet(**kw), target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing


@pytest.mark.parametrize(
    "cfg",
    [tiny(), tiny(emb_mode="scale_shift", dropout=0.1, num_res_blocks=2, channel_mult=(1, 2, 2)),
     tiny(use_skip_connections=False), tiny(num_classes=3, concat_channels=2)],
    ids=["plain", "scale_shift_dropout_3_levels", "no_skips", "labels_concat"],
)  # fmt: skip
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(cfg):
    torch.manual_seed(0)
    unet = UNet(cfg).train()
    kw = batch(cfg)
    if cfg.num_classes:
        kw["class_labels"] = torch.tensor([0, cfg.num_classes])
    if cfg.concat_channels:
        kw["concat"] = torch.randn(B, cfg.concat_channels, H, W)
    loss, grads = loss_and_grads(unet, kw)
    loss_ckpt, grads_ckpt = loss_and_grads(unet.set_gradient_checkpointing(True), kw)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=1e-5)
    assert grads_ckpt.keys() == grads.keys() and len(grads) == len(list(unet.parameters()))
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_gradient_checkpointing_is_not_architecture():
    """A training switch: not in the config, not in the state dict, off by default."""
    cfg = tiny()
    torch.manual_seed(0)
    plain = UNet(cfg)
    torch.manual_seed(0)
    ckpt = UNet(cfg)
    assert plain.gradient_checkpointing is False
    assert ckpt.set_gradient_checkpointing(True) is ckpt and ckpt.gradient_checkpointing
    assert ckpt.config.model_dump() == plain.config.model_dump() == cfg.model_dump()
    assert "gradient_checkpointing" not in UNetConfig.model_fields
    sd, sd_ckpt = plain.state_dict(), ckpt.state_dict()
    assert list(sd) == list(sd_ckpt) and all(torch.equal(sd[k], sd_ckpt[k]) for k in sd)
    ckpt.set_gradient_checkpointing(False)
    assert not ckpt.gradient_checkpointing


def test_gradient_checkpointing_only_when_training_with_autograd(monkeypatch):
    calls = []
    real = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = tiny()
    unet = UNet(cfg).set_gradient_checkpointing(True)
    kw = batch(cfg)
    with torch.no_grad():
        unet.train()(**kw)
    unet.eval()(**kw)
    assert calls == []
    unet.train()(**kw)
    assert len(calls) == 2 * cfg.num_levels + 1  # every down block, the middle, every up block


def saved_bytes(unet: UNet, kw: dict) -> int:
    """Bytes of tensors autograd keeps for the backward pass of one forward (outside checkpointed blocks)."""
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(**kw).sum()
    return total


def test_gradient_checkpointing_keeps_far_fewer_activations():
    cfg = tiny(num_res_blocks=2, model_channels=32)
    unet = UNet(cfg).train()
    kw = batch(cfg)
    plain = saved_bytes(unet, kw)
    ckpt = saved_bytes(unet.set_gradient_checkpointing(True), kw)
    assert ckpt < 0.25 * plain, (ckpt, plain)


# ---------------------------------------------------------------------------------------------
# Cross-attention K/V of a constant context, cached while sampling


def cross_attentions(unet: UNet) -> list[Attention]:
    return [m for n, m in unet.named_modules() if isinstance(m, Attention) and n.endswith("attn2")]


def count_kv_projections(unet: UNet) -> list[int]:
    calls = [0]
    for a in cross_attentions(unet):
        a.to_k.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_kv_cache_reuses_projections_while_sampling_and_changes_nothing():
    cfg = tiny()
    unet = UNet(cfg).eval()
    kw = batch(cfg)
    n_attn = len(cross_attentions(unet))
    with torch.no_grad():
        reference = [unet(**(kw | {"context": kw["context"].clone(), "t": t})) for t in (900, 500, 100)]
    calls = count_kv_projections(unet)
    with torch.no_grad():  # a sampler: the same context tensor at every step
        outs = [unet(**(kw | {"t": t})) for t in (900, 500, 100)]
    assert calls[0] == n_attn  # projected at the first step only
    for out, ref in zip(outs, reference):
        assert torch.equal(out, ref)


def test_kv_cache_is_recomputed_when_anything_it_depends_on_changes():
    cfg = tiny()
    unet = UNet(cfg).eval()
    kw = batch(cfg)
    n_attn = len(cross_attentions(unet))
    calls = count_kv_projections(unet)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return unet(**kw)

    def fresh() -> torch.Tensor:  # the same call on a new context tensor: never cached
        with torch.no_grad():
            return unet(**(kw | {"context": kw["context"].clone()}))

    run()
    assert calls[0] == n_attn
    # the context modified in place
    with torch.no_grad():
        kw["context"].mul_(2)
    calls[0] = 0
    assert torch.equal(run(), fresh()) and calls[0] == 2 * n_attn
    # an optimizer step on the weights
    opt = torch.optim.SGD(unet.parameters(), lr=0.1)
    for p in unet.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    calls[0] = 0
    assert torch.equal(run(), fresh()) and calls[0] == 2 * n_attn
    # load_state_dict of other weights
    state = {k: v + 0.01 for k, v in unet.state_dict().items()}
    unet.load_state_dict(state)
    calls[0] = 0
    assert torch.equal(run(), fresh()) and calls[0] == 2 * n_attn
    # a dtype move
    unet.double()
    kw = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
    calls[0] = 0
    out = run()
    assert out.dtype == torch.float64 and calls[0] == n_attn
    # autocast switched on: K/V must be bf16 now, not the cached float64 ones
    unet.float()
    kw = {k: v.float() if v.is_floating_point() else v for k, v in kw.items()}
    run()
    calls[0] = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        amp_out = unet(**kw)
    assert calls[0] == n_attn and amp_out.dtype == torch.bfloat16


def test_kv_cache_never_used_with_autograd():
    cfg = tiny()
    unet = UNet(cfg).train()
    kw = batch(cfg)
    calls = count_kv_projections(unet)
    for _ in range(2):
        loss_and_grads(unet, kw)
    assert calls[0] == 2 * len(cross_attentions(unet))
    assert all(a._kv_cache is None for a in cross_attentions(unet))


def test_kv_cache_is_not_state_and_goes_away_with_the_context():
    cfg = tiny()
    unet = UNet(cfg).eval()
    keys = list(unet.state_dict())
    kw = batch(cfg)
    with torch.no_grad():
        out = unet(**kw)
    assert all(a._kv_cache is not None for a in cross_attentions(unet))
    assert list(unet.state_dict()) == keys
    # copies and pickles leave the cache behind (it holds a weak reference) and still compute the same
    copied = copy.deepcopy(unet)
    assert all(a._kv_cache is None for a in cross_attentions(copied))
    buf = io.BytesIO()
    torch.save(unet, buf)
    pickle.loads(pickle.dumps(unet))
    with torch.no_grad():
        assert torch.equal(copied(**kw), out)
    del kw, out
    gc.collect()
    assert all(a._kv_cache is None for a in cross_attentions(unet))


def test_all_true_mask_is_the_same_as_no_mask():
    cfg = tiny()
    unet = UNet(cfg).eval()
    kw = batch(cfg)
    kw["context_mask"] = torch.ones(B, 5, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(unet(**kw), unet(**(kw | {"context_mask": None})), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# bf16 attention on CPU


def test_cpu_bf16_attention_is_at_least_as_exact_as_sdpa_in_bf16():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=g) * 2 for _ in range(3))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ours = attention(qb, kb, vb)
    assert ours.dtype == torch.bfloat16
    err_ours = (ours.double() - exact).abs().max()
    err_sdpa = (F.scaled_dot_product_attention(qb, kb, vb).double() - exact).abs().max()
    assert err_ours <= err_sdpa * 1.05 + 1e-6
    # float32 is untouched: exactly SDPA
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_bf16_autocast_training_step_matches_fp32_loss_and_gradients():
    cfg = tiny()
    torch.manual_seed(0)
    unet = UNet(cfg).train()
    kw = batch(cfg)
    loss32, grads32 = loss_and_grads(unet, kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, grads16 = loss_and_grads(unet, kw)
    torch.testing.assert_close(loss16, loss32, rtol=0.05, atol=0.02)
    # every parameter's gradient points the same way as in float32 (bf16 keeps 8 mantissa bits, so a
    # per-element tolerance would be meaningless; the direction is what the optimizer follows)
    for name, g in grads32.items():
        g16 = grads16[name].float()
        assert torch.isfinite(g16).all(), name
        if g.norm() > 1e-6:
            cos = F.cosine_similarity(g16.flatten(), g.flatten(), dim=0)
            assert cos > 0.99, (name, cos.item())


def test_cpu_bf16_attention_gradients_match_float32():
    g = torch.Generator().manual_seed(0)
    q32, k32, v32 = (torch.randn(2, 4, 64, 16, generator=g) for _ in range(3))
    grad_out = torch.randn(2, 4, 64, 16, generator=g)
    ref = [t.double().requires_grad_() for t in (q32, k32, v32)]
    F.scaled_dot_product_attention(*ref).backward(grad_out.double())
    low = [t.bfloat16().requires_grad_() for t in (q32, k32, v32)]
    attention(*low).backward(grad_out.bfloat16())
    sdpa = [t.bfloat16().requires_grad_() for t in (q32, k32, v32)]
    F.scaled_dot_product_attention(*sdpa).backward(grad_out.bfloat16())
    for r, ours, theirs in zip(ref, low, sdpa):
        err_ours = (ours.grad.double() - r.grad).abs().max()
        err_sdpa = (theirs.grad.double() - r.grad).abs().max()
        assert err_ours <= 1.5 * err_sdpa + 1e-3, (err_ours, err_sdpa)


def test_gradient_checkpointing_with_bf16_autocast():
    cfg = tiny()
    torch.manual_seed(0)
    unet = UNet(cfg).train()
    kw = batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(unet, kw)
        loss_ckpt, grads_ckpt = loss_and_grads(unet.set_gradient_checkpointing(True), kw)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_clear_context_cache_frees_the_kv_and_changes_nothing():
    cfg = tiny()
    unet = UNet(cfg).eval()
    kw = batch(cfg)
    with torch.no_grad():
        out = unet(**kw)
        assert all(a._kv_cache is not None for a in cross_attentions(unet))
        clear_context_cache(unet)
        assert all(a._kv_cache is None for a in cross_attentions(unet))
        assert torch.equal(unet(**kw), out)
