"""The "shapes" domain, rendered exactly as ../shared/DESIGN.md specifies.

One solid, axis-aligned shape per image (circle, square, triangle with its apex up, cross as
a plus sign) in one of six colours on a white, black or gray background, at random size and
position. Scenes live in unit coordinates, so one scene renders at 32×32 for the generator
and at 128×128 for the upscaler. Each image is drawn ``supersample`` times larger and
box-filtered down, which anti-aliases the edges. Same seed, same scenes, same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
WORDS = ["a", "on", "background", *SHAPES, *COLORS, *BACKGROUNDS]

# Half-extent of a shape as a fraction of the image side, and the cross's arm half-width
# as a fraction of that.
MIN_RADIUS, MAX_RADIUS, CROSS_ARM = 0.18, 0.42, 0.34


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    cx: float  # centre, unit coordinates (0..1, x right, y down)
    cy: float
    radius: float  # half the shape's width and height

    def prompt(self, form: str) -> str:
        return {
            "full": f"a {self.color} {self.shape} on a {self.background} background",
            "color": f"a {self.color} {self.shape}",
            "shape": f"a {self.shape}",
            "empty": "",
        }[form]


def sample_scene(rng: np.random.Generator, shape: str | None = None, color: str | None = None,
                 background: str | None = None) -> Scene:
    radius = float(rng.uniform(MIN_RADIUS, MAX_RADIUS))
    return Scene(
        shape=shape or SHAPES[rng.integers(len(SHAPES))],
        color=color or list(COLORS)[rng.integers(len(COLORS))],
        background=background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        cx=float(rng.uniform(radius, 1 - radius)),
        cy=float(rng.uniform(radius, 1 - radius)),
        radius=radius,
    )


def shape_mask(scene: Scene, side: int) -> np.ndarray:
    """Boolean mask of the shape on a ``side``×``side`` grid of pixel centres."""
    c = (np.arange(side) + 0.5) / side
    x, y = np.meshgrid(c, c)
    dx, dy, r = x - scene.cx, y - scene.cy, scene.radius
    if scene.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if scene.shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if scene.shape == "triangle":
        # Apex at the top centre, base along the bottom edge of the bounding square.
        depth = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= r * depth)
    if scene.shape == "cross":
        arm = r * CROSS_ARM
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"`shape` must be one of {SHAPES}, got {scene.shape!r}")


def render(scene: Scene, side: int = 32, supersample: int | None = None) -> np.ndarray:
    """An ``side``×``side``×3 uint8 image of ``scene``."""
    ss = supersample or max(2, 128 // side)
    mask = shape_mask(scene, side * ss).astype(np.float32)
    # Box filter: the share of each output pixel the shape covers.
    coverage = mask.reshape(side, ss, side, ss).mean(axis=(1, 3))[..., None]
    fg = np.array(COLORS[scene.color], np.float32)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    return np.clip(coverage * fg + (1 - coverage) * bg + 0.5, 0, 255).astype(np.uint8)


PROMPT_FORMS = ("full", "color", "shape", "empty")
# How often training sees each form; "empty" teaches the unconditional branch for
# classifier-free guidance.
PROMPT_WEIGHTS = (0.4, 0.35, 0.15, 0.1)


def sample_prompt(rng: np.random.Generator, scene: Scene) -> str:
    return scene.prompt(PROMPT_FORMS[rng.choice(len(PROMPT_FORMS), p=PROMPT_WEIGHTS)])


def batch(rng: np.random.Generator, n: int, side: int = 32) -> tuple[np.ndarray, list[Scene]]:
    scenes = [sample_scene(rng) for _ in range(n)]
    return np.stack([render(s, side) for s in scenes]), scenes
