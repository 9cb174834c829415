"""×4 super-resolution with a ``StableDiffusionUpscalePipeline``, in tiles past a size.

Memory of a diffusion upscaler grows with the output's area (latents, VAE decoder
activations), so an input larger than ``tile`` pixels a side is cut into overlapping tiles,
each upscaled on its own, and put back together with weights that ramp linearly across the
overlaps: every output pixel is a convex blend of the tiles that cover it, so no seam shows
where one tile's noise ends and the next begins. Peak memory is that of one tile.

diffusers' upscale pipeline has only the legacy ``callback(step, t, latents)``; raising
``JobCanceled`` from it stops the loop between two steps without touching the class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from app.jobspecs import UPSCALE_FACTOR as SCALE
from worker.pipelines import rebuild


@dataclass(frozen=True)
class UpscaleParams:
    prompt: str = ""
    steps: int = 20
    guidance_scale: float = 0.0
    noise_level: int = 20
    seed: int = 0
    tile: int = 128  # input pixels a side above which the image is tiled
    overlap: int = 16  # input pixels two neighbouring tiles share


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Offsets of tiles of side ``tile`` covering ``length`` with at least ``overlap``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = -(-(length - overlap) // stride)  # ceil: enough tiles to reach the end
    # Spread the tiles evenly so every overlap is at least ``overlap`` wide.
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def ramp(length: int, left: int, right: int) -> np.ndarray:
    """1 in the middle, rising linearly over ``left`` pixels and falling over ``right``."""
    w = np.ones(length, np.float32)
    if left:
        w[:left] = (np.arange(left, dtype=np.float32) + 0.5) / left
    if right:
        w[-right:] = np.minimum(w[-right:], (np.arange(right, 0, -1, dtype=np.float32) - 0.5)
                                / right)
    return w


def plan(width: int, height: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) of every input tile, row by row."""
    xs, ys = tile_starts(width, tile, overlap), tile_starts(height, tile, overlap)
    return [(x, y, min(tile, width), min(tile, height)) for y in ys for x in xs]


def pad_to_multiple(image: Image.Image, multiple: int) -> Image.Image:
    """``image`` grown right and down to sides that are multiples of ``multiple``, by
    repeating its edge pixels (no new edge for the model to draw)."""
    pad_w, pad_h = -image.width % multiple, -image.height % multiple
    if not (pad_w or pad_h):
        return image
    pixels = np.asarray(image)
    return Image.fromarray(np.pad(pixels, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge"))


StepCallback = Callable[[int, int], None]  # (steps done over all tiles, total steps)


def upscale(pipe, image: Image.Image, p: UpscaleParams,
            on_step: StepCallback | None = None) -> Image.Image:
    """The ×4 image of ``image``; ``on_step`` is called after every denoising step."""
    # A scheduler holds per-run state: each call gets its own, the modules stay shared.
    pipe = rebuild(pipe, scheduler=pipe.scheduler.__class__.from_config(pipe.scheduler.config))
    image = image.convert("RGB")
    width, height = image.size
    # The pipeline cuts its input down to a multiple of the VAE's factor (13 px became 12,
    # and a side under it nothing): each tile goes in padded, its result is cropped back.
    multiple = getattr(pipe, "vae_scale_factor", 1)
    tiles = plan(width, height, p.tile, p.overlap)
    total = len(tiles) * p.steps
    out = np.zeros((height * SCALE, width * SCALE, 3), np.float32)
    weight = np.zeros((height * SCALE, width * SCALE, 1), np.float32)
    xs = sorted({t[0] for t in tiles})
    ys = sorted({t[1] for t in tiles})
    for k, (x, y, w, h) in enumerate(tiles):
        def callback(step: int, _t, _latents, k=k) -> None:
            if on_step:
                on_step(k * p.steps + step + 1, total)

        with torch.inference_mode():
            result = pipe(
                prompt=p.prompt, image=pad_to_multiple(image.crop((x, y, x + w, y + h)),
                                                       multiple),
                num_inference_steps=p.steps, guidance_scale=p.guidance_scale,
                noise_level=p.noise_level, output_type="np",
                generator=torch.Generator("cpu").manual_seed(p.seed + k),
                callback=callback, callback_steps=1,
            ).images[0][:h * SCALE, :w * SCALE]
        # Ramp only the sides that overlap a neighbour; the image's own edges keep weight 1.
        i, j = xs.index(x), ys.index(y)
        left = (xs[i - 1] + w - x) * SCALE if i > 0 else 0
        right = (x + w - xs[i + 1]) * SCALE if i + 1 < len(xs) else 0
        top = (ys[j - 1] + h - y) * SCALE if j > 0 else 0
        bottom = (y + h - ys[j + 1]) * SCALE if j + 1 < len(ys) else 0
        wt = np.outer(ramp(h * SCALE, top, bottom), ramp(w * SCALE, left, right))[..., None]
        sl = np.s_[y * SCALE:(y + h) * SCALE, x * SCALE:(x + w) * SCALE]
        out[sl] += result * wt
        weight[sl] += wt
    merged = out / np.maximum(weight, 1e-8)
    return Image.fromarray((merged.clip(0, 1) * 255).round().astype(np.uint8))
