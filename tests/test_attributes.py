"""The attribute checker: perfect on clean shapes, silent on empty images, strict about captions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from ldmkit.data.shapes import (
    CENTRE_JITTER,
    COLOURS,
    COMBOS,
    POSITIONS,
    RADIUS,
    ShapesDataset,
    _free_geometry,
    _outline,
    caption,
    combos,
    render_shape,
)
from ldmkit.errors import LdmkitError
from ldmkit.evaluate.attributes import (
    STRICT_CORNERS,
    STRICT_IOU,
    STRICT_SOLIDITY,
    check_attributes,
    score_captions,
    shape_fidelity,
)


@pytest.mark.parametrize("size", [32, 64])
def test_clean_shapes_all_correct(size):
    for seed in range(4):
        rng = np.random.default_rng([seed, size])
        for shape, colour, position in COMBOS:
            image, _, _ = render_shape(shape, colour, position, size, rng)
            assert check_attributes(image) == {"colour": colour, "position": position, "shape": shape}


@pytest.mark.parametrize("size", [32, 64])
def test_turned_shapes_anywhere_read_right(size):
    """The free layout turns squares and triangles by any angle (a square at 45 degrees fills half of its
    upright box, like a triangle) and shrinks them to ~4 px radius: the rotation-invariant rule holds."""
    rng = np.random.default_rng([size, 1])
    wrong = 0
    for _ in range(4):
        for shape, colour, position in COMBOS:
            image, _, _ = render_shape(shape, colour, position, size, rng, layout="free")
            wrong += check_attributes(image) != {"colour": colour, "position": position, "shape": shape}
    assert wrong <= 1  # measured: 99.9 % right on 3,000 renders at 32 px, 100 % at 64 px


def test_a_square_turned_45_degrees_is_a_square():
    image = np.zeros((32, 32, 3), np.uint8)
    y, x = np.mgrid[0:32, 0:32] + 0.5
    image[np.abs(x - 10) + np.abs(y - 10) <= 7] = (230, 40, 40)  # a diamond: a square at 45 degrees
    assert check_attributes(image) == {"colour": "red", "position": "top left", "shape": "square"}


@pytest.mark.parametrize("size", [32, 64])
def test_score_captions_dataset_tensors(size):
    ds = ShapesDataset(size=size, length=144, seed=2)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])  # (N, 3, H, W) in [-1, 1]
    captions = [ds[i]["text"] for i in range(len(ds))]
    assert score_captions(images, captions) == {"colour": 1.0, "position": 1.0, "shape": 1.0, "all": 1.0, "n": 144}


def test_score_counts_wrong_attributes():
    images = [render_shape("circle", "red", "top left", 32)[0], render_shape("square", "blue", "bottom right", 32)[0]]
    captions = [caption("circle", "red", "top left"), caption("triangle", "blue", "top right")]
    scores = score_captions(images, captions)
    assert scores == {"colour": 1.0, "position": 0.5, "shape": 0.5, "all": 0.5, "n": 2}


def test_black_and_faint_images_find_nothing():
    nothing = {"colour": None, "position": None, "shape": None}
    assert check_attributes(np.zeros((32, 32, 3), np.uint8)) == nothing
    assert check_attributes(-torch.ones(3, 32, 32)) == nothing
    faint = np.random.default_rng(0).integers(0, 60, (32, 32, 3), dtype=np.uint8)  # dark noise only
    assert check_attributes(faint) == nothing


def test_specks_do_not_move_the_shape():
    image, _, _ = render_shape("triangle", "cyan", "bottom left", 32)
    image[1, 30] = image[2, 29] = 255  # a stray bright speck in the opposite corner
    assert check_attributes(image) == {"colour": "cyan", "position": "bottom left", "shape": "triangle"}


def test_bad_input():
    with pytest.raises(LdmkitError):
        score_captions([np.zeros((32, 32, 3), np.uint8)], ["a cat on a mat"])
    with pytest.raises(LdmkitError):
        score_captions([np.zeros((32, 32, 3), np.uint8)], [])
    with pytest.raises(LdmkitError):
        check_attributes(np.zeros((32, 32), np.uint8))


def test_checker_is_independent_of_the_generator():
    """The judge must not share code with what it judges: no imports from ldmkit.data."""
    import ast

    import ldmkit.evaluate.attributes as attributes

    tree = ast.parse(open(attributes.__file__, encoding="utf-8").read())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert modules and not any(m.startswith("ldmkit.data") for m in modules)


def test_probes_are_drawn_independently_and_read_back_right():
    """The spatial routes' probe maps: their own renderer (no ldmkit.data import), shapes the checker
    reads as named, edges on the mask's boundary, and a second caption naming another quadrant."""
    import ast

    import ldmkit.evaluate.probes as probes_module
    from ldmkit.evaluate.attributes import PALETTE
    from ldmkit.evaluate.probes import draw_probes

    tree = ast.parse(open(probes_module.__file__, encoding="utf-8").read())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert modules and not any(m.startswith("ldmkit.data") for m in modules)

    p = draw_probes(300, 32, seed=3)
    assert len(p) == 300 and p.masks.shape == p.edges.shape == (300, 1, 32, 32)
    assert torch.equal(p.masks, draw_probes(300, 32, seed=3).masks) and not torch.equal(p.masks, draw_probes(300, 32, 4).masks)
    assert bool((p.edges <= p.masks).all()) and 0 < p.edges.sum() < p.masks.sum()
    assert all(a != b for a, b in zip(p.quadrants, p.other_quadrants))
    assert all(c.endswith(q) and o.endswith(oq) for c, q, o, oq in zip(p.captions, p.quadrants, p.other_captions, p.other_quadrants))
    wrong = 0
    for i in range(len(p)):
        colour = torch.tensor(PALETTE[p.colours[i]], dtype=torch.float) / 127.5 - 1
        image = torch.where(p.masks[i].bool(), colour[:, None, None], torch.tensor(-1.0))  # (3, 32, 32)
        wrong += check_attributes(image) != {"colour": p.colours[i], "position": p.quadrants[i], "shape": p.shapes[i]}
    assert wrong <= 2  # measured 99.8 % on 1,000 probes (the smallest turned triangles sit near the rule's edge)
    assert len(set(p.shapes)) == 3 and len(set(p.quadrants)) == 4


# ---- the extended vocabulary (issue 15): white and diamond


@pytest.mark.parametrize("size", [32, 64])
def test_extended_words_read_right_on_clean_renders(size):
    """All 112 extended combinations (white, diamond and the basic 72), jittered, read right with the
    extended judge; the basic judge's answers on the basic 72 are unchanged."""
    from ldmkit.data.shapes import combos

    for seed in range(4):
        rng = np.random.default_rng([seed, size, 15])
        for shape, colour, position in combos("extended"):
            image, _, _ = render_shape(shape, colour, position, size, rng)
            assert check_attributes(image, "extended") == {"colour": colour, "position": position, "shape": shape}
            if (shape, colour, position) in COMBOS:
                assert check_attributes(image) == {"colour": colour, "position": position, "shape": shape}


def test_diamond_is_told_from_triangle_by_its_symmetry():
    """Both fill half of their upright box; only the diamond is the same upside down."""
    tri, _, _ = render_shape("triangle", "white", "top left", 32)
    dia, _, _ = render_shape("diamond", "white", "top left", 32)
    assert check_attributes(tri, "extended")["shape"] == "triangle"
    assert check_attributes(dia, "extended")["shape"] == "diamond"
    assert check_attributes(dia)["shape"] == "square"  # the basic judge has no diamond: a square at 45 degrees


def test_extended_captions_pick_the_extended_judge():
    from ldmkit.data.shapes import ShapesDataset as DS

    ds = DS(size=32, length=224, seed=3, vocabulary="extended")
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    captions = [ds[i]["text"] for i in range(len(ds))]
    assert {"white", "diamond"} <= set(" ".join(captions).split())
    assert score_captions(images, captions) == {"colour": 1.0, "position": 1.0, "shape": 1.0, "all": 1.0, "n": 224}
    with pytest.raises(LdmkitError, match="cannot score"):
        score_captions(images[:1], ["a white diamond in the top left"], vocabulary="basic")


# --- strict shape (issue 31): the caption's ideal shape fitted to the sample ------------------------------------

FINE = 8  # degraded shapes are drawn at 8x and box-averaged


def _geometry(shape, position, size, rng, layout):
    """(cx, cy, r, angle) as shapes.render_shape draws them (fixed layout: jittered and upright)."""
    if layout == "free":
        return _free_geometry(shape, position, size, rng)
    row, col = divmod(POSITIONS.index(position), 2)
    dx, dy = rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2) * size
    return (0.25 + 0.5 * col) * size + dx, (0.25 + 0.5 * row) * size + dy, rng.uniform(*RADIUS) * size, None


def _fine(points, size, ellipse=False) -> np.ndarray:
    canvas = Image.new("L", (size * FINE, size * FINE), 0)
    draw = ImageDraw.Draw(canvas)
    (draw.ellipse if ellipse else draw.polygon)([(x * FINE - 0.5, y * FINE - 0.5) for x, y in points], fill=255)
    return np.asarray(canvas) > 127  # (size·8, size·8)


def _image(fine: np.ndarray, colour: str, size: int) -> np.ndarray:
    coverage = fine.reshape(size, FINE, size, FINE).mean(axis=(1, 3))  # (size, size)
    return np.rint(coverage[..., None] * np.asarray(COLOURS[colour], np.float32)).astype(np.uint8)


def degraded(kind: str, amount: float, shape: str, colour: str, position: str, size: int, rng, layout="fixed"):
    """A shape drawn wrong in one way, to a known degree (amount):
    blurred  Gaussian blur of the clean render, σ = amount · size
    rounded  morphological opening with a disc of radius amount · r: every corner an arc (polygons)
    pinched  each side's midpoint pulled towards the centroid by amount · side: concave sides (polygons)
    lumpy    a circle whose radius wobbles, r(θ) = r (1 + amount · sin(kθ + φ)), k = 3 … 5 lobes"""
    cx, cy, r, angle = _geometry(shape, position, size, rng, layout)
    kind_of, pts = _outline(shape, cx, cy, r, angle)
    if kind == "blurred":
        img = _image(_fine(pts, size, kind_of == "ellipse"), colour, size).astype(np.float32)
        sigma = amount * size
        return np.rint(ndimage.gaussian_filter(img, (sigma, sigma, 0))).clip(0, 255).astype(np.uint8)
    if kind == "rounded":
        rho = amount * r * FINE
        n = math.ceil(rho)
        yy, xx = np.mgrid[-n : n + 1, -n : n + 1]
        return _image(ndimage.binary_opening(_fine(pts, size), structure=xx**2 + yy**2 <= rho**2), colour, size)
    if kind == "pinched":
        gx, gy = np.mean([p[0] for p in pts]), np.mean([p[1] for p in pts])
        out = []
        for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
            mx, my = (x0 + x1) / 2, (y0 + y1) / 2
            pull = amount * math.hypot(x1 - x0, y1 - y0) / math.hypot(gx - mx, gy - my)
            out += [(x0, y0), (mx + (gx - mx) * pull, my + (gy - my) * pull)]
        return _image(_fine(out, size), colour, size)
    if kind == "lumpy":
        lobes, phase = rng.integers(3, 6), rng.uniform(0, 2 * math.pi)
        th = np.linspace(0, 2 * math.pi, 180, endpoint=False)
        rr = r * (1 + amount * np.sin(lobes * th + phase))
        return _image(_fine(list(zip(cx + rr * np.cos(th), cy + rr * np.sin(th))), size), colour, size)
    raise ValueError(kind)


# The calibration points: (kind, amount, shapes). Each is plainly visible at 32 px (docs/shape-judge.md).
DEGRADED = [("blurred", 0.03, ("circle", "square", "triangle")), ("rounded", 0.3, ("square", "triangle")),
            ("pinched", 0.06, ("square", "triangle")), ("lumpy", 0.1, ("circle",))]


def pass_rate(kind: str, amount: float, shapes, size: int, layout: str, repeats: int = 1, seed: int = 0) -> float:
    """Fraction of shapes.COMBOS (of `shapes`) drawn `kind` that pass the strict shape rule."""
    rng = np.random.default_rng([seed, size])
    results = []
    for _ in range(repeats):
        for shape, colour, position in COMBOS:
            if shape not in shapes:
                continue
            if kind == "clean":
                image = render_shape(shape, colour, position, size, rng, layout)[0]
            else:
                image = degraded(kind, amount, shape, colour, position, size, rng, layout)
            results.append(shape_fidelity(image, shape).passed)
    return sum(results) / len(results)


def calibration_table(sizes=(32, 64), repeats: int = 2) -> str:
    """docs/shape-judge.md's table: strict pass rates of clean and degraded renders at several degrees."""
    rows = [("clean", 0.0, ("circle", "square", "triangle"))]
    rows += [("blurred", a, ("circle", "square", "triangle")) for a in (0.008, 0.016, 0.03)]
    rows += [("rounded", a, ("square", "triangle")) for a in (0.1, 0.2, 0.3)]
    rows += [("pinched", a, ("square", "triangle")) for a in (0.03, 0.06)]
    rows += [("lumpy", a, ("circle",)) for a in (0.05, 0.1)]
    cols = [(s, lay) for s in sizes for lay in ("fixed", "free")]
    lines = ["| render | amount | " + " | ".join(f"{s} px {lay}" for s, lay in cols) + " |",
             "| --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    for kind, amount, shapes in rows:
        rates = [pass_rate(kind, amount, shapes, s, lay, repeats) for s, lay in cols]
        lines.append(f"| {kind} | {amount:g} | " + " | ".join(f"{100 * r:.0f} %" for r in rates) + " |")
    return "\n".join(lines)


@pytest.mark.parametrize("size,repeats", [(32, 2), (64, 1)])
@pytest.mark.parametrize("layout", ["fixed", "free"])
def test_strict_shape_passes_clean_renders(size, layout, repeats):
    """The dataset's own renders, at any jitter, size and angle: all pass (the issue asks >= 99 %)."""
    assert pass_rate("clean", 0, ("circle", "square", "triangle"), size, layout, repeats) == 1.0


@pytest.mark.parametrize("layout", ["fixed", "free"])
@pytest.mark.parametrize("kind,amount,shapes", DEGRADED)
def test_strict_shape_fails_degraded_renders(kind, amount, shapes, layout):
    """Blurred, rounded, pinched and lumpy shapes: none passes (measured 0 % at 32 and 64 px, both layouts)."""
    assert pass_rate(kind, amount, shapes, 32, layout) == 0.0


def test_the_class_judge_passes_pinched_shapes_and_the_strict_rule_does_not():
    """Issue 31's gap: a square or triangle with concave sides still reads as its class."""
    rng = np.random.default_rng(1)
    for shape, colour, position in COMBOS[24:]:  # squares and triangles
        image = degraded("pinched", 0.06, shape, colour, position, 32, rng, "free")
        assert check_attributes(image)["shape"] == shape and not shape_fidelity(image, shape).passed


def test_each_check_catches_its_own_fault():
    """The fitted ideal's IoU falls for blur and lumps, solidity for concave sides, corners for rounding."""
    rng = np.random.default_rng(2)
    blur = shape_fidelity(degraded("blurred", 0.03, "square", "red", "top left", 32, rng), "square")
    lump = shape_fidelity(degraded("lumpy", 0.1, "circle", "red", "top left", 32, rng), "circle")
    pinch = shape_fidelity(degraded("pinched", 0.06, "square", "red", "top left", 32, rng), "square")
    round_ = shape_fidelity(degraded("rounded", 0.3, "square", "red", "top left", 32, rng), "square")
    assert blur.iou < STRICT_IOU and lump.iou < STRICT_IOU
    assert pinch.solidity < STRICT_SOLIDITY and pinch.corners >= STRICT_CORNERS
    assert round_.corners < STRICT_CORNERS and round_.solidity >= STRICT_SOLIDITY and round_.iou >= STRICT_IOU


def test_fit_finds_the_angle_and_a_wrong_ideal_scores_low():
    rng = np.random.default_rng(3)
    image, _, _ = render_shape("square", "green", "bottom right", 64, rng, layout="free")
    fits = {shape: shape_fidelity(image, shape) for shape in ("square", "circle", "triangle")}
    assert fits["square"].passed and not fits["circle"].passed and not fits["triangle"].passed
    image = np.zeros((64, 64, 3), np.uint8)
    y, x = np.mgrid[0:64, 0:64] + 0.5
    u, v = (x - 20) * math.cos(0.5) + (y - 20) * math.sin(0.5), (y - 20) * math.cos(0.5) - (x - 20) * math.sin(0.5)
    image[(np.abs(u) <= 9) & (np.abs(v) <= 9)] = (230, 40, 40)  # a square turned by 0.5 rad = 28.6 degrees
    assert shape_fidelity(image, "square").angle == pytest.approx(math.degrees(0.5), abs=1.0)
    bar = np.zeros((32, 32, 3), np.uint8)
    bar[4:28, 2:5] = (230, 40, 40)  # a thin bar by the border: the disc of its area reaches past the image
    fit = shape_fidelity(bar, "circle")
    assert fit.iou < 0.3 and not fit.passed  # the ideal is charged for all of itself, off the image too


def test_diamonds_pass_and_black_images_give_nothing():
    rng = np.random.default_rng(4)
    for shape, colour, position in combos("extended"):
        if shape == "diamond":
            assert shape_fidelity(render_shape(shape, colour, position, 32, rng)[0], "diamond").passed
    assert shape_fidelity(np.zeros((32, 32, 3), np.uint8), "circle") is None
    with pytest.raises(LdmkitError, match="ideal shape"):
        shape_fidelity(np.zeros((32, 32, 3), np.uint8), "star")


def test_score_captions_strict():
    images = [render_shape("square", "red", "top left", 32)[0],
              degraded("pinched", 0.06, "square", "blue", "top right", 32, np.random.default_rng(0)),
              render_shape("circle", "green", "bottom left", 32)[0]]
    captions = [caption("square", "red", "top left"), caption("square", "blue", "top right"),
                caption("triangle", "green", "bottom left")]
    scores = score_captions(images, captions, strict=True)
    assert scores["shape"] == pytest.approx(2 / 3) and scores["shape_strict"] == pytest.approx(1 / 3)
    assert scores["all_strict"] == pytest.approx(1 / 3) and scores["n"] == 3
    assert "shape_strict" not in score_captions(images, captions)


def test_evaluate_reports_strict_shape_beside_the_class(tmp_path):
    """`ldmkit evaluate` on a `shapes` model: strict shape next to shape in results and report, text and label
    routes; strict never exceeds the class rate (it needs the class right)."""
    from test_pipeline import make_ldm

    from ldmkit.evaluate.diffusion import evaluate_diffusion

    res = evaluate_diffusion(make_ldm(text=True, classes=18), tmp_path, seeds=1, steps=1, dataset="shapes",
                             num_images=8)
    for route in ("text", "label"):
        assert 0 <= res[route]["shape_strict"] <= res[route]["shape"] <= 1, res[route]
    assert 0 <= res["text"]["all_strict"] <= res["text"]["all"]
    report = (tmp_path / "report.md").read_text()
    assert "| colour | position | shape | strict shape | all | all (strict) | n |" in report
    assert "| colour | shape | strict shape | n |" in report


def test_report_rows_read_the_strict_figures():
    from ldmkit.evaluate.diffusion import _report

    text = {"colour": 1.0, "position": 0.75, "shape": 0.5, "shape_strict": 0.25, "all": 0.5, "all_strict": 0.125,
            "n": 8}
    res = {"dataset": "shapes", "not_judged": [], "text": text, "text_new": text, "text_basic": text,
           "label": {"colour": 1.0, "shape": 0.5, "shape_strict": 0.375, "n": 8}}
    report = _report(res, [], "dpmpp_2m", 25, 2.0, 2)
    assert "| all | 100.0 % | 75.0 % | 50.0 % | 25.0 % | 50.0 % | 12.5 % | 8 |" in report
    assert "| 100.0 % | 50.0 % | 37.5 % | 8 |" in report
