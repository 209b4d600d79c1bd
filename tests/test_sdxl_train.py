"""`ldmkit train --init-from` an SDXL model (the tiny StableDiffusionXLPipeline of test_sdxl.py), a couple of steps on
bundled data: the whole U-Net, and LoRA on the U-Net and both text encoders (CLIP ViT-L and OpenCLIP bigG); each
run's checkpoint loads back as an SDXL model, and the LoRA file, read by diffusers' `load_lora_weights`, gives the
prompt embeddings and U-Net outputs of the checkpoint ldmkit wrote (the adapter folded in)."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from ldmkit.cli import main  # noqa: E402
from ldmkit.conditioning.conditioner import sdxl_vector  # noqa: E402
from ldmkit.interop.convert import load_any  # noqa: E402
from test_sdxl import POOLED, sdxl_folder, unet_inputs  # noqa: E402, F401 - the fixture

pytestmark = pytest.mark.slow  # two training runs, ~25 s each on one core


def train(folder, out, *extra):
    return main(["train", "--config", "tiny", "--init-from", str(folder), "--out", str(out), "--quiet",
                 "--set", "optim.steps=2", "--set", "optim.lr=0.05", "--set", "optim.warmup_steps=0",
                 "--set", "optim.ema_decay=null", *extra])


@pytest.mark.parametrize("what", ["unet", "unet+text"])
def test_init_from_sdxl_trains_the_whole_unet_and_the_encoders(sdxl_folder, tmp_path, what):  # noqa: F811
    """The whole U-Net (and with unet+text both encoders: every weight the context and pooled output depend on,
    i.e. all but ViT-L's last layer and final norm, which SDXL's penultimate-layer context never reads)."""
    from ldmkit.conditioning.text import SDXLTextEncoder

    assert train(sdxl_folder, tmp_path / "run", "--set", f"finetune.train={what}") == 0
    base, ldm = load_any(sdxl_folder), load_any(tmp_path / "run")
    assert isinstance(ldm.conditioner.text_encoder, SDXLTextEncoder)
    c = ldm.config.conditioner
    assert c.pooled_text and c.micro_conditioning and c.zero_uncond and ldm.config.unet == base.config.unet
    moved = [k for k, v in ldm.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert len(moved) > len(ldm.unet.state_dict()) // 2
    te, te0 = ldm.conditioner.text_encoder.model.state_dict(), base.conditioner.text_encoder.model.state_dict()
    still = {k for k in te if torch.equal(te[k], te0[k])}
    assert te.keys() == te0.keys()
    if what == "unet":
        assert still == set(te)  # frozen
    else:
        last = ldm.conditioner.text_encoder.first.model.config.num_hidden_layers - 1
        assert still == {k for k in te if k.startswith("text_encoder.") and (f"layers.{last}." in k or "final_layer_norm" in k)}


def test_lora_on_the_unet_and_both_text_encoders_loads_into_diffusers(sdxl_folder, tmp_path):  # noqa: F811
    out = tmp_path / "lora"
    assert train(sdxl_folder, out, "--set", "finetune.train=lora", "--set", "lora.rank=4",
                 "--set", "lora.text_encoder=true") == 0
    keys = load_file(str(out / "lora.safetensors"))
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    ckpt = out / "checkpoints" / "step_00000002"
    assert (ckpt / "text_encoder_2" / "config.json").is_file() and (ckpt / "tokenizer_2").is_dir()
    ldm = load_any(out)  # the checkpoint: base + adapter folded in
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder), local_files_only=True)
    with torch.no_grad():
        pe0, _, pp0, _ = pipe.encode_prompt(["a red square"], device="cpu", do_classifier_free_guidance=False)
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    with torch.no_grad():
        pe, _, pp, _ = pipe.encode_prompt(["a red square"], device="cpu", do_classifier_free_guidance=False)
    enc = ldm.conditioner.text_encoder
    ctx, pooled = enc(["a red square"])[0], enc.pooled(["a red square"])
    assert (ctx - pe).abs().max() <= 1e-5 and (pooled - pp).abs().max() <= 1e-5
    assert (pe - pe0).abs().max() > 1e-3 and (pp - pp0).abs().max() > 1e-3  # both encoders' adapters trained
    x, t, c, p, time_ids = unet_inputs()
    with torch.no_grad():
        ref = pipe.unet(x, t, c, added_cond_kwargs={"text_embeds": p, "time_ids": time_ids}).sample
        ours = ldm.unet(x, t, context=c, vector=sdxl_vector(p, time_ids))
    assert p.shape[1] == POOLED and (ours - ref).abs().max() <= 1e-4
