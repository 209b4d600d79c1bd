"""Random drops in training.

Dropout under `--resume`: the U-Net's dropout (and peft's `lora_dropout`) draws its masks from the global torch RNG,
not from the step's generator. `fit` seeds that RNG from (seed, step, rank) before every step, so a run resumed from
a checkpoint draws the masks the uninterrupted run drew, and ends on the same weights bit for bit.

Condition dropout: each route on its own (drop_text, drop_label) and every route together (drop_all), as SGM's
conditioner, so guidance's fully null condition is trained as often as asked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldmkit.checkpoint import resolve
from ldmkit.conditioning.conditioner import ConditionerConfig
from ldmkit.train.autoencoder import train_autoencoder
from ldmkit.train.config import DataConfig, DiffusionTrainConfig, LoggingConfig, OptimConfig, SampleConfig, ae_tiny
from ldmkit.train.diffusion import train_diffusion
from ldmkit.train.loop import seed_step
from ldmkit.unet import UNetConfig


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ae")
    train_autoencoder(ae_tiny(), out, progress=False)
    return out


def tiny_diffusion(autoencoder: Path, dropout: float = 0.0, **optim) -> DiffusionTrainConfig:
    """A class-conditional 16-px U-Net (no text encoder: seconds per run), 6 steps, a checkpoint every 3."""
    return DiffusionTrainConfig(
        autoencoder=str(autoencoder),
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                        attention_levels=(), mid_attention=False, norm_groups=4, num_classes=18, dropout=dropout),
        conditioner=ConditionerConfig(num_classes=18),
        data=DataConfig(dataset="shapes", size=16, length=64, val_images=16),
        optim=OptimConfig(**{"steps": 6, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "ema_decay": 0.9, **optim}),
        logging=LoggingConfig(log_every=1, val_every=100, ckpt_every=3, keep_checkpoints=5),
        sample=SampleConfig(steps=2, num=2),
    )


def straight_and_resumed(cfg: DiffusionTrainConfig, tmp_path: Path, k: int = 3) -> tuple[Path, Path]:
    """The final checkpoint of an uninterrupted run, and that of the same run continued with --resume from its
    step-k checkpoint (the run folder as a kill after step k leaves it: later checkpoints gone, `latest` at k)."""
    ref = tmp_path / "straight"
    train_diffusion(cfg, ref, progress=False)
    out = tmp_path / "resumed"
    shutil.copytree(ref, out)
    for folder in (out / "checkpoints").iterdir():
        if int(folder.name.split("_")[1]) > k:
            shutil.rmtree(folder)
    (out / "latest").write_text(f"step_{k:08d}")
    assert resolve(out).name == f"step_{k:08d}"
    train_diffusion(cfg, out, resume=True, progress=False)
    return resolve(ref), resolve(out)


def assert_same_weights(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name} {key}: max |diff| {(wa[key] - wb[key]).abs().max():.3g}"


def test_unet_dropout_resumes_bit_for_bit(first_stage, tmp_path):
    """Before the fix, the resumed run re-seeded the global RNG with optim.seed at its start and drew other
    dropout masks for steps 3..5: its weights differed by ~1e-4."""
    ref, resumed = straight_and_resumed(tiny_diffusion(first_stage, dropout=0.3), tmp_path)
    assert_same_weights(ref, resumed)


def test_lora_dropout_resumes_bit_for_bit(first_stage, tmp_path):
    """peft's lora_dropout draws from the same global RNG: LoRA adapters (on the ResBlocks' convolutions) fine-tuned
    from a trained model with dropout 0.3 resume bit for bit too."""
    pytest.importorskip("peft")
    from ldmkit.train.config import FinetuneConfig, LoraConfig

    base = tiny_diffusion(first_stage)
    train_diffusion(base, tmp_path / "base", progress=False)
    cfg = tiny_diffusion(first_stage)
    cfg.finetune = FinetuneConfig(init_from=str(tmp_path / "base"), train="lora")
    cfg.lora = LoraConfig(rank=2, dropout=0.3, targets=["conv1", "conv2"])
    ref, resumed = straight_and_resumed(cfg, tmp_path / "lora")
    assert "lora" in torch.load(ref / "training_state.pt", weights_only=True)  # a LoRA run: only adapters trained
    assert_same_weights(ref, resumed)  # its weights: the model with the adapter folded in


def test_step_seed_is_a_function_of_seed_step_and_rank():
    """The masks of step `step` on rank `rank` depend on nothing else, and differ between steps and ranks (a
    global RNG stream apart from the step generator's: rng.step_generator(seed, step) is seeded differently)."""
    from ldmkit.rng import step_generator

    def draw(seed, step, rank):
        seed_step(seed, step, rank)
        return torch.rand(1000)

    torch.rand(7)  # whatever the global RNG did before
    a = draw(0, 5, 0)
    assert torch.equal(a, draw(0, 5, 0))
    for other in (draw(1, 5, 0), draw(0, 6, 0), draw(0, 5, 1), torch.rand(1000, generator=step_generator(0, 5))):
        assert (a - other).abs().mean() > 0.2  # independent uniforms: E|a − b| = 1/3


# --- condition dropout: per route and joint -------------------------------------------------------------------------


class _Marks:
    """A stand-in text encoder: one token, 1 for a caption and 0 for the empty (dropped) caption."""

    dim = 1

    def __call__(self, texts, syntax=False):
        x = torch.tensor([float(bool(t)) for t in texts])[:, None, None]  # (n, 1, 1)
        return x, torch.ones(len(texts), 1, dtype=torch.bool)


def _conditioner(**drops):
    from ldmkit.conditioning.conditioner import Conditioner

    return Conditioner(ConditionerConfig(num_classes=18, pooled_text=True, **drops), text_encoder=_Marks())


def _train_cond(conditioner, n: int, seed: int = 0):
    texts, labels = ["a caption"] * n, torch.arange(n) % 18
    return conditioner(texts=texts, labels=labels, batch_size=n, train=True, generator=torch.Generator().manual_seed(seed))


def test_joint_dropout_gives_each_route_and_the_null_condition_their_probabilities():
    """P(text null) = a + (1 − a)·t, P(label null) = a + (1 − a)·l, P(both) = a + (1 − a)·t·l. 400,000 items: one
    standard error is < 0.0007, the tolerance 0.004 (and the seed is fixed, so the figures never change)."""
    n, t, l, a = 400_000, 0.1, 0.2, 0.05
    for drop_all in (0.0, a):
        cond = _train_cond(_conditioner(drop_text=t, drop_label=l, drop_all=drop_all), n)
        text_null, label_null = cond.context[:, 0, 0] == 0, cond.labels == 18
        both = (text_null & label_null).float().mean()
        assert abs(text_null.float().mean() - (drop_all + (1 - drop_all) * t)) < 0.004
        assert abs(label_null.float().mean() - (drop_all + (1 - drop_all) * l)) < 0.004
        assert abs(both - (drop_all + (1 - drop_all) * t * l)) < 0.004, (drop_all, both)
    assert both > 3 * t * l  # the point of drop_all: 6.9 % fully null against 2 % from independent drops


def test_drop_all_one_gives_exactly_the_unconditional_cond():
    n = 6
    size_crop = torch.tensor([[16.0, 16, 0, 0, 16, 16]]).expand(n, -1)
    conditioner = _conditioner(drop_text=0.0, drop_label=0.0, drop_all=1.0)
    conditioner.cfg = conditioner.cfg.model_copy(update={"micro_conditioning": True})
    got = conditioner(texts=["a caption"] * n, labels=torch.arange(n), batch_size=n, train=True,
                      generator=torch.Generator().manual_seed(0), size_crop=size_crop)
    want = conditioner.uncond(n, size_crop=size_crop)
    assert got.labels.tolist() == [18] * n and torch.equal(got.labels, want.labels)
    assert torch.equal(got.context, want.context) and torch.equal(got.vector, want.vector)
    assert got.vector[:, 1:].abs().sum() > 0  # the micro-conditions stay (they are never dropped)


def test_without_drop_all_the_draws_are_those_of_earlier_versions():
    """drop_all = 0 draws nothing extra: text keep = rand(n) ≥ t, then label drop = rand(n) < l, from one generator,
    as before the option existed, so existing configs train (and the demo's figures come out) as they did."""
    n, t, l = 1000, 0.3, 0.4
    cond = _train_cond(_conditioner(drop_text=t, drop_label=l), n, seed=5)
    g = torch.Generator().manual_seed(5)
    keep, drop = torch.rand(n, generator=g) >= t, torch.rand(n, generator=g) < l
    assert torch.equal(cond.context[:, 0, 0] == 1, keep)
    assert torch.equal(cond.labels == 18, drop)
