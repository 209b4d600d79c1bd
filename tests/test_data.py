"""Datasets: shapes ground truth, built-in real data, user folders and the registry."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data import DATASETS, build_dataset, dataset_names
from ldmkit.data.builtin import DigitsDataset, FacesDataset, PhotosDataset
from ldmkit.data.folder import ImageFolderDataset
from ldmkit.data.shapes import (
    COLOURS,
    COMBOS,
    POSITIONS,
    SHAPES,
    ShapesDataset,
    all_captions,
    parse_caption,
    render_shape,
)
from ldmkit.errors import LdmkitError


def _check_item(item: dict, size: int) -> None:
    image = item["image"]
    assert image.dtype == torch.float32 and image.shape == (3, size, size)
    assert image.min() >= -1 and image.max() <= 1
    assert isinstance(item["text"], str) and isinstance(item["label"], int)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Dilation by a (2·steps+1)² square."""
    out = mask.copy()
    for _ in range(steps):
        m = np.pad(out, 1)
        out = np.zeros_like(out)
        for dy in range(3):
            for dx in range(3):
                out |= m[dy:dy + out.shape[0], dx:dx + out.shape[1]]
    return out


# ---------------------------------------------------------------------------------------------- shapes


def test_vocabulary_and_captions():
    assert SHAPES == ("circle", "square", "triangle") and len(COLOURS) == 6 and len(POSITIONS) == 4
    captions = all_captions()
    assert len(captions) == len(set(captions)) == 72
    assert captions[0] == "a red circle in the top left"
    for text, combo in zip(captions, COMBOS, strict=True):
        assert parse_caption(text) == combo
    for bad in ["a purple circle in the top left", "a red hexagon in the top left", "a red circle in the middle",
                "hello", ""]:
        with pytest.raises(LdmkitError):
            parse_caption(bad)


def test_shapes_deterministic_and_seeded():
    a, b = ShapesDataset(seed=3), ShapesDataset(seed=3)
    for i in (0, 5, 71, 1000):
        x, y = a[i], b[i]
        assert x["text"] == y["text"] and x["label"] == y["label"]
        for key in ("image", "mask", "edge"):
            assert torch.equal(x[key], y[key])
    other = ShapesDataset(seed=4)
    assert any(not torch.equal(a[i]["image"], other[i]["image"]) for i in range(5))
    val = ShapesDataset(seed=3, split="val")
    assert len(val) == 720 and len(a) == 7200
    assert not any(torch.equal(a[i]["image"], val[i]["image"]) for i in range(20))


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_item_format(size):
    ds = ShapesDataset(size=size, length=100)
    assert ds.num_classes == 18 and ds.name == "shapes" and len(ds) == 100
    item = ds[7]
    _check_item(item, size)
    for key in ("mask", "edge"):
        assert item[key].dtype == torch.float32 and item[key].shape == (1, size, size)
        assert set(item[key].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(IndexError):
        ds[100]


@pytest.mark.parametrize("size", [16, 32, 64])
def test_shapes_mask_edge_and_image_agree(size):
    for seed in range(3):
        rng = np.random.default_rng(seed)
        for shape, colour, position in COMBOS:
            image, mask, edge = render_shape(shape, colour, position, size, rng)
            assert image.dtype == np.uint8 and image.shape == (size, size, 3)
            interior = mask & ~edge
            # The interior is exactly the palette colour; only boundary pixels are blended with black.
            assert (image[interior] == COLOURS[colour]).all()
            assert (image[mask] > 0).any(axis=-1).all()
            # Outside the mask colour fades within a pixel: at most 1/16 coverage past the 3x3 ring, none past 5x5.
            peak = max(COLOURS[colour])
            assert image[~_dilate(mask, 1)].max(initial=0) <= np.ceil(peak / 16)
            assert image[~_dilate(mask, 2)].max(initial=0) == 0
            # The edge is exactly the mask pixels that have a 4-neighbour outside the mask.
            m = np.pad(mask, 1)
            outside_neighbour = ~m[:-2, 1:-1] | ~m[2:, 1:-1] | ~m[1:-1, :-2] | ~m[1:-1, 2:]
            assert np.array_equal(edge, mask & outside_neighbour)
            assert interior.sum() > 0


def test_shapes_caption_matches_render():
    ds = ShapesDataset(size=32, length=72 * 2, seed=1)
    names = list(COLOURS)
    for i in range(len(ds)):
        item = ds[i]
        shape, colour, position = parse_caption(item["text"])
        assert item["label"] == SHAPES.index(shape) * 6 + names.index(colour)
        mask, edge = item["mask"][0].bool(), item["edge"][0].bool()
        rgb = ((item["image"] + 1) * 127.5).round().permute(1, 2, 0)[mask & ~edge]
        assert (rgb == torch.tensor(COLOURS[colour], dtype=rgb.dtype)).all()
        ys, xs = mask.nonzero(as_tuple=True)
        row = "top" if ys.float().mean() < 16 else "bottom"
        col = "left" if xs.float().mean() < 16 else "right"
        assert position == f"{row} {col}"
        # Bounding-box fill separates the shapes cleanly on the ground-truth mask.
        fill = mask.sum().item() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)).item()
        assert {"triangle": fill < 0.66, "circle": 0.7 < fill < 0.9, "square": fill > 0.95}[shape]


def test_shapes_combos_balanced():
    ds = ShapesDataset(length=72 * 3, seed=5)
    for block in range(3):
        assert sorted(ds.combo(i) for i in range(72 * block, 72 * (block + 1))) == sorted(COMBOS)
    assert [ds.combo(i) for i in range(72)] != [ds.combo(i) for i in range(72, 144)]  # shuffled per block


def test_free_layout_places_sizes_and_turns_shapes_anywhere_in_their_quadrant():
    size = 32
    ds = ShapesDataset(size=size, length=720, split="val", layout="free")
    assert ds.name == "shapes-free" and build_dataset("shapes-free", size, "val").layout == "free"
    centres, radii, fills = [], [], {"square": [], "triangle": []}
    for i in range(len(ds)):
        item = ds[i]
        shape, colour, position = parse_caption(item["text"])
        mask = item["mask"][0].numpy().astype(bool)
        ys, xs = np.nonzero(mask)
        cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
        # the caption names the quadrant of the centroid, kept clear of the midlines
        assert (cx < size / 2) == position.endswith("left") and (cy < size / 2) == position.startswith("top")
        assert min(abs(cx - size / 2), abs(cy - size / 2)) > 0.02 * size
        # never clipped: the drawn area is the full shape's (circle pi r^2, square the same, triangle 2 r^2)
        assert not (mask[0].any() and mask[-1].any())
        area = mask.sum()
        r = np.sqrt(area / (2 if shape == "triangle" else np.pi))
        radii.append(r / size)
        centres.append((cx / size, cy / size))
        if shape in fills:
            fills[shape].append(area / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
    radii, centres = np.array(radii), np.array(centres)
    assert 0.10 < radii.min() < 0.14 and 0.27 < radii.max() < 0.32  # the 0.12-0.30 range, pixelated
    # places spread over the whole image, not four spots: each quadrant's centres span most of it
    for q in range(4):
        c = centres[(centres[:, 0] > 0.5) == bool(q % 2)]
        c = c[(c[:, 1] > 0.5) == bool(q // 2)]
        assert np.ptp(c[:, 0]) > 0.2 and np.ptp(c[:, 1]) > 0.2
    # turned: an upright square fills its box, a turned one as little as half of it
    assert min(fills["square"]) < 0.6 and max(fills["square"]) > 0.9
    assert min(fills["triangle"]) < 0.45 and max(fills["triangle"]) > 0.55
    a, b = ShapesDataset(size, 5, layout="free"), ShapesDataset(size, 5, layout="free")
    assert torch.equal(a[3]["image"], b[3]["image"]) and a.combo(3) == ShapesDataset(size, 5).combo(3)
    with pytest.raises(LdmkitError, match="layout"):
        ShapesDataset(size, layout="scattered")


def test_render_shape_rejects_bad_input():
    with pytest.raises(LdmkitError):
        render_shape("hexagon", "red", "top left")
    with pytest.raises(LdmkitError):
        ShapesDataset(size=8)


# ------------------------------------------------------------------------------------------- built-ins


def test_digits():
    train, val = DigitsDataset(size=32, split="train"), DigitsDataset(size=32, split="val")
    assert len(train) + len(val) == 1797 and len(val) == 179
    assert train.num_classes == 10 and train.name == "digits"
    item = val[3]
    _check_item(item, 32)
    assert 0 <= item["label"] <= 9 and item["text"] == f"a handwritten digit {item['label']}"
    assert torch.equal(item["image"][0], item["image"][1])  # grey replicated
    assert set(val.labels) == set(range(10)) and set(train.labels) == set(range(10))
    assert item["image"].min() == -1 and item["image"].max() > 0.5  # black background, bright ink


def test_faces():
    train, val = FacesDataset(size=32, split="train"), FacesDataset(size=32, split="val")
    assert (len(train), len(val)) == (90, 10)  # only the 100 faces; lfw_subset's other 100 are not faces
    assert train.num_classes == 0
    item = train[0]
    _check_item(item, 32)
    assert item["label"] == -1 and item["text"] == ""
    assert item["image"].std() > 0.1
    assert not any(torch.equal(t, v) for t in train.images for v in val.images)


def test_photos():
    train, val = PhotosDataset(size=32, split="train", length=50), PhotosDataset(size=32, split="val", length=20)
    assert not set(train.photos) & set(val.photos)  # whole photos held out
    assert len(train) == 50
    items = [train[i] for i in range(10)]
    for item in items:
        _check_item(item, 32)
    assert torch.equal(train[3]["image"], PhotosDataset(size=32, split="train", length=50)[3]["image"])
    assert not torch.equal(train[3]["image"], PhotosDataset(size=32, split="train", seed=1, length=50)[3]["image"])
    assert torch.stack([item["image"] for item in items]).std() > 0.1
    _check_item(val[0], 32)


# ----------------------------------------------------------------------------------------- image folder


def _save(path, array, mode=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **kwargs) if mode else Image.fromarray(array).save(path, **kwargs)
    return path


def _rgb(h=40, w=50, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def mixed_folder(tmp_path):
    """One image of every awkward kind."""
    _save(tmp_path / "rgb.png", _rgb())
    _save(tmp_path / "grey.png", _rgb()[..., 0])
    rgba = np.concatenate([_rgb(), np.zeros((40, 50, 1), np.uint8)], axis=-1)  # fully transparent
    _save(tmp_path / "rgba.png", rgba)
    Image.fromarray(_rgb()).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "palette.png")
    _save(tmp_path / "sub" / "grey16.png", np.full((30, 60), 65535, np.uint16))
    _save(tmp_path / "sub" / "photo.jpg", _rgb(64, 48))
    return tmp_path


def test_folder_modes_all_load_to_rgb(mixed_folder):
    ds = ImageFolderDataset(mixed_folder, size=24, val_fraction=0.0)
    assert len(ds) == 6 and ds.num_classes == 0 and ds.name == mixed_folder.name
    files = [item.file for item in ds.items]
    assert files == sorted(files) and "sub/grey16.png" in files
    for i in range(len(ds)):
        _check_item(ds[i], 24)
        assert ds[i]["label"] == -1 and ds[i]["text"] == ""
    by_name = {item.file: ds[i]["image"] for i, item in enumerate(ds.items)}
    assert torch.allclose(by_name["sub/grey16.png"], torch.ones(3, 24, 24))  # 16-bit white stays white
    assert torch.allclose(by_name["rgba.png"], torch.ones(3, 24, 24))  # transparent -> white page


def test_folder_split_is_stable_and_disjoint(tmp_path):
    for i in range(40):
        _save(tmp_path / f"{i:03d}.png", _rgb(16, 16, i))
    train = {item.file for item in ImageFolderDataset(tmp_path, size=16, split="train", val_fraction=0.25).items}
    val = {item.file for item in ImageFolderDataset(tmp_path, size=16, split="val", val_fraction=0.25).items}
    assert not train & val and len(train | val) == 40 and 0 < len(val) < 40
    for i in range(40, 60):  # adding files never moves existing ones between splits
        _save(tmp_path / f"{i:03d}.png", _rgb(16, 16, i))
    val2 = {item.file for item in ImageFolderDataset(tmp_path, size=16, split="val", val_fraction=0.25).items}
    assert val2 & train == set() and val <= val2


def test_folder_metadata(tmp_path):
    _save(tmp_path / "img" / "a.png", _rgb(32, 32, 1))
    _save(tmp_path / "img" / "b.png", _rgb(32, 32, 2))
    _save(tmp_path / "ctl" / "a.png", np.full((64, 64), 255, np.uint8))
    _save(tmp_path / "ctl" / "b.png", np.zeros((64, 64), np.uint8))
    rows = [{"file_name": "img/a.png", "text": "first", "label": 4, "conditioning_image": "ctl/a.png"},
            {"file_name": "img/b.png", "text": "second", "label": 1, "conditioning_image": "ctl/b.png"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ImageFolderDataset(tmp_path, size=16, val_fraction=0.0)
    assert len(ds) == 2 and ds.num_classes == 5  # metadata defines the items: ctl/*.png are not items
    items = {ds[i]["text"]: ds[i] for i in range(2)}
    assert items["first"]["label"] == 4 and items["second"]["label"] == 1
    assert torch.equal(items["first"]["control"], torch.ones(3, 16, 16))
    assert torch.equal(items["second"]["control"], -torch.ones(3, 16, 16))
    expected = torch.from_numpy(_rgb(32, 32, 1)).permute(2, 0, 1).float() / 127.5 - 1
    expected = torch.nn.functional.interpolate(expected[None], size=16, mode="area")[0]  # (3, 16, 16)
    assert (expected - items["first"]["image"]).abs().mean() < 0.2


@pytest.mark.parametrize("line, words", [
    ("{not json", "line 2"),
    ('{"text": "no file"}', "line 2"),
    ('{"file_name": "missing.png"}', "missing.png"),
    ('{"file_name": "a.png", "label": "cat"}', "label"),
    ('{"file_name": "a.png", "conditioning_image": "a.png"}', "conditioning_image"),
])
def test_folder_bad_metadata(tmp_path, line, words):
    _save(tmp_path / "a.png", _rgb())
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n' + line + "\n")
    with pytest.raises(LdmkitError, match=words):
        ImageFolderDataset(tmp_path, size=16)


def _bad_folder(tmp_path):
    for i in range(3):
        _save(tmp_path / f"good{i}.png", _rgb(seed=i))
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "notes.jpg").write_text("this is a text file\n")
    for name, fmt in (("cut.jpg", "JPEG"), ("cut.png", "PNG")):
        buf = io.BytesIO()
        Image.fromarray(_rgb(64, 64)).save(buf, fmt)
        (tmp_path / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    return tmp_path


def test_folder_bad_files_reported_by_name(tmp_path):
    root = _bad_folder(tmp_path)
    with pytest.raises(LdmkitError) as info:
        ImageFolderDataset(root, size=16)
    message = str(info.value)
    assert "\n" not in message and message.startswith("4 unreadable image files")
    for name in ("noise.png", "notes.jpg", "cut.jpg (truncated)", "cut.png (truncated)"):
        assert name in message
    assert "good" not in message and "--skip-bad-images" in message


def test_folder_check_is_indexed_and_redone_only_for_changed_files(tmp_path, monkeypatch, capsys):
    from ldmkit.cli import main
    from ldmkit.data.folder import index_path

    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "imgs"
    for i in range(4):
        _save(root / f"{i}.png", _rgb(seed=i))
    assert ImageFolderDataset(str(root), size=16, split="all").checked == (4, 0)
    assert index_path(str(root)).is_file() and not (root / ".ldmkit").exists()  # nothing written into the data
    assert ImageFolderDataset(str(root), size=16, split="all").checked == (4, 4)
    # a file replaced by a damaged one (new size and time) is decoded again and named
    data = (root / "2.png").read_bytes()
    (root / "2.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(LdmkitError, match="2.png"):
        ImageFolderDataset(str(root), size=16, split="all")
    assert ImageFolderDataset(str(root), size=16, split="all", skip_bad=True).checked == (4, 4)  # its verdict kept
    (root / "2.png").write_bytes(data)  # repaired
    ds = ImageFolderDataset(str(root), size=16, split="all")
    assert ds.checked == (4, 3) and len(ds) == 4
    # the command: one line of figures, exit 0; a damaged index is ignored, not trusted
    index_path(str(root)).write_text("{not json")
    assert main(["data", "check", str(root), "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "4 images ready" in out and "4 files checked" in out and "0 unchanged" in out
    (root / "3.png").write_bytes(b"not an image")
    assert main(["data", "check", str(root)]) == 2 and "3.png" in capsys.readouterr().err


def test_folder_bad_files_skipped(tmp_path):
    root = _bad_folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(root, size=16, skip_bad=True, val_fraction=0.0)
    assert sorted(item.file for item in ds.items) == ["good0.png", "good1.png", "good2.png"]
    assert any("noise.png" in str(w.message) for w in caught)
    _check_item(ds[0], 16)


def test_folder_empty_and_missing(tmp_path):
    with pytest.raises(LdmkitError, match="no images"):
        ImageFolderDataset(tmp_path, size=16)
    with pytest.raises(LdmkitError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", size=16)


def test_folder_random_crop(tmp_path):
    _save(tmp_path / "wide.png", _rgb(16, 64))
    ds = ImageFolderDataset(tmp_path, size=16, center_crop=False, val_fraction=0.0)
    torch.manual_seed(0)
    crops = {tuple(ds[0]["image"].flatten()[:8].tolist()) for _ in range(10)}
    assert len(crops) > 1


# ----------------------------------------------------------------------------------------------- registry


def test_registry(tmp_path):
    assert dataset_names() == list(DATASETS) == ["shapes", "shapes-free", "digits", "faces", "photos"]
    ds = build_dataset("shapes", size=32, split="val", length=10)
    assert isinstance(ds, ShapesDataset) and len(ds) == 10
    assert isinstance(build_dataset("photos", size=16, split="train", length=7), PhotosDataset)
    _save(tmp_path / "x.png", _rgb())
    assert isinstance(build_dataset(str(tmp_path), size=16, split="train"), ImageFolderDataset)
    with pytest.raises(LdmkitError, match="shapes, shapes-free, digits, faces, photos"):
        build_dataset("imagenet", size=32, split="train")
    with pytest.raises(LdmkitError):
        build_dataset("shapes", size=32, split="test")


def test_folder_honours_exif_orientation(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # stored landscape: red left half, blue right half
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display -> red on top
    Image.fromarray(stored).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    image = ImageFolderDataset(tmp_path, size=16, val_fraction=0.0)[0]["image"]  # (3, 16, 16)
    assert image[0, 1].mean() > 0.8 and image[2, 1].mean() < -0.8  # top row red
    assert image[2, -2].mean() > 0.8 and image[0, -2].mean() < -0.8  # bottom row blue


def test_extended_vocabulary_shapes():
    """`data.vocabulary: extended`: white and diamond join the 72 (112 combinations, balanced in blocks),
    captions parse, the diamond is |dx| + |dy| <= r (half its box) and the free layout is refused."""
    from ldmkit.data.shapes import combos, is_new, with_vocabulary

    ds = ShapesDataset(size=32, seed=1, vocabulary="extended")
    assert len(ds) == 11200 and ds.num_classes == 28 and len(combos("extended")) == 112
    assert sorted(ds.combo(i) for i in range(112)) == sorted(combos("extended"))
    assert sum(is_new(c) for c in combos("extended")) == 40
    assert parse_caption("a white diamond in the bottom left") == ("diamond", "white", "bottom left")
    image, mask, _ = render_shape("diamond", "white", "top left", 64)
    assert 0.45 < mask.sum() / (0.4 * 64) ** 2 < 0.55 and tuple(image[16, 16]) == (240, 240, 240)
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert (box == box[::-1]).mean() > 0.95 and (box == box[:, ::-1]).mean() > 0.95  # symmetric both ways
    basic = ShapesDataset(size=32, length=144, seed=1)
    assert with_vocabulary(basic, "basic") is basic
    ext = with_vocabulary(basic, "extended")
    assert ext.vocabulary == "extended" and len(ext) == 144
    with pytest.raises(LdmkitError, match="fixed layout"):
        ShapesDataset(size=32, layout="free", vocabulary="extended")
