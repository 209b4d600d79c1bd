"""The attribute checker: perfect on clean shapes, silent on empty images, strict about captions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldmkit.data.shapes import COMBOS, ShapesDataset, caption, render_shape
from ldmkit.errors import LdmkitError
from ldmkit.evaluate.attributes import check_attributes, score_captions


@pytest.mark.parametrize("size", [32, 64])
def test_clean_shapes_all_correct(size):
    for seed in range(4):
        rng = np.random.default_rng([seed, size])
        for shape, colour, position in COMBOS:
            image, _, _ = render_shape(shape, colour, position, size, rng)
            assert check_attributes(image) == {"colour": colour, "position": position, "shape": shape}


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
