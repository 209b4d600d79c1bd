"""Property-based tests (hypothesis) over what users type and the files they bring: `--set` values,
config files, U-Net configs, metadata.jsonl lines and image files. The property is always the
same contract: either the input is accepted and works, or it is refused with an `LdmkitError`
(one line on the command line); never any other exception.
"""

import io
import json
import os
import string

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldmkit.data.folder import ImageFolderDataset
from ldmkit.errors import LdmkitError
from ldmkit.imageio import ImageProblem, open_image, to_rgb
from ldmkit.train.config import (AUTOENCODER_PRESETS, DIFFUSION_PRESETS, AutoencoderTrainConfig,
                                 DiffusionTrainConfig, load_config)
from ldmkit.unet import UNet, UNetConfig

FAST = settings(max_examples=int(os.environ.get("LDMKIT_HYPOTHESIS_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# keys users type: real ones (sections and leaves), misspelt ones, and broken paths
KEYS = st.sampled_from(["optim.steps", "optim.lr", "optim.batch_size", "optim", "data.size", "data.dataset",
                        "data", "unet.channel_mult", "unet.num_heads", "unet.attention_levels", "unet.norm_groups",
                        "conditioner.num_classes", "diffusion.prediction_type", "sample.sampler", "logging.ckpt_every",
                        "optim.stpes", "nope", "", ".", "optim..steps", "optim.steps.x", " optim.steps"])
YAML_VALUES = st.one_of(
    st.text(alphabet=string.printable, max_size=12),
    st.sampled_from(["[", "{", "]", "}", ":", "- -", "!!python/object:os.system", "&a *a", "null", "~", "nan", ".inf",
                     "-1", "0", "1e9", "[1, 2]", "{a: 1}", "'", '"', "1:2", "yes", "0x10", "v", "eps", "dpmpp_2m"]),
    st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True).map(repr),
)


@FAST
@given(st.lists(st.tuples(KEYS, YAML_VALUES), max_size=4), st.sampled_from(["tiny", "shapes-text"]))
def test_any_set_override_is_accepted_or_refused_in_one_line(pairs, preset):
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = load_config(preset, DiffusionTrainConfig, DIFFUSION_PRESETS, overrides)
    except LdmkitError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert isinstance(cfg, DiffusionTrainConfig)
    assert cfg.optim.steps >= 1 and cfg.optim.batch_size >= 1 and cfg.data.size >= 1


@FAST
@given(st.one_of(st.text(max_size=60), st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
                 st.dictionaries(st.sampled_from(["preset", "optim", "data", "model", "loss", "x"]),
                                 st.one_of(st.integers(), st.text(max_size=5), st.none(),
                                           st.dictionaries(st.sampled_from(["steps", "lr", "size", "dataset"]),
                                                           st.one_of(st.integers(-5, 5), st.text(max_size=4))))).map(json.dumps)),
       st.sampled_from([".yaml", ".json"]))
def test_any_config_file_is_accepted_or_refused_in_one_line(tmp_path_factory, text, suffix):
    path = tmp_path_factory.mktemp("cfg") / f"c{suffix}"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(str(path), AutoencoderTrainConfig, AUTOENCODER_PRESETS)
    except LdmkitError as e:
        assert "\n" not in str(e)


@settings(max_examples=int(os.environ.get("LDMKIT_HYPOTHESIS_EXAMPLES", 40)), deadline=None)
@given(model_channels=st.integers(1, 24), mult=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       norm_groups=st.integers(1, 8), heads=st.integers(1, 4), attn=st.lists(st.integers(-1, 3), max_size=3),
       mid=st.booleans(), emb_mode=st.sampled_from(["add", "scale_shift"]), size=st.sampled_from([4, 8]))
def test_any_valid_unet_config_builds_and_runs(model_channels, mult, norm_groups, heads, attn, mid, emb_mode, size):
    """A UNetConfig that validates builds a U-Net whose output has the input's shape; one that does
    not validate is refused by pydantic (an LdmkitError on the command line)."""
    from pydantic import ValidationError

    try:
        cfg = UNetConfig(in_channels=2, out_channels=2, model_channels=model_channels, channel_mult=tuple(mult),
                         num_res_blocks=1, norm_groups=norm_groups, num_heads=heads, attention_levels=tuple(attn),
                         mid_attention=mid, emb_mode=emb_mode)
    except ValidationError:
        return
    try:
        net = UNet(cfg).eval()
    except LdmkitError:
        return
    z = torch.randn(1, 2, size, size)
    if size % 2 ** (len(mult) - 1):
        with pytest.raises(LdmkitError):
            net(z, torch.tensor([3]))
        return
    with torch.no_grad():
        try:
            out = net(z, torch.tensor([3]))
        except LdmkitError as e:  # a latent too small for the network: refused by name
            assert "too small" in str(e)
            return
        assert out.shape == z.shape


LINE = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "   ", "{}", "[]", "null", '"a.png"', "{\"file_name\": 3}"]),
    st.fixed_dictionaries({"file_name": st.sampled_from(["a.png", "b.png", "missing.png", "../out.png", "/etc/passwd",
                                                         "sub/../a.png", "", ".", "a.png\x00"])},
                          optional={"text": st.one_of(st.text(max_size=10), st.integers(), st.none()),
                                    "label": st.one_of(st.integers(-3, 5), st.booleans(), st.text(max_size=2),
                                                       st.floats(allow_nan=True)),
                                    "conditioning_image": st.sampled_from(["a.png", "b.png", "nope.png"])}).map(json.dumps),
)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    for name, value in (("a.png", 30), ("b.png", 200)):
        Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(root / name)
    (root.parent / "out.png").write_bytes((root / "a.png").read_bytes())  # outside the folder
    return root


@FAST
@given(st.lists(LINE, min_size=1, max_size=4))
def test_any_metadata_jsonl_is_loaded_or_refused_naming_the_line(image_folder, lines):
    (image_folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        ds = ImageFolderDataset(str(image_folder), size=8, split="train", val_fraction=0.0)
    except LdmkitError as e:
        assert "\n" not in str(e) and ("line" in str(e) or "metadata" in str(e) or "no images" in str(e).lower()
                                       or str(image_folder) in str(e)), str(e)
        return
    rows = [json.loads(ln) for ln in lines if ln.strip()]
    assert len(ds) == len(rows)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 8, 8) and -1 <= item["image"].min() <= item["image"].max() <= 1
        assert not any("../" in r["file_name"] or r["file_name"].startswith("/") for r in rows)  # never read outside


def _png(w: int, h: int, mode: str) -> bytes:
    arr = np.random.default_rng(w * 31 + h).integers(0, 255, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@FAST
@given(st.one_of(
    st.binary(max_size=200),
    st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from(["RGB", "L", "P", "RGBA", "LA", "I;16", "1"]),
              st.floats(0.0, 1.0)).map(lambda a: _png(a[0], a[1], a[2])[: max(1, int(len(_png(a[0], a[1], a[2])) * a[3]))]),
))
def test_any_image_file_opens_as_rgb_or_is_one_named_problem(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("img") / "x.png"
    path.write_bytes(data)
    try:
        im = to_rgb(open_image(path, what="image"))
    except ImageProblem as e:
        assert isinstance(e, LdmkitError) and str(path) in str(e) and "\n" not in str(e)
        return
    assert im.mode == "RGB" and im.width >= 1 and im.height >= 1


@FAST
@given(size=st.sampled_from([16, 24, 32, 48, 64]), seed=st.integers(0, 2**32 - 1), index=st.integers(0, 10**6))
def test_any_free_layout_item_is_whole_and_in_its_captioned_quadrant(size, seed, index):
    """`shapes-free` at any size, seed and index: the shape is never clipped by the border (its drawn area
    is the analytic one of a radius in the range) and lies in the quadrant its caption names."""
    from ldmkit.data.shapes import COLOURS, ShapesDataset, parse_caption

    item = ShapesDataset(size=size, length=index + 1, seed=seed, layout="free")[index]
    shape, colour, position = parse_caption(item["text"])
    coverage = ((item["image"].amax(0) + 1) / 2) / (max(COLOURS[colour]) / 255)  # (H, W) fraction covered
    area = float(coverage.clamp(0, 1).sum())  # anti-aliased area in pixels
    mask = item["mask"][0]
    ys, xs = torch.nonzero(mask, as_tuple=True)
    r_est = (area / (2.0 if shape == "triangle" else np.pi)) ** 0.5
    assert 0.12 * size - 1 <= r_est <= 0.30 * size + 1  # the whole shape is there: nothing cut off
    cy, cx = ys.float().mean() + 0.5, xs.float().mean() + 0.5
    assert (cx < size / 2) == position.endswith("left") and (cy < size / 2) == position.startswith("top")
