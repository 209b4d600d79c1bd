"""generate(model, request): any size, resize modes, hires fix, the seed rule, img2img's step count, LoRA tags
in prompts, and the request's refusals. Tiny random models; the values are pinned against what the
definitions say (diffusers' int(strength · steps), A1111's resize modes and hires pass)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from ldmkit.errors import LdmkitError
from ldmkit.generation import GenerationRequest, HiresPass, fit, generate, granularity, split_loras
from ldmkit.generation.compat import sample as ldm_sample
from test_routes import SIZE, make

KW = dict(steps=3, sampler="ddim", seed=1)


def steps_run(ldm, **request) -> int:
    calls = []
    generate(ldm, GenerationRequest(**request), lambda i, t, x, x0: calls.append(i), decode=False)
    return len(calls)


def test_img2img_runs_int_of_strength_times_steps_as_diffusers():
    """Defect 4: diffusers' img2img keeps int(strength · steps) steps (50 × 0.75 → 37); ldmkit kept round (38)."""
    ldm = make(None, text=False)
    x = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    assert steps_run(ldm, init_image=x, strength=0.75, steps=50, sampler="ddim") == 37
    assert steps_run(ldm, init_image=x, strength=0.5, steps=5, sampler="ddim") == 2  # 2.5 → 2, not 3
    assert steps_run(ldm, init_image=x, strength=1.0, steps=5, sampler="ddim") == 5


def test_any_multiple_of_the_granularity_and_a_clear_refusal_otherwise():
    ldm = make(None)  # f = 4 (three autoencoder levels), two U-Net levels: g = 4 · 2 = 8
    assert granularity(ldm) == 8
    out = generate(ldm, GenerationRequest(prompt="a", height=8, width=24, **KW))
    assert out.images.shape == (1, 3, 8, 24) and out.latents.shape == (1, 4, 2, 6)
    assert "Size: 24x8" in out.parameters[0]
    with pytest.raises(LdmkitError, match=r"width 20 is not a multiple of 8.*use 16 or 24"):
        generate(ldm, GenerationRequest(prompt="a", width=20, **KW))
    with pytest.raises(LdmkitError, match=r"height 4 .* use 8$"):
        generate(ldm, GenerationRequest(prompt="a", height=4, **KW))


def test_the_model_size_is_the_old_square_sample():
    """Same seed, same images: the request's defaults reproduce the square sample at the model's size."""
    ldm = make(None)
    a = generate(ldm, GenerationRequest(prompt=["a", "b"], batch_size=2, **KW)).images
    b = ldm_sample(ldm, texts=["a", "b"], **KW)
    c = generate(ldm, GenerationRequest(prompt=["a", "b"], batch_size=2, height=SIZE, width=SIZE, **KW)).images
    assert torch.equal(a, b) and torch.equal(a, c)


def test_one_generator_per_batch_seeded_seed_plus_first_index():
    ldm = make(None)
    out = generate(ldm, GenerationRequest(prompt="a", batch_size=2, n_iter=2, **KW))
    assert out.seeds == [1, 1, 3, 3] and out.images.shape[0] == 4
    second = generate(ldm, GenerationRequest(prompt="a", batch_size=2, **{**KW, "seed": 3})).images
    assert torch.equal(out.images[2:], second)
    short = generate(ldm, GenerationRequest(prompt="a", batch_size=2, num_images=3, **KW))
    assert short.seeds == [1, 1, 3] and torch.equal(short.images[:2], out.images[:2])  # the last batch is short
    assert "Batch size: 2, Batch pos: 1" in out.parameters[3] and "Seed: 3," in out.parameters[3]


def test_no_seed_draws_a_random_one_and_reports_it():
    """Defect 3: an unseeded request gave the same images every time."""
    ldm = make(None)
    a, b = (generate(ldm, GenerationRequest(prompt="a", steps=2, seed=None)) for _ in range(2))
    assert a.seeds != b.seeds and not torch.equal(a.images, b.images)
    again = generate(ldm, GenerationRequest(prompt="a", steps=2, seed=a.seeds[0]))
    assert torch.equal(again.images, a.images) and f"Seed: {a.seeds[0]}," in a.parameters[0]


def test_resize_modes_as_a1111():
    wide = torch.arange(2 * 4, dtype=torch.float).reshape(1, 1, 2, 4)  # 2 rows, 4 columns
    # 0: stretch to the size
    assert fit(wide, 4, 4, 0, "nearest").shape == (1, 1, 4, 4)
    # 1: scale to cover (4 × 8), centre-crop 4 × 4: columns 2..5 of the doubled image = columns 1, 1, 2, 2
    crop = fit(wide, 4, 4, 1, "nearest")
    assert torch.equal(crop[0, 0, 0], torch.tensor([1.0, 1.0, 2.0, 2.0]))
    # 2: scale to fit (2 × 4), centred, the top and bottom rows repeated into the border
    fill = fit(wide, 4, 4, 2, "nearest")
    assert torch.equal(fill[0, 0], torch.stack([wide[0, 0, 0], wide[0, 0, 0], wide[0, 0, 1], wide[0, 0, 1]]))
    ldm = make("inpaint")
    x = torch.rand(1, 3, SIZE, 2 * SIZE) * 2 - 1  # wider than the square output
    m = torch.zeros(1, 1, SIZE, 2 * SIZE)
    m[..., :, SIZE // 2 : SIZE + SIZE // 2] = 1
    for mode in (0, 1, 2):
        out = generate(ldm, GenerationRequest(prompt="a", init_image=x, mask=m, resize_mode=mode, **KW)).images
        assert out.shape == (1, 3, SIZE, SIZE)
    with pytest.raises(LdmkitError, match="aspect ratio"):
        generate(ldm, GenerationRequest(prompt="a", init_image=x, mask=m[..., :SIZE], **KW))


def test_inpainting_at_a_non_square_size_pastes_the_kept_pixels_back():
    ldm = make("inpaint")
    x = torch.rand(1, 3, 16, 32) * 2 - 1
    m = torch.zeros(1, 1, 16, 32)
    m[..., 4:12, 8:20] = 1
    out = generate(ldm, GenerationRequest(prompt="a", init_image=x, mask=m, height=16, width=32, **KW)).images
    assert out.shape == (1, 3, 16, 32)
    assert torch.allclose(out * (1 - m), x * (1 - m), atol=1e-6) and not torch.allclose(out, x, atol=1e-2)


def test_micro_conditions_are_the_request_size(monkeypatch):
    ldm = make(None)
    seen = []
    own = ldm.conditioner.micro_values
    monkeypatch.setattr(ldm.conditioner, "micro_values", lambda n, h, w, **kw: seen.append((h, w, kw["original"],
                                                                                            kw["target"])) or own(n, h, w, **kw))
    generate(ldm, GenerationRequest(prompt="a", height=8, width=24, **KW))
    assert set(seen) == {(8, 24, None, None)}  # None: the pass's size (Conditioner.micro_values)


def test_hires_fix_size_and_bicubic_pass_at_strength_zero_is_the_resized_first_pass():
    ldm = make(None)
    first = generate(ldm, GenerationRequest(prompt="a", height=8, width=16, **KW))
    hr = HiresPass(scale=2.0, upscaler="bicubic", denoising_strength=0.0)
    out = generate(ldm, GenerationRequest(prompt="a", height=8, width=16, hires=hr, **KW))
    assert out.images.shape == (1, 3, 16, 32)
    pixels = F.interpolate(ldm.decode(first.latents), size=(16, 32), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert torch.allclose(out.images, ldm.decode(ldm.encode_mean(pixels)), atol=1e-6)
    assert "Hires upscale: 2, Hires upscaler: Bicubic" in out.parameters[0] and "Size: 16x8" in out.parameters[0]
    # the latent upscaler, a second pass of its own step count, a target rounded down to the granularity
    calls = []
    hr = HiresPass(scale=1.7, upscaler="latent", second_pass_steps=2, denoising_strength=0.5)
    out = generate(ldm, GenerationRequest(prompt="a", height=8, width=16, hires=hr, **KW),
                   lambda i, t, x, x0: calls.append(tuple(x.shape[-2:])))
    assert out.images.shape == (1, 3, 8, 24)  # 13.6 → 8, 27.2 → 24
    assert calls == [(2, 4)] * 3 + [(2, 6)] * 2  # A1111: exactly the second pass's steps
    with pytest.raises(LdmkitError, match="upscaler"):
        generate(ldm, GenerationRequest(prompt="a", hires=HiresPass(upscaler="lanczos"), **KW))


class FakeLibrary:
    """A `Networks` that records what it applied and when it was undone."""

    def __init__(self):
        self.log = []

    @contextlib.contextmanager
    def applied(self, model, loras):
        self.log.append(("apply", sorted(loras)))
        try:
            yield {name: f"{abs(hash(name)) % 10**12:012d}" for name, _ in loras}
        finally:
            self.log.append(("undo",))


def test_lora_tags_are_taken_out_of_the_prompt_applied_for_the_request_and_named_with_their_hashes():
    assert split_loras("a <lora:cat:0.5>dog<lora:b>") == ("a dog", [("cat", 0.5), ("b", 1.0)])
    assert split_loras("<lora:x:0.3:0.9>") == ("", [("x", 0.3)])
    with pytest.raises(LdmkitError, match="<lora:x:much>"):
        split_loras("<lora:x:much>")
    ldm = make(None)
    lib = FakeLibrary()
    out = generate(ldm, GenerationRequest(prompt="<lora:cat:0.5>a", loras=[("dog", 1.0)], **KW), networks=lib)
    plain = generate(ldm, GenerationRequest(prompt="a", **KW))
    assert torch.equal(out.images, plain.images)  # the tag is not text (the fake library changes no weight)
    assert lib.log == [("apply", [("cat", 0.5), ("dog", 1.0)]), ("undo",)]
    assert 'Lora hashes: "cat: ' in out.parameters[0] and out.parameters[0].startswith("<lora:cat:0.5>a\n")
    with pytest.raises(LdmkitError, match="lora-dir"):
        generate(ldm, GenerationRequest(prompt="<lora:cat>a", **KW))

    def boom(*_):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        generate(ldm, GenerationRequest(prompt="<lora:cat>a", **KW), boom, networks=lib)
    assert lib.log[-1] == ("undo",)  # unapplied even when sampling fails


def test_request_refusals_are_one_line():
    ldm = make(None)
    for req, match in ((GenerationRequest(prompt="a", strength=2.0), "strength"),
                       (GenerationRequest(prompt="a", resize_mode=3), "resize mode"),
                       (GenerationRequest(prompt=["a", "b", "c"], num_images=2), "3 prompts for 2"),
                       (GenerationRequest(prompt="a", mask=torch.ones(1, 1, 8, 8)), "inpainting"),
                       (GenerationRequest(prompt="a", control_image=torch.ones(1, 1, 8, 8)), "ControlNet"),
                       (GenerationRequest(prompt="a", sampler="nope"), "unknown sampler")):
        with pytest.raises(LdmkitError, match=match):
            generate(ldm, req)
    with pytest.raises(LdmkitError, match="no text conditioning"):
        generate(make(None, text=False), GenerationRequest(prompt="a"))


def test_sample_command_any_size_and_hires(tmp_path, capsys):
    """`ldmkit sample --width/--height --hires-*`: the PNGs have the hires size and say so in their parameters;
    a width off the granularity is refused in one line naming the nearest sizes, before any image is written."""
    from PIL import Image

    from ldmkit.autoencoder import AutoencoderConfig
    from ldmkit.checkpoint import save_checkpoint
    from ldmkit.cli import main
    from ldmkit.conditioning import ConditionerConfig
    from ldmkit.pipeline import LatentDiffusion, LatentDiffusionConfig
    from ldmkit.unet import UNetConfig

    torch.manual_seed(0)
    ae = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), norm_groups=4)  # f = 2
    unet = UNetConfig(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), mid_attention=False,
                      num_heads=None, norm_groups=4, num_classes=3)  # two levels: g = 4
    cfg = LatentDiffusionConfig(autoencoder=ae, unet=unet, conditioner=ConditionerConfig(num_classes=3), image_size=16)
    save_checkpoint(tmp_path / "m", 1, "latent_diffusion", LatentDiffusion.from_config(cfg), cfg)
    base = ["sample", "--checkpoint", str(tmp_path / "m"), "--label", "1", "--steps", "2", "--quiet"]
    assert main(base + ["--out", str(tmp_path / "s"), "--width", "24", "--height", "8", "--hires-scale", "2",
                        "--hires-upscaler", "bicubic", "--hires-denoise", "0.5"]) == 0
    img = Image.open(tmp_path / "s" / "0000.png")
    assert img.size == (48, 16)
    assert "Size: 24x8" in img.info["parameters"] and "Hires upscale: 2, Hires upscaler: Bicubic" in img.info["parameters"]
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "bad"), "--width", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use 8 or 12" in err[0] and not (tmp_path / "bad").exists()


def test_a_negative_prompt_with_fewer_chunks_is_padded_with_the_empty_chunk_as_a1111():
    """A prompt past the CLIP window (two chunks) guided against a one-chunk negative prompt: both branches
    reach the U-Net at two chunks, the negative's second chunk the empty prompt's (A1111's CFG denoiser), not
    masked zeros."""
    from test_prompt_syntax import tiny_clip_encoder

    from ldmkit.conditioning import Conditioner, ConditionerConfig
    from ldmkit.pipeline import LatentDiffusion

    clip = tiny_clip_encoder()  # window 16: 14 tokens a chunk
    base = make(None)
    cfg = base.config.model_copy(update={"unet": base.config.unet.model_copy(update={"context_dim": clip.dim})})
    torch.manual_seed(0)
    ldm = LatentDiffusion.from_config(cfg, conditioner=Conditioner(cfg.conditioner, text_encoder=clip)).eval()
    seen = []
    forward = ldm.unet.forward

    def spy(x, t, cond=None, **kw):
        seen.append(cond.context.clone())
        return forward(x, t, cond, **kw)

    ldm.unet.forward = spy
    long_prompt, negative = "cat " * 20, "cat"
    generate(ldm, GenerationRequest(prompt=long_prompt, negative_prompt=negative, guidance=3.0, steps=1,
                                    sampler="ddim", seed=0), decode=False)
    ctx = seen[0]  # (2, 32, D): [uncond; cond] stacked for guidance
    assert ctx.shape[:2] == (2, 2 * clip.window)
    empty = clip([""], syntax=True)[0][0]  # (16, D): the empty prompt's chunk
    own = clip([negative], syntax=True)[0][0]
    torch.testing.assert_close(ctx[0, : clip.window], own, rtol=0, atol=0)
    torch.testing.assert_close(ctx[0, clip.window :], empty, rtol=0, atol=0)


def test_the_hires_pass_runs_exactly_its_own_steps_as_a1111():
    """A1111 (sd_samplers_common.setup_img2img_steps with steps given) stretches the second pass's schedule to
    int(steps / denoising_strength) so it runs exactly `hr_second_pass_steps` (or the first pass's steps);
    the server's progress counts the same."""
    ldm = make(None)
    assert steps_run(ldm, prompt="a", steps=3, sampler="ddim", hires=HiresPass(scale=2, second_pass_steps=2,
                                                                                 denoising_strength=0.5)) == 3 + 2
    assert steps_run(ldm, prompt="a", steps=3, sampler="ddim", hires=HiresPass(scale=2, denoising_strength=0.3)) == 3 + 3
