"""Same seed, same image as diffusers at a non-square size: a tiny random Stable Diffusion pipeline read by
ldmkit, generated through `generate` at 16×24 / 24×16 (the tiny model's 512×768), against diffusers'
StableDiffusionPipeline, StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline given only the
seed (their own noise from their own generator), within 2/255 per pixel, batch 1 and 4."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ldmkit.generation import GenerationRequest, generate  # noqa: E402
from ldmkit.interop.diffusers import load_diffusers_pipeline  # noqa: E402
from test_interop import ref_pipe, sd_folder, tiny_diffusers_parts  # noqa: E402, F401 (fixtures)

TOL = 2 / 255 * 2  # 2/255 of [0, 1] in ldmkit's [-1, 1]
PROMPTS = ["a cat", "cat", "a", "tac a"]


def ldm_request(ldm, **kw) -> GenerationRequest:
    # SD's DDIMScheduler has set_alpha_to_one=False: its last step ends at ᾱ_0, not at ᾱ = 1
    final = ldm.schedule.alphas_cumprod[0].item()
    return GenerationRequest(sampler="ddim", seed=0, sampler_options={"final_alpha_cumprod": final}, **kw)


@pytest.mark.parametrize("batch,height,width", [(1, 16, 24), (4, 24, 16)])
def test_text_to_image_at_a_non_square_size_matches_diffusers(sd_folder, ref_pipe, batch, height, width):  # noqa: F811
    ldm = load_diffusers_pipeline(sd_folder)
    prompts = PROMPTS[:batch]
    ours = generate(ldm, ldm_request(ldm, prompt=prompts, batch_size=batch, height=height, width=width, steps=3,
                                     guidance=4.0)).images
    ref = ref_pipe(prompts, height=height, width=width, num_inference_steps=3, guidance_scale=4.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images  # (B, 3, H, W) in [0, 1]
    assert ours.shape == ref.shape == (batch, 3, height, width)
    assert (ours - (ref * 2 - 1)).abs().max() <= TOL


@pytest.mark.parametrize("batch", [1, 4])
def test_img2img_at_a_non_square_size_matches_diffusers(sd_folder, ref_pipe, batch):  # noqa: F811
    """diffusers samples the posterior of the init image with the generator; ldmkit takes its mean. Handing
    diffusers that mean (a 4-channel `image` is read as latents) leaves the noise, the timesteps
    (int(0.75 · 4) = 3 steps) and the sampler to compare."""
    ldm = load_diffusers_pipeline(sd_folder)
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**ref_pipe.components)
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(5)) * 2 - 1
    prompts = PROMPTS[:batch]
    ours = generate(ldm, ldm_request(ldm, prompt=prompts, batch_size=batch, height=16, width=24, steps=4, guidance=4.0,
                                     init_image=x, strength=0.75)).images
    ref = pipe(prompts, image=ldm.encode_mean(x), strength=0.75, num_inference_steps=4, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert ours.shape == ref.shape == (batch, 3, 16, 24)
    assert (ours - (ref * 2 - 1)).abs().max() <= TOL


def test_inpainting_at_a_non_square_size_matches_diffusers(tmp_path):
    """A tiny SD inpainting pipeline (9-channel U-Net). diffusers samples the masked image's posterior with
    the generator; it is handed ldmkit's mean as `masked_image_latents`. The hole lies on whole latent cells,
    where ldmkit's max-pooled mask and diffusers' nearest-resized one agree; no paste-back or pinning (diffusers'
    9-channel pipeline does neither)."""
    parts = tiny_diffusers_parts()
    torch.manual_seed(4)
    unet = diffusers.UNet2DConditionModel(**{**parts["unet"].config, "in_channels": 9})
    from test_interop import perturb

    parts["unet"] = perturb(unet.eval(), seed=6)
    pipe = diffusers.StableDiffusionInpaintPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False)
    pipe.save_pretrained(str(tmp_path / "inpaint"))
    ldm = load_diffusers_pipeline(tmp_path / "inpaint")
    assert ldm.config.concat.kind == "inpaint"
    x = torch.rand(1, 3, 24, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    m = torch.zeros(1, 1, 24, 16)
    m[..., 6:18, 4:12] = 1  # whole 2×2 cells (f = 2)
    ours = generate(ldm, ldm_request(ldm, prompt=["a cat", "cat"], batch_size=2, height=24, width=16, steps=3,
                                     guidance=4.0, init_image=x, mask=m, keep_known=False, overlay=False)).images
    masked = ldm.encode_mean(x * (1 - m))
    ref = pipe(["a cat", "cat"], image=(x + 1) / 2, mask_image=m, masked_image_latents=masked, height=24, width=16,
               num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    assert ours.shape == ref.shape == (2, 3, 24, 16)
    assert (ours - (ref * 2 - 1)).abs().max() <= TOL
