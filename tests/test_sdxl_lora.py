"""SDXL LoRA files in both layouts, pinned to diffusers' own readers and writers: kohya's SDXL names
(original-layout U-Net names, `lora_te1_`/`lora_te2_`) read by diffusers' conversion as the same layers and
weights; ldmkit's kohya export equal to diffusers' `convert_state_dict_to_kohya`; an SD 1.x LoRA on SDXL
(and the reverse) refused in one line naming both."""

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers.loaders.lora_conversion_utils import (  # noqa: E402
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.utils import convert_unet_state_dict_to_peft  # noqa: E402
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # noqa: E402
from test_sdxl import sdxl_folder  # noqa: E402, F401 - the fixture (a tiny StableDiffusionXLPipeline folder)
from test_sdxl_files import TINY_UNET, perturb  # noqa: E402

from ldmkit.errors import LdmkitError  # noqa: E402
from ldmkit.interop import lora as L  # noqa: E402
from ldmkit.interop.diffusers import from_diffusers  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj", "add_embedding.linear_1",
           "conv_in", "downsamplers.0.conv")  # fmt: skip


def random_lora(net: nn.Module, part="unet", targets=TARGETS, rank=2, alpha=3.0, seed=0) -> L.Lora:
    """Order-0.1 random adapters on every layer of `net` whose name ends in one of `targets`;
    alpha != rank, so the scale must travel with the file."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in net.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        w = m.weight
        down = 0.3 * torch.randn((rank, *w.shape[1:]), generator=g)  # (r, in[, k, k])
        up = 0.3 * torch.randn((w.shape[0], rank, *([1, 1] if w.ndim == 4 else [])), generator=g)  # (out, r[, 1, 1])
        out[f"{part}.{name}"] = L.Adapter(down, up, alpha)
    return out


@pytest.fixture(scope="module")
def unets():
    torch.manual_seed(0)
    ref = perturb(diffusers.UNet2DConditionModel(**TINY_UNET).eval())
    return ref, from_diffusers(ref)


def test_kohya_sdxl_unet_names_read_in_diffusers_as_the_same_layers(unets):
    """ldmkit writes the U-Net part in sd-scripts' SDXL spelling (original-layout names); diffusers' SDXL
    loader steps (`_maybe_map_sgm_blocks_to_diffusers`, `_convert_non_diffusers_lora_to_diffusers`, peft
    names) find exactly ldmkit's layers, down/up weights and alphas; ldmkit reads its file back unchanged."""
    ref, unet = unets
    lora = random_lora(unet)
    sd, _ = L.to_state_dict(lora, "kohya", unet, unet_names="original")
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", "lora_unet_label_emb_0_0",
                 "lora_unet_middle_block_1_proj_in", "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2",
                 "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_0_0"):  # fmt: skip
        assert f"{name}.lora_down.weight" in sd, name
    theirs, alphas = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(dict(sd), ref.config))
    theirs = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in theirs.items()})
    assert {k.removesuffix(".lora_A.weight") for k in theirs if ".lora_A." in k} == {p.removeprefix("unet.") for p in lora}
    for path, a in lora.items():
        name = path.removeprefix("unet.")
        assert torch.equal(theirs[f"{name}.lora_A.weight"], a.down) and torch.equal(theirs[f"{name}.lora_B.weight"], a.up)
    assert sorted(alphas.values()) == [3.0] * len(lora)
    back = L.from_state_dict(sd, model=unet)
    assert back.keys() == lora.keys() and all(torch.equal(back[p].up, a.up) and back[p].alpha == 3.0 for p, a in lora.items())


def test_kohya_export_with_diffusers_names_equals_diffusers_own_kohya_conversion(unets):
    """diffusers' `convert_state_dict_to_kohya` of the same adapters (peft names, alpha = rank as peft's
    state dict implies) is ldmkit's kohya file with diffusers' U-Net names, key for key and value for value;
    and ldmkit reads diffusers' file as the same LoRA."""
    _, unet = unets
    lora = {p: L.Adapter(a.down, a.up, float(a.rank)) for p, a in random_lora(unet, seed=1).items()}
    peft_sd = {}
    for path, a in lora.items():
        peft_sd |= {f"{path}.lora_A.weight": a.down, f"{path}.lora_B.weight": a.up}
    theirs = convert_state_dict_to_kohya(peft_sd)
    ours, _ = L.to_state_dict(lora, "kohya", unet, unet_names="diffusers")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k].float(), theirs[k].float()) for k in ours)
    back = L.from_state_dict(theirs, model=unet)
    assert back.keys() == lora.keys() and all(torch.equal(back[p].down, a.down) for p, a in lora.items())


def test_sd1_lora_on_sdxl_and_sdxl_lora_on_sd1_are_refused_naming_both():
    """Full-size U-Nets on the meta device: a LoRA's family is read from what it adapts (the width of the
    text its cross-attention reads), the model's from its U-Net, and the mismatch is one line."""
    from ldmkit.unet import UNet, unet_sd1, unet_sdxl

    with torch.device("meta"):
        sd1, sdxl = UNet(unet_sd1()), UNet(unet_sdxl())
    only = ("attn2.to_k", "attn2.to_v")
    lora_sd1 = {p: L.Adapter(torch.zeros_like(a.down, device="cpu"), torch.zeros_like(a.up, device="cpu"), 1.0)
                for p, a in random_lora(sd1, targets=only, rank=1).items()}  # fmt: skip
    lora_sdxl = {p: L.Adapter(torch.zeros_like(a.down, device="cpu"), torch.zeros_like(a.up, device="cpu"), 1.0)
                 for p, a in random_lora(sdxl, targets=only, rank=1).items()}  # fmt: skip
    assert (L.lora_family(lora_sd1), L.lora_family(lora_sdxl), L.family(sd1), L.family(sdxl)) == ("SD 1.x", "SDXL", "SD 1.x", "SDXL")
    with pytest.raises(LdmkitError, match=r"^this LoRA was made for SD 1.x but the model is SDXL \(.*\); use a LoRA made for SDXL$"):
        L.merge_lora(sdxl, lora_sd1)
    with pytest.raises(LdmkitError, match=r"^this LoRA was made for SDXL but the model is SD 1.x \(.*\); use a LoRA made for SD 1.x$"):
        L.merge_lora(sd1, lora_sdxl)
    # the same through a kohya file, whose names do not resolve on the other model
    sd, _ = L.to_state_dict(lora_sd1, "kohya")
    with pytest.raises(LdmkitError, match=r"^this LoRA was made for SD 1.x but the model is SDXL"):
        L.from_state_dict(sd, model=sdxl)
    first = {k: v for k, v in sd.items() if k.startswith("lora_unet_down_blocks_0_")}  # no layer of it is SDXL's
    with pytest.raises(LdmkitError, match=r"^this LoRA was made for SD 1.x but the model is SDXL \(its layer lora_unet_down"):
        L.from_state_dict(first, model=sdxl)


# ---- a whole SDXL pipeline: U-Net and both text encoders, through ldmkit's --lora and diffusers' load_lora_weights

TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_sdxl_lora_gives_diffusers_load_lora_weights_outputs(sdxl_folder, tmp_path, layout):  # noqa: F811 - the fixture
    """An SDXL LoRA adapting the U-Net, CLIP ViT-L (kohya lora_te1_, diffusers text_encoder.) and OpenCLIP
    bigG (lora_te2_, text_encoder_2.): ldmkit's `--lora` (read with the model, merged) gives the prompt
    embeddings, pooled embeddings and U-Net outputs that diffusers' `StableDiffusionXLPipeline.
    load_lora_weights` gives, in both layouts; each part of the LoRA is live."""
    from test_sdxl import unet_inputs

    import ldmkit
    from ldmkit.conditioning.conditioner import sdxl_vector

    ldm = ldmkit.load(sdxl_folder)
    parts = L.model_parts(ldm)
    assert set(parts) == {"unet", "text_encoder", "text_encoder_2"}
    lora = random_lora(parts["unet"], targets=("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"), seed=2)
    lora |= random_lora(parts["text_encoder"], "text_encoder", TE_TARGETS, seed=3)
    lora |= random_lora(parts["text_encoder_2"], "text_encoder_2", TE_TARGETS, seed=4)
    file = L.save_lora(lora, tmp_path / f"xl_{layout}.safetensors", layout, ldm)
    sd, _ = L.read_lora(file)
    if layout == "kohya":
        assert {k.split("_")[1] for k in sd} == {"unet", "te1", "te2"}
        assert "lora_unet_input_blocks_7_1_transformer_blocks_1_attn1_to_q.alpha" in sd
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd
    else:
        assert {k.split(".")[0] for k in sd} == {"unet", "text_encoder", "text_encoder_2"}

    base = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), local_files_only=True)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), local_files_only=True)
    pipe.load_lora_weights(str(file))
    prompts = ["a cat", "two dogs on grass"]
    x, t, _, _, time_ids = unet_inputs()
    with torch.no_grad():
        ldm.conditioner(texts=prompts, size_crop=time_ids)  # cached before the merge: must not be reused after
    L.apply_loras(ldm, [str(file)])
    with torch.no_grad():
        pe, _, pp, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        be, _, bp, _ = base.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        cond = ldm.conditioner(texts=prompts, size_crop=time_ids)
        ref = pipe.unet(x, t, pe, added_cond_kwargs={"text_embeds": pp, "time_ids": time_ids}).sample
        ref_base = base.unet(x, t, pe, added_cond_kwargs={"text_embeds": pp, "time_ids": time_ids}).sample
        out = ldm.unet(x, t, context=pe, vector=sdxl_vector(pp, time_ids))
    d1, d2 = 32, 24  # the two encoders' widths, side by side in the context
    assert (be[..., :d1] - pe[..., :d1]).abs().max() > 1e-2 and (be[..., d1:] - pe[..., d1:]).abs().max() > 1e-2
    assert (bp - pp).abs().max() > 1e-2 and (ref_base - ref).abs().max() > 1e-2  # every part is live
    assert cond.context.shape == pe.shape and (cond.context - pe).abs().max() <= 1e-5
    assert (cond.vector[:, : pp.shape[1]] - pp).abs().max() <= 1e-5
    assert 0.1 < ref.std() < 10 and (out - ref).abs().max() <= 1e-4
    assert d1 + d2 == pe.shape[-1]


def test_convert_rewrites_sdxl_lora_layouts_and_merges_them_into_a_single_file(sdxl_folder, tmp_path):  # noqa: F811 - the fixture
    """`ldmkit convert` on SDXL: a diffusers-layout LoRA → kohya with the model as --config (SDXL names, the
    same ΔW per layer), and `--merge-lora` folds it into an SDXL single file whose weights are the merged model's."""
    import ldmkit
    from ldmkit.cli import main

    ldm = ldmkit.load(sdxl_folder)
    parts = L.model_parts(ldm)
    lora = random_lora(parts["unet"], targets=("to_q", "to_v"), seed=5)
    lora |= random_lora(parts["text_encoder_2"], "text_encoder_2", ("q_proj", "fc1"), seed=6)
    src = L.save_lora(lora, tmp_path / "xl_diffusers.safetensors", "diffusers", ldm)
    kohya = tmp_path / "xl_kohya.safetensors"
    assert main(["convert", "--from", str(src), "--to", str(kohya), "--format", "kohya", "--config", str(sdxl_folder)]) == 0
    sd, _ = L.read_lora(kohya)
    assert "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_v.lora_up.weight" in sd
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc1.alpha" in sd
    back = L.load_lora(kohya, ldm)
    assert back.keys() == lora.keys() and all((back[p].delta() - a.delta()).abs().max() <= 1e-6 for p, a in lora.items())
    merged = tmp_path / "xl_merged.safetensors"
    assert main(["convert", "--from", str(sdxl_folder), "--to", str(merged), "--format", "original",
                 "--merge-lora", f"{kohya}:0.5"]) == 0
    want = L.apply_loras(ldmkit.load(sdxl_folder), [(str(kohya), 0.5)]).state_dict()
    got = ldmkit.load(merged).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert not torch.equal(want["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"],
                           ldm.state_dict()["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"])


def test_sdxl_lora_saved_by_diffusers_loads_into_ldmkit(sdxl_folder, tmp_path):  # noqa: F811 - the fixture
    """diffusers' own SDXL LoRA file (`StableDiffusionXLPipeline.save_lora_weights` of peft adapters on the
    U-Net and both text encoders, alpha != rank in its adapter metadata) reads in ldmkit as the same ΔW per layer."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    import ldmkit

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), local_files_only=True)
    layers, metas = {}, {}
    for name, targets in (("unet", ["to_q", "to_v"]), ("text_encoder", ["q_proj", "fc1"]), ("text_encoder_2", ["k_proj", "out_proj"])):
        cfg = LoraConfig(r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False)
        inject_adapter_in_model(cfg, getattr(pipe, name))  # peft itself (transformers' add_adapter wants peft >= 0.22)
        layers[name] = get_peft_model_state_dict(getattr(pipe, name))
        meta = cfg.to_dict()
        meta["target_modules"] = sorted(meta["target_modules"])
        metas[name] = meta
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"], unet_lora_adapter_metadata=metas["unet"],
        text_encoder_lora_adapter_metadata=metas["text_encoder"], text_encoder_2_lora_adapter_metadata=metas["text_encoder_2"],
        safe_serialization=True)  # fmt: skip
    file = tmp_path / "pytorch_lora_weights.safetensors"
    ldm = ldmkit.load(sdxl_folder)
    lora = L.load_lora(file, ldm)
    assert {p.split(".")[0] for p in lora} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(a.alpha == 6.0 and a.rank == 2 for a in lora.values())
    for name, sd in layers.items():
        for key, down in sd.items():
            if ".lora_A." not in key:
                continue
            path = f"{name}.{key.removesuffix('.lora_A.weight')}"
            want = 3.0 * sd[key.replace(".lora_A.", ".lora_B.")] @ down  # (α / r) B A
            assert torch.equal(lora[path].down, down) and (lora[path].delta() - want).abs().max() <= 1e-6, path
    L.merge_lora(ldm, lora)  # every path names a layer of ldmkit's SDXL model


def test_full_size_sdxl_kohya_names_are_sd_scripts_and_read_back_through_diffusers():
    """The real SDXL U-Net (meta device): a bare ldmkit SDXL U-Net is recognised as SDXL and gets the
    original-layout names sd-scripts writes for SDXL (depth 10 at input_blocks.7–8, the middle block and
    output_blocks.0–2), and diffusers' SDXL reader maps every one of them back to ldmkit's module path."""
    from ldmkit.unet import UNet, unet_sdxl
    from test_sdxl_files import SDXL_UNET

    with torch.device("meta"):
        unet = UNet(unet_sdxl())
    assert L.is_sdxl(unet) and L.family(unet) == "SDXL"
    paths = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and ".transformer_blocks." in n]
    lora = {f"unet.{p}": L.Adapter(torch.zeros(1, 1), torch.zeros(1, 1), 1.0) for p in paths}
    sd, _ = L.to_state_dict(lora, "kohya", unet)
    names = {k.split(".")[0] for k in sd}
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k",
                 "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj", "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_out_0",
                 "lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_2"):  # fmt: skip
        assert name in names, name
    with torch.device("meta"):
        config = diffusers.UNet2DConditionModel(**SDXL_UNET).config
    theirs, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(dict(sd), config))
    theirs = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in theirs.items()})
    assert {k.removesuffix(".lora_A.weight") for k in theirs if ".lora_A." in k} == set(paths)
