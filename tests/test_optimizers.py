"""`optim.optimizer`: each optimizer comes from its maintained library, is refused in one line when the library is
missing, and resumes bit for bit: N steps straight give the weights of k steps, a checkpoint, --resume, N − k steps."""

from __future__ import annotations

import copy
import importlib

import sys

import pytest
import torch
from pydantic import ValidationError
from test_dropout_rng import assert_same_weights, first_stage, straight_and_resumed, tiny_diffusion  # noqa: F401

from ldmkit.errors import LdmkitError
from ldmkit.train.config import OptimConfig
from ldmkit.train.loop import build_optimizer

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy", "lion")
LIBRARY = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt", "lion": "lion_pytorch"}
# each one's usual learning rate for this model: Prodigy's lr multiplies its own estimate (1.0, as its authors
# advise); Lion's sign updates take ~10x less than AdamW; torch's Adafactor's lr caps a relative step
LR = {"adamw": 1e-3, "adamw8bit": 1e-3, "adafactor": 1e-2, "prodigy": 1.0, "lion": 1e-4}


def _available(name: str) -> bool:
    if name == "adafactor":
        return hasattr(torch.optim, "Adafactor")
    try:
        __import__(LIBRARY.get(name, "torch"))
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_resumes_bit_for_bit(name, first_stage, tmp_path):  # noqa: F811
    """Dropout on as well: the resumed run must also repeat the masks (test_dropout_rng.py)."""
    if not _available(name):
        pytest.skip(f"{LIBRARY[name]} is not installed (pip install 'ldmkit[{name}]')")
    cfg = tiny_diffusion(first_stage, dropout=0.1, optimizer=name, lr=LR[name], weight_decay=0.01)
    ref, resumed = straight_and_resumed(cfg, tmp_path)
    assert_same_weights(ref, resumed)
    state = torch.load(ref / "training_state.pt", weights_only=True)["optimizer"]
    first = state["state"][0]
    first = first.get("__bnb_optimizer_quant_state__", first)  # bitsandbytes nests its state (torch would cast it)
    expect = {"adamw": {"exp_avg", "exp_avg_sq"}, "adamw8bit": {"state1", "state2"}, "adafactor": {"row_var", "col_var"},
              "prodigy": {"exp_avg", "exp_avg_sq", "s", "p0"}, "lion": {"exp_avg"}}[name]
    assert expect <= set(first), sorted(first)  # the library's own state went into the checkpoint
    if name == "prodigy":  # its step-size estimate's running sums live in the param group: checkpointed too
        group = state["param_groups"][0]
        assert group["d"] >= 1e-6 and group["d_numerator"] > 0, group


def _train(opt_cfg: OptimConfig, steps: int = 5) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.SiLU(), torch.nn.Linear(128, 8))
    opt = build_optimizer(model.parameters(), opt_cfg, torch.device("cpu"))
    for s in range(steps):
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(s))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    return model, opt


def test_each_name_builds_the_libraries_class_with_the_configs_values():
    expect = {"adamw": ("torch.optim", "AdamW"), "adamw8bit": ("bitsandbytes.optim", "AdamW8bit"),
              "adafactor": ("torch.optim", "Adafactor"), "prodigy": ("prodigyopt", "Prodigy"),
              "lion": ("lion_pytorch", "Lion")}
    for name in OPTIMIZERS:
        if not _available(name):
            continue
        _, opt = _train(OptimConfig(optimizer=name, lr=0.25, betas=(0.8, 0.95), weight_decay=0.03), steps=1)
        module, cls = expect[name]
        assert type(opt) is getattr(importlib.import_module(module), cls)
        group = opt.param_groups[0]
        assert group["lr"] == 0.25 and group["weight_decay"] == 0.03
        if name != "adafactor":  # torch's Adafactor has no first moment, and its second's decay is a schedule
            assert tuple(group["betas"]) == (0.8, 0.95)


def test_lion_is_the_sign_update_of_its_paper():
    """Chen et al. 2023, Algorithm 2: c = β1·m + (1 − β1)·g; θ ← θ − lr·(sign(c) + λθ); m ← β2·m + (1 − β2)·g."""
    if not _available("lion"):
        pytest.skip("lion-pytorch is not installed")
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50))
    theta, m = p.detach().clone(), torch.zeros(50)
    opt = build_optimizer([p], OptimConfig(optimizer="lion", lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
                          torch.device("cpu"))
    for _ in range(3):
        g = torch.randn(50)
        p.grad = g.clone()
        opt.step()
        c = 0.9 * m + 0.1 * g
        theta = theta * (1 - 1e-2 * 0.1) - 1e-2 * torch.sign(c)
        m = 0.99 * m + 0.01 * g
    torch.testing.assert_close(p.detach(), theta, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw8bit", "prodigy", "lion"])
def test_a_missing_library_is_one_line_naming_the_extra(name, monkeypatch):
    for module in (LIBRARY[name], f"{LIBRARY[name]}.optim"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` of it raises ImportError, as when not installed
    with pytest.raises(LdmkitError) as e:
        build_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimConfig(optimizer=name), torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and f"pip install 'ldmkit[{name}]'" in msg and f"optim.optimizer={name}" in msg


def test_adamw8bit_on_a_device_bitsandbytes_cannot_run_is_refused_in_one_line(monkeypatch):
    if not _available("adamw8bit"):
        pytest.skip("bitsandbytes is not installed")
    import bitsandbytes.optim

    class NoKernel(bitsandbytes.optim.AdamW8bit):
        def step(self, closure=None):  # what a bitsandbytes without this device's kernel does
            raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(bitsandbytes.optim, "AdamW8bit", NoKernel)
    with pytest.raises(LdmkitError) as e:
        build_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimConfig(optimizer="adamw8bit"), torch.device("cpu"))
    assert "\n" not in str(e.value) and "CUDA" in str(e.value) and "ldmkit[adamw8bit]" in str(e.value)


def test_adamw8bit_keeps_8_bit_moments_and_follows_adamw():
    """Its moments are uint8 codes (the memory it saves), and its steps stay within quantisation error of AdamW's."""
    if not _available("adamw8bit"):
        pytest.skip("bitsandbytes is not installed")
    cfg = dict(lr=1e-3, weight_decay=0.01)
    ref, _ = _train(OptimConfig(optimizer="adamw", **cfg))
    q, opt = _train(OptimConfig(optimizer="adamw8bit", **cfg))
    big = q[0].weight  # 8192 elements: quantised (bitsandbytes keeps tensors under 4096 in 32 bits)
    assert opt.state[big]["state1"].dtype == torch.uint8 and opt.state[big]["state2"].dtype == torch.uint8
    start = copy.deepcopy(_train(OptimConfig(optimizer="adamw", **cfg), steps=0)[0])
    moved = (ref[0].weight - start[0].weight).abs().mean()
    off = (q[0].weight - ref[0].weight).abs().mean()
    assert moved > 1e-3 and off < 0.05 * moved, (moved, off)


def test_an_unknown_optimizer_name_is_refused_by_the_config():
    with pytest.raises(ValidationError, match="adamw"):
        OptimConfig(optimizer="sgd")


def test_prodigy_with_an_adamw_sized_lr_is_kept_and_said():
    if not _available("prodigy"):
        pytest.skip("prodigyopt is not installed")
    with pytest.warns(UserWarning, match="lr=1.0"):
        opt = build_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimConfig(optimizer="prodigy", lr=1e-4),
                              torch.device("cpu"))
    assert opt.param_groups[0]["lr"] == 1e-4
