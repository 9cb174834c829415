"""A second, model-free opinion on which shape an image shows: its outline's geometry.

``shapes-clf`` learnt from clean renders. On the damaged drawings an attack on an erasure
brings out — rounded blobs with a point somewhere — it answers "triangle" with a
probability near 1, so a recovered rate judged by it alone counts blobs as triangles. The
outline does not care about texture: the largest triangle inside the shape's convex hull
covers 0.72–0.89 of the hull for every rendered triangle and every triangle ``shapes-sd``
draws, about 0.43 of a circle's, 0.50 of a square's and 0.44 of a cross's; a square fills
its hull (≥ 0.98), a cross does not (≤ 0.82). The shape is the largest 4-connected region of
pixels whose colour differs from the border's median by more than ``CONTRAST``.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import numpy as np

CONTRAST = 90  # summed |ΔRGB| from the background colour that makes a pixel the shape's
MIN_PIXELS = 6
# Halfway between the most triangle-like other shape shapes-sd draws (a square, 0.515) and
# the least triangle-like triangle (0.723): rounded triangles still count.
TRIANGLE = 0.62


@dataclass(frozen=True)
class Outline:
    pixels: int
    fill: float  # the shape's area / its convex hull's
    triangle: float  # the largest triangle inside the hull / the hull's area


def foreground(image: np.ndarray) -> np.ndarray:
    """The largest 4-connected region that differs from the background (H×W bool)."""
    h, w, _ = image.shape
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(int)
    mask = np.abs(image.astype(int) - np.median(border, axis=0)).sum(-1) > CONTRAST
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        region, todo = [], deque([(int(y0), int(x0))])
        seen[y0, x0] = True
        while todo:
            y, x = todo.popleft()
            region.append((y, x))
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    todo.append((yy, xx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    for y, x in best:
        out[y, x] = True
    return out


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain: the hull's vertices, counter-clockwise."""
    pts = sorted({(float(x), float(y)) for x, y in points})

    def turn(o: tuple, a: tuple, b: tuple) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    upper: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and turn(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and turn(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def outline(image: np.ndarray) -> Outline | None:
    """The shape's outline measures; None when no shape stands out."""
    ys, xs = np.nonzero(foreground(image))
    if len(xs) < MIN_PIXELS:
        return None
    # Every pixel as its square (four corners), so the hull bounds the drawn area.
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    hull = convex_hull(corners)
    area = polygon_area(hull)
    best = max((abs(float(np.cross(hull[j] - hull[i], hull[k] - hull[i]))) / 2
                for i, j, k in itertools.combinations(range(len(hull)), 3)), default=0.0)
    return Outline(len(xs), len(xs) / area, best / area)


# What each shape's outline must measure (every render and shapes-sd drawing of it does,
# tests/worker/domains/shapes/test_geometry.py).
def looks_like(image: np.ndarray, shape: str) -> bool:
    o = outline(image)
    if o is None:
        return False
    if shape == "triangle":
        return o.triangle >= TRIANGLE
    if shape == "square":
        return o.fill >= 0.90 and 0.47 <= o.triangle <= 0.55
    if shape == "circle":
        return o.fill >= 0.88 and o.triangle <= 0.465
    if shape == "cross":
        return o.fill <= 0.86 and o.triangle <= 0.55
    raise ValueError(f"no outline test for shape {shape!r}")
