"""The SDXL refiner (Podell et al. 2023, §2.5) pinned to diffusers' StableDiffusionXLImg2ImgPipeline: OpenCLIP bigG
alone (its penultimate layer the context, its projected pooled output on the vector route), the U-Net's
`add_embedding` fed five micro-conditions (original size, crop, aesthetic score) where the base takes six, and the
two branches of guidance given different scores (6 and 2.5 by default). Tiny random models; nothing downloaded."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ldmkit.errors import LdmkitError  # noqa: E402
from test_sdxl import POOLED, TOL, _state, perturb, tiny_sdxl_parts, tiny_sdxl_unet  # noqa: E402


def tiny_refiner_pipeline():
    """The refiner's layout in small: four levels, attention at the middle two (and the middle block), a 24-wide
    context (bigG alone), add_embedding over the pooled 24 + 5·256 values; force_zeros_for_empty_prompt off as in
    stabilityai/stable-diffusion-xl-refiner-1.0's model_index.json."""
    parts = tiny_sdxl_parts()
    unet = tiny_sdxl_unet(
        block_out_channels=(16, 32, 32, 32), attention_head_dim=(2, 4, 4, 4), transformer_layers_per_block=(1, 1, 2, 1),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24, projection_class_embeddings_input_dim=POOLED + 5 * 256,
    )  # fmt: skip
    ddim = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False,
        set_alpha_to_one=False, timestep_spacing="leading",
    )  # fmt: skip
    return diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=parts["vae"], text_encoder=None, tokenizer=None, text_encoder_2=parts["text_encoder_2"],
        tokenizer_2=parts["tokenizer_2"], unet=perturb(unet, seed=7), scheduler=ddim, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)


@pytest.fixture(scope="module")
def refiner_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refiner") / "pipe"
    tiny_refiner_pipeline().save_pretrained(str(folder))
    return folder


def test_refiner_folder_loads_and_round_trips(refiner_folder, tmp_path):
    import ldmkit
    from ldmkit.interop.diffusers import save_diffusers_pipeline

    ldm = ldmkit.load(refiner_folder)
    c, enc = ldm.config.conditioner, ldm.conditioner.text_encoder
    assert c.aesthetic_score and c.micro_conditioning and not c.zero_uncond and enc.first is None
    assert ldm.conditioner.micro_fields[-1] == "aesthetic score" and ldm.unet.config.vector_dim == POOLED + 5 * 256
    out = save_diffusers_pipeline(ldm, tmp_path / "back")
    ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(refiner_folder), local_files_only=True)
    back = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(out), local_files_only=True)
    assert back.config.requires_aesthetics_score and back.text_encoder is None and not back.config.force_zeros_for_empty_prompt
    for part in ("unet", "vae", "text_encoder_2"):
        a, b = _state(getattr(ref, part)), _state(getattr(back, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert ldmkit.load(out).config.conditioner == c.model_copy(update={"text_encoder": str(out.resolve())})


@pytest.mark.parametrize("scores", [{}, {"aesthetic_score": 8.0, "negative_aesthetic_score": 1.0}])
def test_refiner_img2img_matches_diffusers(refiner_folder, scores):
    """img2img at 32×48 (4 levels: granularity 16), DDIM, 4 steps at strength 0.75 (3 run), guidance 4, with a negative
    prompt; diffusers is handed the init image's posterior mean as latents (it samples the posterior, ldmkit takes
    the mean). The conditional branch's micro-conditions end in the aesthetic score, the unconditional's in the
    negative one; with the two scores equal the image changes."""
    from ldmkit.generation import GenerationRequest, generate
    from ldmkit.interop.diffusers import load_diffusers_pipeline

    ldm = load_diffusers_pipeline(refiner_folder)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(refiner_folder), local_files_only=True)
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1
    final = ldm.schedule.alphas_cumprod[0].item()  # set_alpha_to_one=False
    kw = dict(prompt=["a cat", "two cats"], negative_prompt="blurry", batch_size=2, height=32, width=48, steps=4,
              guidance=4.0, sampler="ddim", seed=0, init_image=x, strength=0.75,
              sampler_options={"final_alpha_cumprod": final})
    ours = generate(ldm, GenerationRequest(**kw, **scores)).images
    ref = pipe(kw["prompt"], negative_prompt="blurry", image=ldm.encode_mean(x), strength=0.75, num_inference_steps=4,
               guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="pt", **scores).images
    assert ours.shape == ref.shape == (2, 3, 32, 48) and ref.std() > 0.05
    assert (ours - (ref * 2 - 1)).abs().max() <= TOL
    same = generate(ldm, GenerationRequest(**kw, negative_aesthetic_score=scores.get("aesthetic_score", 6.0))).images
    assert (same - ours).abs().max() > 10 * TOL


def test_refiner_refuses_a_target_size(refiner_folder):
    from ldmkit.generation import GenerationRequest
    from ldmkit.interop.diffusers import load_diffusers_pipeline

    with pytest.raises(LdmkitError, match="an SDXL refiner takes no target size"):
        GenerationRequest(prompt="a", target_size=(32, 32)).check(load_diffusers_pipeline(refiner_folder))


def test_refiner_single_file_round_trip_and_diffusers_reads_it(refiner_folder, tmp_path):
    """The refiner's single file (`sgm`: OpenCLIP bigG alone as conditioner.embedders.0.model.*, label_emb over
    1280 + 5·256 in the real one): diffusers' `from_single_file` (config = the folder, offline) rebuilds the source
    pipeline exactly; ldmkit reads it back as the same refiner, and as other tools write it (no ldmkit metadata)
    with the folder as config; file → ldmkit → file is bit-identical."""
    from safetensors.torch import load_file

    import ldmkit
    from ldmkit.interop.original import load_original, save_original

    ldm = ldmkit.load(refiner_folder)
    path = save_original(ldm, tmp_path / "refiner.safetensors")
    file = load_file(str(path))
    assert "conditioner.embedders.0.model.text_projection" in file and "model.diffusion_model.label_emb.0.0.weight" in file
    assert not any(k.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer.")) for k in file)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_single_file(str(path), config=str(refiner_folder),
                                                                        local_files_only=True)
    ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(refiner_folder), local_files_only=True)
    for part in ("unet", "vae", "text_encoder_2"):
        a, b = _state(getattr(pipe, part)), _state(getattr(ref, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    own = ldm.state_dict()
    for back in (load_original(path), load_original(_plain(file, tmp_path), config=refiner_folder)):
        assert back.conditioner.text_encoder.first is None and back.config.conditioner.aesthetic_score
        assert back.config.model_dump(exclude={"conditioner"}) == ldm.config.model_dump(exclude={"conditioner"})
        sd = back.state_dict()
        assert sd.keys() == own.keys() and all(torch.equal(sd[k], own[k]) for k in own)
    again = load_file(str(save_original(load_original(path), tmp_path / "again.safetensors")))
    assert again.keys() == file.keys() and all(torch.equal(again[k], file[k]) for k in file)
    with pytest.raises(LdmkitError, match="not their tokenizers.*a refiner's: tokenizer_2/"):
        load_original(_plain(file, tmp_path), config=ldm.config)  # the configs, but no tokenizer


def _plain(file: dict, tmp_path):
    """The file as other tools write it: the tensors without ldmkit's metadata."""
    from safetensors.torch import save_file

    save_file(file, str(tmp_path / "plain.safetensors"))
    return tmp_path / "plain.safetensors"


def test_fine_tuning_a_refiner_is_refused_in_one_line(refiner_folder):
    """Training builds the base model's six size/crop values; the refiner takes five (with the aesthetic score):
    `train --init-from` a refiner stops before anything is built, naming what to fine-tune instead."""
    from ldmkit.train.config import ldm_tiny
    from ldmkit.train.finetune import load_init_model

    cfg = ldm_tiny()
    cfg.finetune.init_from = str(refiner_folder)
    with pytest.raises(LdmkitError, match="is an SDXL refiner .* fine-tune the SDXL base model instead"):
        load_init_model(cfg)
