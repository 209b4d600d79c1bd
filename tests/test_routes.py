"""Concatenation routes (inpainting, super-resolution), img2img strength and control at sampling time."""

import pytest
import torch

from ldmkit.autoencoder import AutoencoderConfig
from ldmkit.conditioning import Conditioner, ConditionerConfig
from ldmkit.control import Adapter, ControlNet
from ldmkit.errors import LdmkitError
from ldmkit.pipeline import ConcatConfig, DiffusionConfig, LatentDiffusion, LatentDiffusionConfig
from ldmkit.unet import UNetConfig
from ldmkit.generation.compat import sample as ldm_sample
from test_pipeline import HashTextEncoder

SIZE = 16


def make(concat=None, channel_mult=(1, 2), text=True, drop=0.0, **unet_kw) -> LatentDiffusion:
    """concat: None, "inpaint", "lowres" (encoded) or "lowres-rgb" (the RGB pixels on the latent grid)."""
    ae = AutoencoderConfig(base_channels=8, channel_mult=(1, 2, 2), norm_groups=4, scaling_factor=0.7, shift_factor=0.1)
    cc = ConcatConfig(kind=concat.split("-")[0], drop=drop, lowres_encode=concat != "lowres-rgb") if concat else None
    unet = UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=channel_mult, num_res_blocks=1,
                      attention_levels=(1,), mid_attention=True, num_heads=2, norm_groups=4, zero_init=False,
                      context_dim=8 if text else None, **{"concat_channels": cc.channels(4) if cc else 0, **unet_kw})
    cond_cfg = ConditionerConfig(text_encoder="test" if text else None)
    cfg = LatentDiffusionConfig(autoencoder=ae, unet=unet, conditioner=cond_cfg, concat=cc,
                                diffusion=DiffusionConfig(), image_size=SIZE)
    torch.manual_seed(0)
    return LatentDiffusion.from_config(cfg, conditioner=Conditioner(cond_cfg, text_encoder=HashTextEncoder() if text else None)).eval()


def images(n=2, seed=0):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def box(y0, y1, x0, x1, n=2):
    m = torch.zeros(n, 1, SIZE, SIZE)
    m[..., y0:y1, x0:x1] = 1
    return m


KW = dict(steps=3, sampler="ddim", seed=1, return_latents=True)


@pytest.mark.parametrize("channel_mult", [(1, 2), (1, 2, 2)])
@pytest.mark.parametrize("kind", ["inpaint", "lowres", "lowres-rgb"])
def test_concat_shapes_at_every_injection_point(kind, channel_mult):
    ldm = make(kind, channel_mult)
    x, m = images(), box(2, 8, 2, 8)
    c = ldm.concat_condition(x, m)
    h = SIZE // 4
    assert c.shape == (2, {"inpaint": 5, "lowres": 4, "lowres-rgb": 3}[kind], h, h)
    if kind == "lowres-rgb":  # s = f = 4: the area-downsampled pixels themselves
        torch.testing.assert_close(c, torch.nn.functional.avg_pool2d(x, 4))
    if kind == "inpaint":
        assert c[:, 0].sum() > 0 and set(c[:, 0].unique().tolist()) <= {0.0, 1.0}  # the mask channel comes first (SD)
    z = torch.randn(2, 4, h, h)
    loss = ldm.loss(z, texts=["a", "b"], images=x, masks=m, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    # a ControlNet copied from a concat U-Net takes the same concat and fits every skip connection
    net = ControlNet.from_unet(ldm.unet, hint_channels=1, latent_factor=4)
    down, mid = net(z, torch.tensor([5, 5]), torch.rand(2, 1, SIZE, SIZE), context=torch.randn(2, 3, 8), concat=c)
    assert [d.shape[1] for d in down] == [ch for ch, _ in ldm.unet.skip_channels()]
    out = ldm.unet(z, torch.tensor([5, 5]), context=torch.randn(2, 3, 8), concat=c, down_residuals=down, mid_residual=mid)
    assert out.shape == z.shape
    assert ldm_sample(ldm, texts=["a", "b"], init_image=x, mask=m if kind == "inpaint" else None, **KW).shape == z.shape


def test_inpaint_output_follows_mask_and_kept_pixels_only():
    ldm = make("inpaint")
    x, m = images(), box(2, 8, 2, 8)
    a = ldm_sample(ldm, texts=["a", "b"], init_image=x, mask=m, **KW)
    assert torch.equal(a, ldm_sample(ldm, texts=["a", "b"], init_image=x, mask=m, **KW))
    assert not torch.allclose(a, ldm_sample(ldm, texts=["a", "b"], init_image=x, mask=box(6, 14, 6, 14), **KW))
    y = x.clone()
    y[..., 8:, 8:] = -x[..., 8:, 8:]  # change kept pixels → a different condition
    assert not torch.allclose(a, ldm_sample(ldm, texts=["a", "b"], init_image=y, mask=m, **KW))
    y = torch.where(m.bool(), -x, x)  # change only pixels inside the hole → the same condition
    free = dict(KW, keep_known=False)  # the network route alone (pinning reads the whole image's latent)
    assert torch.equal(ldm_sample(ldm, texts=["a", "b"], init_image=x, mask=m, **free),
                       ldm_sample(ldm, texts=["a", "b"], init_image=y, mask=m, **free))


def test_inpaint_pins_untouched_latent_cells_to_the_image_latent():
    ldm = make("inpaint")
    x, m = images(), box(2, 8, 2, 8)  # pixels 2..7 → latent cells 0..1 at f=4
    z = ldm_sample(ldm, texts=["a", "b"], init_image=x, mask=m, **KW)  # return_latents
    known = ldm.encode_mean(x)
    keep = torch.ones_like(z[:, :1], dtype=torch.bool)
    keep[..., :2, :2] = False
    assert torch.equal(z[keep.expand_as(z)], known[keep.expand_as(z)])
    assert not torch.allclose(z[..., :2, :2], known[..., :2, :2])  # the hole is generated, not copied
    free = ldm_sample(ldm, texts=["a", "b"], init_image=x, mask=m, keep_known=False, **KW)
    assert not torch.allclose(free[keep.expand_as(z)], known[keep.expand_as(z)])


def test_inpaint_output_keeps_the_kept_pixels_exactly_and_the_decoded_image_does_not():
    ldm = make("inpaint")
    x, m = images(), box(2, 8, 2, 8)
    kw = dict(KW, return_latents=False)
    out = ldm_sample(ldm, texts=["a", "b"], init_image=x, mask=m, **kw)
    decoded = ldm_sample(ldm, texts=["a", "b"], init_image=x, mask=m, overlay=False, **kw)
    keep = (1 - m).bool().expand_as(x)
    assert torch.equal(out[keep], x[keep])  # pasted back
    assert not torch.allclose(decoded[keep], x[keep], atol=1e-2)  # the decoder alone cannot keep them
    assert torch.equal(out[~keep], decoded[~keep])  # the hole is the network's


@pytest.mark.parametrize("kind", ["lowres", "lowres-rgb"])
def test_lowres_output_follows_the_low_resolution_image_only(kind):
    ldm = make(kind)
    x = images()
    a = ldm_sample(ldm, texts=["a", "b"], init_image=x, **KW)
    assert not torch.allclose(a, ldm_sample(ldm, texts=["a", "b"], init_image=images(seed=5), **KW))
    # detail that averages out in the 4x4 area downsampling is invisible to the route
    checker = (torch.arange(SIZE)[:, None] + torch.arange(SIZE)[None]) % 2 * 0.2 - 0.1
    assert torch.allclose(ldm.concat_condition(x + checker), ldm.concat_condition(x), atol=1e-5)


def test_dropping_every_condition_equals_the_unconditional_branch():
    ldm = make("inpaint", drop=0.5)
    ldm.conditioner.cfg = ldm.conditioner.cfg.model_copy(update={"drop_text": 1.0})
    ldm.config.concat.drop = 1.0
    g = torch.Generator().manual_seed(0)
    cond = ldm.conditioner(texts=["a b", "c"], batch_size=2, train=True, generator=g)
    unc = ldm.conditioner.uncond(2)
    assert torch.equal(cond.context, unc.context) and torch.equal(cond.context_mask, unc.context_mask)
    assert not ldm.concat_condition(images(), box(2, 8, 2, 8), train=True, generator=g).any()
    # guidance 0 is the unconditional branch alone: every condition (concat included) is gone
    ldm.config.concat.drop = 0.5
    free = dict(KW, keep_known=False)  # the network alone, without pinning kept cells to the image
    a = ldm_sample(ldm, texts=["a", "b"], init_image=images(), mask=box(2, 8, 2, 8), guidance=0.0, **free)
    b = ldm_sample(ldm, texts=["x y", "z"], init_image=images(seed=3), mask=box(0, 16, 0, 16), guidance=0.0, **free)
    assert torch.allclose(a, b, atol=1e-5)


def test_sd_style_inpainting_guidance_keeps_the_concat_in_both_branches():
    ldm = make("inpaint", drop=0.0)
    free = dict(KW, keep_known=False)
    a = ldm_sample(ldm, texts=["a", "b"], init_image=images(), mask=box(2, 8, 2, 8), guidance=0.0, **free)
    b = ldm_sample(ldm, texts=["a", "b"], init_image=images(seed=3), mask=box(2, 8, 2, 8), guidance=0.0, **free)
    assert not torch.allclose(a, b)


def test_img2img_strength_zero_is_the_encode_decode_and_one_ignores_the_image():
    ldm = make(None)
    x = images()
    z0 = ldm_sample(ldm, texts=["a", "b"], init_image=x, strength=0.0, **KW)
    ae = ldm.autoencoder
    assert torch.allclose(z0, (ae.encode(x).mean - ae.config.shift_factor) * ae.config.scaling_factor)
    img = ldm_sample(ldm, texts=["a", "b"], init_image=x, strength=0.0, steps=3, seed=1)
    assert torch.allclose(img, ldm.decode(z0))
    full = ldm_sample(ldm, texts=["a", "b"], **KW)
    assert torch.equal(full, ldm_sample(ldm, texts=["a", "b"], init_image=x, strength=1.0, **KW))
    half = ldm_sample(ldm, texts=["a", "b"], init_image=x, strength=0.5, steps=4, sampler="ddim", seed=1, return_latents=True)
    assert not torch.allclose(half, full[:, :, :, :]) and not torch.allclose(half, z0)


def test_random_training_masks_follow_their_modes():
    ldm = make("inpaint")
    g = torch.Generator().manual_seed(0)
    ds = box(3, 9, 4, 7, n=64)
    for modes, check in [((1, 0, 0, 0), lambda m: ((m.mean((1, 2, 3)) >= 1 / 16 - 0.05) & (m.mean((1, 2, 3)) <= 9 / 16 + 0.05)).all()),
                         ((0, 1, 0, 0), lambda m: torch.equal(m, ds)),
                         ((0, 0, 1, 0), lambda m: bool((m == 1).all())),
                         ((0, 0, 0, 1), lambda m: bool((m == 0).all()))]:
        ldm.config.concat.mask_modes = modes
        assert check(ldm.random_masks(64, SIZE, ds, g))


def test_sigma_spacings_through_the_pipeline():
    """`sample(sigmas=...)`: a different trajectory from the timestep spacing, img2img starting at the
    right level (strength 0: the encode-decode), and pinned inpainting cells kept under it too."""
    ldm = make("inpaint")
    x, m = images(), box(2, 8, 2, 8)
    base = ldm_sample(ldm, texts=["a", "b"], init_image=x, mask=m, **KW)
    karras = ldm_sample(ldm, texts=["a", "b"], init_image=x, mask=m, sigmas="karras", **KW)
    assert karras.shape == base.shape and not torch.allclose(karras, base)
    keep = torch.ones_like(karras[:, :1], dtype=torch.bool)
    keep[..., :2, :2] = False
    known = ldm.encode_mean(x)
    assert torch.allclose(karras[keep.expand_as(karras)], known[keep.expand_as(known)], atol=1e-5)
    plain = make(None)
    z0 = ldm_sample(plain, texts=["a", "b"], init_image=x, strength=0.0, sigmas="exponential", **KW)
    assert torch.equal(z0, plain.encode_mean(x))
    half = ldm_sample(plain, texts=["a", "b"], init_image=x, strength=0.5, sigmas="exponential", **KW)
    assert torch.isfinite(half).all() and not torch.allclose(half, z0)
    with pytest.raises(LdmkitError, match="karras, exponential"):
        ldm_sample(plain, texts=["a"], sigmas="beta", **KW)


def test_negative_prompt_replaces_the_empty_caption_in_the_unconditional_branch():
    ldm = make(None)
    kw = dict(KW, guidance=3.0)
    plain = ldm_sample(ldm, texts=["a", "b"], **kw)
    assert torch.equal(ldm_sample(ldm, texts=["a", "b"], negative_prompt="", **kw), plain)  # '' is the default branch
    neg = ldm_sample(ldm, texts=["a", "b"], negative_prompt="c", **kw)
    assert not torch.allclose(neg, plain)
    assert torch.equal(ldm_sample(ldm, texts=["a", "b"], negative_prompt=["c", "c"], **kw), neg)  # one per sample
    assert torch.equal(ldm_sample(ldm, texts=["a", "b"], negative_prompt="c", **dict(kw, guidance=1.0)),
                       ldm_sample(ldm, texts=["a", "b"], **dict(kw, guidance=1.0)))  # no guidance, no effect
    with pytest.raises(LdmkitError, match="negative prompts for 2"):
        ldm_sample(ldm, texts=["a", "b"], negative_prompt=["c", "d", "e"], **kw)
    with pytest.raises(LdmkitError, match="text-conditioned"):
        ldm_sample(make(None, text=False), num_samples=2, negative_prompt="c", **kw)


def test_object_masks_are_the_grown_box_around_the_shape():
    from ldmkit.conditioning.concat import mask_box

    ldm = make("inpaint")
    ds = box(3, 9, 4, 7, n=64)
    ldm.config.concat.mask_modes = (0, 0, 0, 0, 1)
    m = ldm.random_masks(64, SIZE, ds, torch.Generator().manual_seed(0))
    assert bool((m >= ds).all())  # the whole shape is in the hole
    # grown by 1/16 … 1/8 of the 16-px side, i.e. 1 or 2 px each side of the box's 3 columns
    assert {int(r.sum(-1).amax()) - 3 for r in m[:, 0]} == {2, 4}
    assert torch.equal(mask_box(torch.zeros(1, 8, 8), 2), torch.zeros(1, 8, 8))
    corner = torch.zeros(1, 8, 8)
    corner[0, 0, 0] = 1
    assert int(mask_box(corner, 2).sum()) == 9  # clipped at the image border


def test_bad_images_and_masks_give_one_clear_error():
    ldm = make("inpaint")
    x, m = images(), box(2, 8, 2, 8)
    ok = ldm_sample(ldm, texts=["a", "b"], init_image=x, mask=m, **KW)
    # convertible: an RGB mask, a batch of 1, a different square size
    assert torch.allclose(ok, ldm_sample(ldm, texts=["a", "b"], init_image=x, mask=m.expand(-1, 3, -1, -1), **KW), atol=1e-6)
    ldm_sample(ldm, texts=["a", "b"], init_image=x[:1], mask=m[:1], **KW)
    ldm_sample(ldm, texts=["a", "b"], init_image=torch.rand(1, 3, 32, 32) * 2 - 1, mask=torch.ones(1, 1, 8, 8), **KW)
    bad = [dict(init_image=x, mask=torch.ones(2, 5, SIZE, SIZE)),  # channels
           dict(init_image=torch.rand(2, 3, 16, 20), mask=m),  # aspect
           dict(init_image=x, mask=torch.ones(3, 1, SIZE, SIZE)),  # batch
           dict(init_image=(x * 127).to(torch.uint8), mask=m),  # dtype
           dict(init_image=x[0, 0], mask=m),  # rank
           dict(init_image=x),  # no mask
           dict(mask=m)]  # no image
    for kw in bad:
        with pytest.raises(LdmkitError):
            ldm_sample(ldm, texts=["a", "b"], **KW, **kw)


def test_a_model_without_the_route_refuses_its_input_by_name():
    ldm = make(None)
    with pytest.raises(LdmkitError, match="inpainting"):
        ldm_sample(ldm, texts=["a"], init_image=images(1), mask=box(0, 4, 0, 4, n=1), **KW)
    with pytest.raises(LdmkitError, match="ControlNet"):
        ldm_sample(ldm, texts=["a"], control_image=torch.rand(1, 1, SIZE, SIZE), **KW)
    with pytest.raises(LdmkitError, match="strength"):
        ldm_sample(ldm, texts=["a"], init_image=images(1), strength=1.5, **KW)
    with pytest.raises(LdmkitError, match="concat"):
        make(None, concat_channels=3)


@pytest.mark.parametrize("cls", [ControlNet, Adapter])
def test_control_at_initialisation_leaves_samples_unchanged_and_trained_control_changes_them(cls):
    ldm = make(None)
    net = cls.from_unet(ldm.unet, hint_channels=1, latent_factor=4)
    ctrl = torch.rand(1, 1, SIZE, SIZE)
    base = ldm_sample(ldm, texts=["a", "b"], guidance=2.0, **KW)
    assert torch.allclose(base, ldm_sample(ldm, texts=["a", "b"], guidance=2.0, control=net, control_image=ctrl, **KW), atol=1e-6)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a = ldm_sample(ldm, texts=["a", "b"], guidance=2.0, control=net, control_image=ctrl, **KW)
    assert not torch.allclose(base, a)
    assert not torch.allclose(a, ldm_sample(ldm, texts=["a", "b"], guidance=2.0, control=net, control_image=1 - ctrl, **KW))
    assert torch.allclose(base, ldm_sample(ldm, texts=["a", "b"], guidance=2.0, control=net, control_image=ctrl, control_scale=0.0, **KW), atol=1e-6)


def test_route_metrics_on_known_inputs():
    from ldmkit.evaluate.routes import iou, masked_psnr, shape_mask

    m = box(2, 8, 2, 8)
    img = torch.where(m.bool(), torch.tensor([0.8, -0.7, -0.7])[None, :, None, None], torch.tensor(-1.0))
    assert torch.equal(shape_mask(img), m)
    assert torch.allclose(iou(m, m), torch.ones(2)) and torch.allclose(iou(m, box(2, 8, 2, 5)), torch.full((2,), 0.5))
    noisy = img + 0.2 * m  # error only inside the mask: the kept region is perfect
    assert (masked_psnr(noisy, img, 1 - m) > 90).all()
    assert torch.allclose(masked_psnr(noisy, img, m), torch.full((2,), 20.0), atol=1e-3)  # 0.1 on [0, 1] → 20 dB


class _Oracle:
    """A stand-in LatentDiffusion for the control evaluation: with the route (scale 1) it paints the
    control map in the caption's colour; without it (scale 0) a square in the caption's quadrant,
    nothing for an empty caption. What the judge must read back from it is known exactly."""

    class config:
        image_size, concat = 32, None

        class conditioner:
            text_encoder, num_classes = "fake", 0

    @staticmethod
    def sample(texts, labels=None, num_samples=None, control=None, control_image=None, control_scale=1.0, **kw):
        from ldmkit.evaluate.attributes import PALETTE, parse_caption

        out = -torch.ones(len(texts), 3, 32, 32)
        for i, text in enumerate(texts):
            colour, _, position = parse_caption(text) if text else ("red", None, None)
            rgb = torch.tensor(PALETTE[colour], dtype=torch.float)[:, None, None] / 127.5 - 1
            if control_scale == 1.0:
                out[i] = torch.where(control_image[i].bool(), rgb, out[i])
            elif position is not None:
                y, x = (4 if position.startswith("top") else 20), (4 if position.endswith("left") else 20)
                out[i, :, y : y + 8, x : x + 8] = rgb
        return out


def _requests_to_stand_in(monkeypatch):
    """The stand-ins answer a request's fields as keywords: the evaluation's `generate` calls reach them."""
    import ldmkit.evaluate.routes as routes
    from ldmkit.generation import Generated

    def generate(ldm, req, callback=None, *, control=None, **_):
        labels = torch.tensor(req.labels) if req.labels is not None else None
        images = ldm.sample(texts=req.prompt, labels=labels, num_samples=req.num_images, control=control,
                            control_image=req.control_image, control_scale=req.control_scale, init_image=req.init_image,
                            mask=req.mask, overlay=req.overlay, keep_known=req.keep_known)
        return Generated(images, [req.seed] * len(images), [])

    monkeypatch.setattr(routes, "generate", generate)


def test_control_evaluation_reads_a_known_oracle_exactly(tmp_path, monkeypatch):
    from ldmkit.evaluate.routes import evaluate_routes

    _requests_to_stand_in(monkeypatch)
    r = evaluate_routes(_Oracle(), tmp_path, control=object(), control_kind="mask", n=24, dataset="shapes-free")["control"]
    for cap in ("right", "empty", "other"):
        assert r[f"iou_route_{cap}"] == 1.0 and r[f"iou_base_{cap}"] < 0.5
    assert r["map_wins_route"] == 1.0 and r["caption_wins_route"] == 0.0  # the map decided
    assert r["map_wins_base"] == 0.0 and r["caption_wins_base"] == 1.0  # the caption decided
    assert r["colour_route_right"] == r["colour_route_other"] == 1.0 and r["shape_route_empty"] > 0.9
    assert r["iou_base_empty"] == 0.0  # nothing drawn
    report = (tmp_path / "report.md").read_text()
    assert "| with the route (scale 1) | 1.000 | 1.000 | 1.000 |" in report and (tmp_path / "control.png").is_file()


class _BoxPainter:
    """A stand-in inpainting model: paints the whole hole in the caption's colour (so every filled hole
    reads as a square); encode/decode are the identity, so the first stage is perfect."""

    captions: list[str] = []

    class config:
        image_size = 32

        class concat:
            takes_mask, kind = True, "inpaint"

        class conditioner:
            text_encoder, num_classes = "fake", 0

    latent_shape = (4, 8, 8)

    def sample(self, texts, labels=None, init_image=None, mask=None, overlay=True, keep_known=True, **kw):
        from ldmkit.evaluate.attributes import PALETTE, parse_caption

        self.captions += texts
        rgb = torch.stack([torch.tensor(PALETTE[parse_caption(t)[0]], dtype=torch.float) / 127.5 - 1 for t in texts])
        return torch.where(mask.bool(), rgb[:, :, None, None], init_image)

    encode_mean = decode = staticmethod(lambda x: x)


def test_inpainting_is_judged_inside_the_hole(tmp_path, monkeypatch):
    from ldmkit.evaluate.routes import evaluate_routes

    _requests_to_stand_in(monkeypatch)
    painter = _BoxPainter()
    r = evaluate_routes(painter, tmp_path, n=24, dataset="shapes-free")["replace"]
    asked = painter.captions[-24:]  # the replace task's captions: another colour and shape than the original's
    assert r["colour"] == 1.0 and r["kept_psnr"] == r["kept_psnr_first_stage"] == 100.0  # kept pixels untouched
    assert r["shape"] == sum(" square " in c for c in asked) / 24 > 0  # a filled box reads as a square, only that
    assert (tmp_path / "replace.png").is_file() and "replace the shape" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("cls", [ControlNet, Adapter])
def test_bad_control_images_give_one_clear_error(cls):
    ldm = make(None)
    net = cls.from_unet(ldm.unet, hint_channels=1, latent_factor=4)
    ldm_sample(ldm, texts=["a", "b"], control=net, control_image=torch.rand(3, 32, 32), guidance=2.0, **KW)  # RGB, 2x: converted
    for bad in (torch.rand(1, 5, SIZE, SIZE), torch.rand(1, 1, SIZE, 24), torch.rand(3, 1, SIZE, SIZE),
                torch.zeros(1, 1, SIZE, SIZE, dtype=torch.uint8)):
        with pytest.raises(LdmkitError, match="control image"):
            ldm_sample(ldm, texts=["a", "b"], control=net, control_image=bad, guidance=2.0, **KW)


def test_a_unet_in_the_sd_inpainting_layout_is_read_as_the_inpaint_route():
    cfg = make(None, text=False).config
    unet = cfg.unet.model_copy(update={"concat_channels": 5})  # e.g. a converted SD inpainting U-Net (in_channels 9)
    cfg = LatentDiffusionConfig.model_validate({**cfg.model_dump(), "unet": unet.model_dump()})
    assert cfg.concat.kind == "inpaint" and cfg.concat.drop == 0.0
