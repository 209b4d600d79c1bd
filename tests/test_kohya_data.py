"""Folders laid out for kohya's sd-scripts (issue 30): caption files, `N_word` repeat folders, tag handling,
loss masks from alpha or files, and what `ldmkit data check` says about them."""

import io
import json
import tarfile
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.cli import main
from ldmkit.data.folder import ImageFolderDataset
from ldmkit.data.shards import ShardItems
from ldmkit.data.transforms import TagRule
from ldmkit.errors import LdmkitError
from ldmkit.train.config import DataConfig
from ldmkit.train.data import MemoryData, Repeated, open_train_data


def _png(path, value=(200, 30, 30), size=16, alpha=None):
    """A flat colour image; `alpha` (size, size) uint8 makes it RGBA."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((size, size, 3), np.uint8) + np.array(value, np.uint8)
    if alpha is None:
        Image.fromarray(rgb).save(path)
    else:
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)


@pytest.fixture
def kohya(tmp_path):
    """10_sks dog/ (a: caption file with a BOM, b: none), 3_photo/ (c: caption file), loose/d (none)."""
    root = tmp_path / "train"
    for i, name in enumerate(["10_sks dog/a", "10_sks dog/b", "3_photo/c", "loose/my_red_car"]):
        _png(root / f"{name}.png", value=(40 * i, 100, 200 - 40 * i))
    (root / "10_sks dog" / "a.txt").write_bytes("\ufeff  sks dog, running , on grass \n".encode("utf-8"))
    (root / "3_photo" / "c.txt").write_text("a red barn", encoding="utf-8")
    return root


def test_captions_come_from_caption_files_then_the_repeat_folder_word(kohya):
    ds = ImageFolderDataset(str(kohya), size=16, split="all")
    got = {item.file: (item.text, item.repeats) for item in ds.items}
    assert got == {"10_sks dog/a.png": ("sks dog, running , on grass", 10),  # BOM and outer spaces gone
                   "10_sks dog/b.png": ("sks dog", 10),  # no caption file: the folder's word
                   "3_photo/c.png": ("a red barn", 3),  # its own caption beats the word
                   "loose/my_red_car.png": ("", 1)}  # not a repeat folder, no caption: none (as kohya)
    assert sorted(Counter(ds.epoch).values()) == [1, 3, 10, 10] and len(ds.epoch) == 24
    named = ImageFolderDataset(str(kohya), size=16, split="all", filename_captions=True)
    assert named.items[-1].text == "my red car"


def test_metadata_text_wins_and_another_caption_extension(kohya):
    (kohya / "3_photo" / "c.caption").write_text("from the caption file")
    (kohya / "metadata.jsonl").write_text(
        json.dumps({"file_name": "10_sks dog/a.png", "text": "from metadata"}) + "\n"
        + json.dumps({"file_name": "3_photo/c.png"}) + "\n")
    ds = ImageFolderDataset(str(kohya), size=16, split="all", caption_extension="caption")
    assert [(i.text, i.repeats) for i in ds.items] == [("from metadata", 10), ("from the caption file", 3)]
    with pytest.raises(LdmkitError, match="not a file extension"):
        ImageFolderDataset(str(kohya), size=16, split="all", caption_extension="a/b")


def test_zero_repeats_and_undecodable_captions_are_one_line(tmp_path):
    _png(tmp_path / "z" / "0_none" / "a.png")
    with pytest.raises(LdmkitError, match="0 repeats"):
        ImageFolderDataset(str(tmp_path / "z"), size=16, split="all")
    _png(tmp_path / "y" / "a.png")
    (tmp_path / "y" / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LdmkitError, match="UTF-8"):
        ImageFolderDataset(str(tmp_path / "y"), size=16, split="all")


def test_tag_rule_keeps_the_first_tokens_and_is_a_function_of_seed_step_row():
    text = "sks, dog, grass, sunny, park, ball, leash"
    rule = TagRule(seed=3, shuffle=True, keep_tokens=1)
    assert rule(text, 5, 2) == rule(text, 5, 2) == TagRule(seed=3, shuffle=True, keep_tokens=1)(text, 5, 2)
    outs = {rule(text, step, row) for step in range(10) for row in range(4)}
    assert len(outs) > 20  # 6! orders of the six shuffled tags
    for out in outs:
        tags = out.split(", ")
        assert tags[0] == "sks" and sorted(tags) == sorted(text.split(", "))
    # inactive: the caption unchanged, byte for byte (today's behaviour)
    assert TagRule(seed=3, keep_tokens=2)(" a ,b", 0, 0) == " a ,b"
    # tag dropout: kept tokens never go; each other tag goes with probability p
    drop = TagRule(seed=0, keep_tokens=2, dropout=0.25)
    kept = Counter()
    n = 2000
    for row in range(n):
        tags = drop(text, 7, row).split(", ")
        assert tags[:2] == ["sks", "dog"] and tags[2:] == [t for t in text.split(", ")[2:] if t in tags[2:]]
        kept.update(tags[2:])
    for tag in text.split(", ")[2:]:  # binomial(2000, 0.75): sd 19.4, so +-4.5 sd
        assert abs(kept[tag] - 0.75 * n) < 90


def _data(root, **kw):
    return DataConfig(dataset=str(root), size=16, **kw)


DIST = SimpleNamespace(rank=0, world=1, enabled=False)


def test_repeats_and_tags_in_memory_and_lazy_agree(kohya):
    """One epoch (the train split: a x10, b x10, the loose image once; 3_photo/c is the held-out image; batches
    of 3: 7 steps) shows each image as often as it repeats, every caption is the TagRule of its (seed, step,
    row), and the lazily read folder gives the same batches as memory."""
    d = _data(kohya, shuffle_tags=True, keep_tokens=1, tag_dropout=0.3, seed=5)
    mem = open_train_data(d, 3, d.seed, DIST, 1, progress=False)
    assert isinstance(mem, MemoryData) and len(mem) == 21 and len(mem.data) == 3  # each image held once
    assert "a red barn" not in mem.data.texts
    seen = Counter()
    for step in range(7):
        seen.update(mem.batch(step, 0, 3)["_rows"].tolist())
    assert sorted(seen.values()) == [1, 10, 10]
    lazy = open_train_data(d.model_copy(update={"in_memory": False, "workers": 0}), 3, d.seed, DIST, 1, progress=False)
    assert isinstance(lazy.dataset, Repeated) and len(lazy) == 21
    rule = TagRule(seed=5, shuffle=True, keep_tokens=1, dropout=0.3)
    texts = mem.data.texts
    for step in (0, 3, 9):
        a, b = mem.batch(step, 0, 3), lazy.batch(step, 0, 3)
        assert torch.equal(a["image"], b["image"]) and a["text"] == b["text"]
        assert a["text"] == [rule(texts[i], step, r) for r, i in enumerate(a["_rows"].tolist())]
        # a piece of the batch (another process, a micro-batch) gets the same captions for its rows
        assert mem.batch(step, 1, 3)["text"] == a["text"][1:]
    lazy.close()


def test_alpha_mask_fills_the_transparent_pixels_from_the_opaque_ones(tmp_path):
    alpha = np.zeros((16, 16), np.uint8)
    alpha[:, :8] = 255  # left half opaque
    _png(tmp_path / "f" / "a.png", value=(200, 0, 0), alpha=alpha)
    _png(tmp_path / "f" / "b.png", value=(0, 0, 200))  # opaque: a mask of ones
    ds = ImageFolderDataset(str(tmp_path / "f"), size=16, split="all", mask="alpha")
    a, b = ds.load(0), ds.load(1)
    assert torch.equal(a["loss_mask"][0, :, :8], torch.ones(16, 8)) and torch.equal(a["loss_mask"][0, :, 8:], torch.zeros(16, 8))
    # the pixels the loss leaves out take the nearest kept pixel's value, so none of their own reaches the encoder
    assert torch.equal(a["image"][:, :, 8:], a["image"][:, :, 7:8].expand(3, 16, 8))
    assert torch.allclose(a["image"][:, 0, 0], torch.tensor([200 / 127.5 - 1, -1.0, -1.0]))
    assert torch.equal(b["loss_mask"], torch.ones(1, 16, 16))
    plain = ImageFolderDataset(str(tmp_path / "f"), size=16, split="all")
    assert "loss_mask" not in plain.load(0) and torch.equal(plain.load(0)["image"][:, :, 12], torch.ones(3, 16))  # on white
    assert torch.equal(plain.load(0)["image"][:, :, :8], a["image"][:, :, :8])  # the kept pixels are untouched


def test_fill_unmasked_copies_the_nearest_kept_pixel_and_leaves_full_or_empty_masks_alone():
    from ldmkit.data.transforms import fill_unmasked

    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 9, 9, generator=g) * 2 - 1  # "noise" everywhere
    mask = torch.zeros(1, 9, 9)
    mask[0, 3:6, 3:6] = 1.0  # a kept 3x3 block in the middle
    mask[0, 4, 4] = 0.5  # a soft weight still keeps its pixel
    out = fill_unmasked(image, mask)
    assert torch.equal(out[:, 3:6, 3:6], image[:, 3:6, 3:6])
    for y, x in [(0, 0), (0, 4), (8, 8), (4, 0), (2, 5)]:  # each outside pixel: the nearest block pixel
        ny, nx = min(max(y, 3), 5), min(max(x, 3), 5)
        assert torch.equal(out[:, y, x], image[:, ny, nx]), (y, x)
    assert torch.equal(fill_unmasked(image, torch.ones(1, 9, 9)), image)
    assert torch.equal(fill_unmasked(image, torch.zeros(1, 9, 9)), image)  # nothing kept: nothing to fill from


def test_mask_files_beside_the_image_or_in_metadata(tmp_path):
    root = tmp_path / "m"
    _png(root / "a.png")
    _png(root / "b.png")
    m = np.zeros((32, 32), np.uint8)
    m[:16] = 255  # top half trains; twice the image's size: stretched to it
    Image.fromarray(m).save(root / "a_mask.png")
    ds = ImageFolderDataset(str(root), size=16, split="all", mask="files")
    assert [(i.file, i.mask) for i in ds.items] == [("a.png", "a_mask.png"), ("b.png", None)]
    got = ds.load(0)["loss_mask"][0]
    assert torch.equal(got[:7], torch.ones(7, 16)) and torch.equal(got[9:], torch.zeros(7, 16))
    assert torch.equal(ds.load(1)["loss_mask"], torch.ones(1, 16, 16))
    # without data.mask the mask file is an ordinary image, as before
    assert len(ImageFolderDataset(str(root), size=16, split="all")) == 3
    Image.fromarray(255 - m).save(root / "other.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "mask": "other.png"}) + "\n"
                                         + json.dumps({"file_name": "b.png", "mask": "missing.png"}) + "\n")
    with pytest.raises(LdmkitError, match="missing.png"):
        ImageFolderDataset(str(root), size=16, split="all", mask="files")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "mask": "other.png"}) + "\n")
    got = ImageFolderDataset(str(root), size=16, split="all", mask="files").load(0)["loss_mask"][0]
    assert torch.equal(got[9:], torch.ones(7, 16)) and torch.equal(got[:7], torch.zeros(7, 16))


def _shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png_bytes(alpha=None):
    buf = io.BytesIO()
    rgb = np.full((16, 16, 3), 90, np.uint8)
    Image.fromarray(rgb if alpha is None else np.dstack([rgb, alpha]), "RGB" if alpha is None else "RGBA").save(buf, "PNG")
    return buf.getvalue()


def test_shards_read_the_caption_extension_and_alpha_masks(tmp_path):
    alpha = np.zeros((16, 16), np.uint8)
    alpha[8:] = 255
    _shard(tmp_path / "s.tar", [("k1.png", _png_bytes(alpha)), ("k1.caption", "\ufeffa cap ".encode()),
                                ("k1.txt", b"a txt"), ("k2.png", _png_bytes())])
    items = ShardItems(str(tmp_path / "s.tar"), 16, "all", caption="caption", mask="alpha").items
    assert [it["text"] for it in items] == ["a cap", ""]
    assert torch.equal(items[0]["loss_mask"][0, 8:], torch.ones(8, 16)) and items[0]["loss_mask"][0, :8].sum() == 0
    assert torch.equal(items[1]["loss_mask"], torch.ones(1, 16, 16))
    assert [it["text"] for it in ShardItems(str(tmp_path / "s.tar"), 16, "all").items] == ["a txt", ""]


def test_masks_are_refused_where_they_cannot_be_honoured(kohya, tmp_path):
    with pytest.raises(LdmkitError, match="image folder or tar shards"):
        open_train_data(DataConfig(dataset="shapes", mask="alpha"), 4, 0, DIST, 1, progress=False, masked_loss=True)
    with pytest.raises(LdmkitError, match="second stage"):  # a trainer that does not weight its loss by masks
        open_train_data(_data(kohya, mask="alpha"), 4, 0, DIST, 1, progress=False)
    lazy = _data(kohya, mask="alpha", in_memory=False, latent_cache=str(tmp_path / "cache"))
    with pytest.raises(LdmkitError, match="latent_cache stores latents without masks"):
        open_train_data(lazy, 4, 0, DIST, 1, progress=False, masked_loss=True)
    mem = open_train_data(_data(kohya, mask="alpha"), 3, 0, DIST, 1, progress=False, masked_loss=True)
    assert mem.data.extras["loss_mask"].shape == (3, 1, 16, 16)


def test_data_check_reports_missing_captions_and_the_epoch(kohya, capsys):
    assert main(["data", "check", str(kohya), "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "4 images ready" in out and "3 with captions" in out
    assert "1 image without captions" in out and "loose/my_red_car.png" in out
    assert "an epoch is 24 images with repeats (10_sks dog/ x10, 3_photo/ x3)" in out
    assert main(["data", "check", str(kohya), "--size", "16", "--filename-captions"]) == 0
    assert "without captions" not in capsys.readouterr().out
