from __future__ import annotations

import numpy as np
import pytest

from worker.domains.shapes.degrade import bicubic, bsr, degrade
from worker.domains.shapes.render import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    Scene,
    batch,
    render,
    sample_scene,
)


def centred(shape: str, color: str = "red", background: str = "white") -> Scene:
    return Scene(shape, color, background, cx=0.5, cy=0.5, radius=0.4)


def test_same_seed_same_pixels_and_other_seed_differs():
    a, scenes_a = batch(np.random.default_rng(5), 8)
    b, _ = batch(np.random.default_rng(5), 8)
    c, _ = batch(np.random.default_rng(6), 8)
    assert a.shape == (8, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert all(s.shape in SHAPES and s.color in COLORS and s.background in BACKGROUNDS
               for s in scenes_a)


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_centre_has_the_colour_and_corners_the_background(shape):
    img = render(centred(shape), 32)
    assert tuple(img[16, 16]) == COLORS["red"]
    assert tuple(img[0, 0]) == BACKGROUNDS["white"]


def test_triangle_points_up_and_cross_is_a_plus():
    tri = render(centred("triangle", background="black"), 128).sum(-1) > 0
    rows = tri.sum(1)
    top, bottom = rows[20:30].mean(), rows[95:105].mean()
    assert 0 < top < bottom / 3  # narrow at the top, wide at the base
    cross = render(centred("cross", background="black"), 128).sum(-1) > 0
    assert cross[64, 20] and cross[20, 64]  # arms reach out along both axes
    assert not cross[25, 25]  # the corners between the arms are empty


def test_edges_are_anti_aliased():
    img = render(Scene("circle", "blue", "white", 0.5, 0.5, 0.33), 32)
    # Edge pixels mix shape and background: neither pure colour.
    values = {tuple(p) for p in img.reshape(-1, 3)}
    assert len(values) > 3


def test_shapes_stay_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = sample_scene(rng)
        assert s.radius <= s.cx <= 1 - s.radius and s.radius <= s.cy <= 1 - s.radius


def test_degradations_give_a_quarter_size_image():
    img = render(centred("square"), 128)
    rng = np.random.default_rng(1)
    assert bicubic(img).shape == (32, 32, 3)
    assert bsr(img, rng).shape == (32, 32, 3)
    assert degrade(img, rng).shape == (32, 32, 3)
    # BSR noise and JPEG make it differ from the clean bicubic image most of the time.
    differs = [not np.array_equal(bsr(img, np.random.default_rng(i)), bicubic(img))
               for i in range(10)]
    assert sum(differs) >= 8
