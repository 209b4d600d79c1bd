"""Fine-tuning from existing models and LoRA (issue 15), pinned to diffusers and peft themselves: a
LoRA ldmkit trains loads into `StableDiffusionPipeline.load_lora_weights` and gives ldmkit's outputs;
one diffusers/peft save loads into ldmkit; the kohya layout reads as diffusers' own kohya conversion
reads it; merged equals unmerged; scale 0 is the base; `--init-from` each format starts alike."""

import copy

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from ldmkit.cli import main  # noqa: E402
from ldmkit.interop import lora as L  # noqa: E402
from ldmkit.interop.convert import convert, load_any  # noqa: E402
from ldmkit.train.config import DIFFUSION_PRESETS  # noqa: E402
from ldmkit.train.finetune import load_init_model  # noqa: E402
from test_convert import minilm_ckpt  # noqa: E402, F401 - the fixture
from test_interop import make_tiny_sd_folder, max_diff, same_state  # noqa: E402


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_tiny_sd_folder(tmp_path_factory.mktemp("lora") / "sd")


@pytest.fixture(scope="module")
def trained(sd_folder, tmp_path_factory):
    """`ldmkit train --init-from` a diffusers pipeline folder with LoRA (rank 4, alpha 8): a few real steps."""
    out = tmp_path_factory.mktemp("lora-run") / "run"
    rc = main(["train", "--config", "tiny", "--init-from", str(sd_folder), "--out", str(out), "--quiet",
               "--set", "finetune.train=lora", "--set", "lora.rank=4", "--set", "lora.alpha=8",
               "--set", "optim.steps=3", "--set", "optim.lr=0.05", "--set", "optim.warmup_steps=0",
               "--set", "optim.ema_decay=null"])
    assert rc == 0
    return out


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 16, 32, generator=g)


def bigger(lora: L.Lora, seed=0) -> L.Lora:
    """The trained adapter's layers with order-0.1 random weights, so a mapping mistake cannot hide in a small B."""
    g = torch.Generator().manual_seed(seed)
    return {p: L.Adapter(0.3 * torch.randn(a.down.shape, generator=g), 0.3 * torch.randn(a.up.shape, generator=g), a.alpha)
            for p, a in lora.items()}


def diffusers_unet_with(sd_folder, file):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder), local_files_only=True)
    pipe.load_lora_weights(str(file))
    return pipe.unet.eval()


def ldmkit_unet_with(sd_folder, file, scale=1.0):
    ldm = load_any(sd_folder)
    L.merge_lora(ldm, L.load_lora(file, ldm), scale)
    return ldm.unet.eval()


def test_lora_run_is_a_normal_run_and_only_the_adapter_trained(trained, sd_folder):
    ldm, base = load_any(trained), load_any(sd_folder)
    lora = L.load_lora(trained / "lora.safetensors")
    assert lora and all(p.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for p in lora)
    changed = {k for k, v in ldm.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed and changed <= {f"{p}.weight" for p in lora}  # only adapted weights moved
    assert L.merge_lora(base, lora) is base  # the base with the adapter folded in is the run's model
    assert max(max_diff(base.unet.state_dict()[k], v) for k, v in ldm.unet.state_dict().items()) <= 1e-6


def test_the_saved_config_of_a_fine_tune_is_what_trained(trained, sd_folder):
    """OUT/train_config.yaml holds the model's U-Net and diffusion process, not the preset's it was started with:
    the tiny preset's U-Net and the SD folder's differ, and so do their noise schedules."""
    from ldmkit.train.config import DiffusionTrainConfig, load_config

    cfg = load_config(str(trained / "train_config.yaml"), DiffusionTrainConfig, DIFFUSION_PRESETS)
    base, preset = load_any(sd_folder), DIFFUSION_PRESETS["tiny"]()
    assert cfg.unet == base.config.unet != preset.unet
    assert cfg.diffusion == base.config.diffusion != preset.diffusion


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_ldmkit_lora_in_diffusers_load_lora_weights_matches_ldmkit(trained, sd_folder, tmp_path, layout):
    lora = bigger(L.load_lora(trained / "lora.safetensors"))
    file = L.save_lora(lora, tmp_path / f"{layout}.safetensors", layout)
    z, t, ctx = inputs()
    with torch.no_grad():
        ref = diffusers_unet_with(sd_folder, file)(z, t, encoder_hidden_states=ctx).sample
        ours = ldmkit_unet_with(sd_folder, file)(z, t, context=ctx)
        base = load_any(sd_folder).unet(z, t, context=ctx)
    assert ref.abs().mean() > 0.1 and max_diff(ref, base) > 1e-2  # order-1 outputs the LoRA changes
    assert max_diff(ours, ref) <= 1e-4


def test_lora_saved_by_diffusers_and_peft_loads_into_ldmkit(sd_folder, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder), local_files_only=True)
    cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.unet.add_adapter(cfg)
    z, t, ctx = inputs(1)
    with torch.no_grad():
        ref = pipe.unet(z, t, encoder_hidden_states=ctx).sample
    layers = get_peft_model_state_dict(pipe.unet)
    meta = cfg.to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    diffusers.StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=layers,
                                                        unet_lora_adapter_metadata=meta, safe_serialization=True)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    assert L.is_lora_file(file)
    with torch.no_grad():
        ours = ldmkit_unet_with(sd_folder, file)(z, t, context=ctx)
        base = load_any(sd_folder).unet(z, t, context=ctx)
    assert max_diff(ref, base) > 1e-2
    assert max_diff(ours, ref) <= 1e-4
    # peft's own state dict, without diffusers' `unet.` prefix, and the rank as alpha (scale 1): the same reading
    sd = {k: v for k, v in layers.items()}
    lora = L.from_state_dict(sd)
    assert set(lora) == {p for p in L.load_lora(file)} and all(a.alpha == a.rank for a in lora.values())


def test_kohya_layout_reads_as_diffusers_own_kohya_conversion(trained, tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    ldm = load_any(trained)
    lora = bigger(L.load_lora(trained / "lora.safetensors"), seed=3)
    lora = {p: L.Adapter(a.down, a.up, 3.0) for p, a in lora.items()}  # alpha 3 != rank 4: the scale must travel
    file = L.save_lora(lora, tmp_path / "kohya.safetensors", "kohya")
    sd, _ = L.read_lora(file)
    assert all(k.startswith("lora_unet_") for k in sd) and any(k.endswith(".alpha") for k in sd)
    theirs, alphas = _convert_non_diffusers_lora_to_diffusers(dict(sd))
    theirs = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in theirs.items()})
    ours = L.load_lora(file, ldm)
    # diffusers names an attention layer's alpha after its old processor key (`…attn1.processor.to_k_lora.down.weight`)
    alphas = {L._canonical(k.removesuffix(".alpha").removesuffix(".down.weight")): v for k, v in alphas.items()}
    assert {f"{p.removeprefix('unet.')}.lora_A.weight" for p in ours} == {k for k in theirs if ".lora_A." in k}
    for path, a in ours.items():
        name = path.removeprefix("unet.")
        assert torch.equal(theirs[f"{name}.lora_A.weight"], a.down) and torch.equal(theirs[f"{name}.lora_B.weight"], a.up)
        assert alphas[path] == a.alpha
    # and back: kohya -> diffusers layout through `ldmkit convert` gives the same ΔW
    out = tmp_path / "diffusers.safetensors"
    assert main(["convert", "--from", str(file), "--to", str(out), "--format", "diffusers", "--config", str(trained)]) == 0
    back = L.load_lora(out)
    assert all(max_diff(back[p].delta(), a.delta()) <= 1e-6 for p, a in ours.items())


def test_merged_equals_unmerged_and_scale_zero_is_the_base(sd_folder):
    ldm = load_any(sd_folder)
    live = copy.deepcopy(ldm.unet)
    L.add_adapter(live, rank=3, alpha=5.0, targets=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"))
    with torch.no_grad():
        for name, p in live.named_parameters():
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    lora = L.adapter_of(live)
    assert any(a.down.ndim == 4 for a in lora.values())  # ResBlock convolutions adapted too
    z, t, ctx = inputs(2)
    merged = copy.deepcopy(ldm)
    L.merge_lora(merged, lora)
    plain = copy.deepcopy(ldm.unet)
    plain.load_state_dict(L.plain_state_dict(live))
    with torch.no_grad():
        unmerged = live.eval()(z, t, context=ctx)
        assert max_diff(merged.unet(z, t, context=ctx), unmerged) <= 1e-5
        assert max_diff(plain(z, t, context=ctx), unmerged) <= 1e-5
        zero = L.merge_lora(copy.deepcopy(ldm), lora, 0.0)
        assert same_state(zero.state_dict(), ldm.state_dict())
        assert torch.equal(zero.unet(z, t, context=ctx), ldm.unet(z, t, context=ctx))


def test_scales_add_and_the_cli_applies_and_merges_loras(trained, sd_folder, tmp_path):
    file = trained / "lora.safetensors"
    lora = bigger(L.load_lora(file))
    big = L.save_lora(lora, tmp_path / "big.safetensors")
    once = L.apply_loras(load_any(sd_folder), [f"{big}:1.0"])
    halves = L.apply_loras(load_any(sd_folder), [f"{big}:0.5", (str(big), 0.5)])
    assert max(max_diff(v, halves.state_dict()[k]) for k, v in once.state_dict().items()) <= 1e-6
    # convert --merge-lora writes the merged model; sample --lora gives the merged model's images
    merged = tmp_path / "merged"
    assert main(["convert", "--from", str(sd_folder), "--to", str(merged), "--format", "ldmkit",
                 "--merge-lora", f"{big}:1"]) == 0
    assert same_state(load_any(merged).state_dict(), once.state_dict())
    args = ["sample", "--prompt", "a cat", "--steps", "2", "--quiet"]
    assert main(args + ["--checkpoint", str(sd_folder), "--lora", str(big), "--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--checkpoint", str(merged), "--out", str(tmp_path / "b")]) == 0
    from PIL import Image

    pixels = [np.asarray(Image.open(tmp_path / d / "0000.png")) for d in ("a", "b")]  # the PNGs' text chunks differ
    assert np.array_equal(*pixels)
    assert main(args + ["--checkpoint", str(sd_folder), "--lora", str(tmp_path / "nope.safetensors"),
                        "--out", str(tmp_path / "c")]) == 2


def test_init_from_the_three_formats_starts_from_the_same_unet(minilm_ckpt, tmp_path):  # noqa: F811
    diff = tmp_path / "diffusers"
    single = tmp_path / "model.safetensors"
    convert(minilm_ckpt, diff, "diffusers")
    convert(minilm_ckpt, single, "original")
    states = []
    for src in (minilm_ckpt, diff, single):
        cfg = DIFFUSION_PRESETS["tiny"]()
        cfg.finetune.init_from = str(src)
        ldm = load_init_model(cfg)
        states.append(ldm.unet.state_dict())
        assert ldm.config.unet == load_any(minilm_ckpt).config.unet
    assert same_state(states[0], states[1]) and same_state(states[0], states[2])
    assert same_state(states[0], load_any(minilm_ckpt).unet.state_dict())


def test_lora_run_resumes_with_its_adapter(sd_folder, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", "tiny", "--init-from", str(sd_folder), "--out", str(out), "--quiet",
            "--set", "finetune.train=lora", "--set", "optim.lr=0.05", "--set", "optim.warmup_steps=0",
            "--set", "logging.ckpt_every=2", "--set", "optim.schedule=constant"]  # the LR does not depend on steps
    assert main(args + ["--set", "optim.steps=4"]) == 0
    full = L.load_lora(out / "lora.safetensors")
    resumed = tmp_path / "resumed"
    assert main([a if a != str(out) else str(resumed) for a in args] + ["--set", "optim.steps=2"]) == 0
    assert main([a if a != str(out) else str(resumed) for a in args] + ["--set", "optim.steps=4", "--resume"]) == 0
    again = L.load_lora(resumed / "lora.safetensors")
    assert all(max_diff(again[p].delta(), a.delta()) <= 1e-6 for p, a in full.items())


def test_a_fine_tune_chooses_its_loss_and_refuses_another_diffusion_process(sd_folder, tmp_path, capsys):
    """`finetune.weighting / min_snr_gamma / offset_noise` set the loss of a fine-tune (saved with the model, and in
    train_config.yaml); `--set diffusion.…` with --init-from, which the model's own process would silently
    override, is refused in one line that names the settings to use, before anything is written."""
    from ldmkit.train.config import DiffusionTrainConfig, load_config

    out = tmp_path / "run"
    args = ["train", "--config", "tiny", "--init-from", str(sd_folder), "--out", str(out), "--quiet",
            "--set", "finetune.train=lora", "--set", "optim.steps=1"]
    assert main([*args, "--set", "finetune.offset_noise=0.1", "--set", "finetune.weighting=min_snr",
                 "--set", "finetune.min_snr_gamma=2"]) == 0
    base = load_any(sd_folder).config.diffusion
    want = base.model_copy(update={"offset_noise": 0.1, "weighting": "min_snr", "min_snr_gamma": 2.0})
    assert want != base and load_any(out).config.diffusion == want
    assert load_config(str(out / "train_config.yaml"), DiffusionTrainConfig, DIFFUSION_PRESETS).diffusion == want

    capsys.readouterr()
    refused = tmp_path / "refused"
    assert main([*args[:6], str(refused), *args[7:], "--set", "diffusion.offset_noise=0.1"]) == 2
    err = capsys.readouterr().err
    assert "diffusion.offset_noise: a fine-tune trains with the diffusion process" in err and "finetune.offset_noise" in err
    assert not refused.exists()


def test_lora_needs_a_model_and_bad_targets_are_named(sd_folder, tmp_path):
    rc = main(["train", "--config", "tiny", "--out", str(tmp_path / "a"), "--quiet", "--set", "finetune.train=lora"])
    assert rc == 2
    with pytest.raises(Exception, match="no layer"):
        L.add_adapter(copy.deepcopy(load_any(sd_folder).unet), 2, targets=["to_qq"])


def test_decoder_steps_teach_the_decoder_and_leave_the_encoder(sd_folder, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--init-from", str(sd_folder), "--out", str(out), "--quiet",
                 "--set", "finetune.train=lora", "--set", "finetune.decoder_steps=3", "--set", "optim.steps=1"]) == 0
    ae, base = load_any(out).autoencoder.state_dict(), load_any(sd_folder).autoencoder.state_dict()
    moved = {k for k in ae if not torch.equal(ae[k], base[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved)
