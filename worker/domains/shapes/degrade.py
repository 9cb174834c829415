"""Degradations that make the upscaler's low-resolution inputs (latent-diffusion paper, §4.5).

``bicubic``: plain ×4 bicubic downsampling. ``bsr``: a BSR-style chain (Zhang et al.,
"Designing a Practical Degradation Model for Deep Blind Image Super-Resolution", 2021):
blur, downsampling with a random kernel, Gaussian and sensor-like noise and JPEG
compression, in random order, so the upscaler copes with real inputs, not only clean ones.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

R = Image.Resampling
_RESAMPLE = (R.BICUBIC, R.BILINEAR, R.LANCZOS, R.BOX)


def bicubic(image: np.ndarray, factor: int = 4) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w // factor, h // factor), R.BICUBIC))


def _blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.2, 1.5))))


def _noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    a: np.ndarray = np.asarray(img).astype(np.float32)
    if rng.random() < 0.5:  # Gaussian, colour or grey
        sigma = rng.uniform(1, 12)
        shape = a.shape if rng.random() < 0.5 else a.shape[:2] + (1,)
        a = a + rng.normal(0, sigma, shape)
    else:  # sensor-like: Poisson shot noise
        scale = 10 ** rng.uniform(1.5, 3)
        a = rng.poisson(np.clip(a, 0, 255) / 255 * scale) / scale * 255
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(40, 95)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def bsr(image: np.ndarray, rng: np.random.Generator, factor: int = 4) -> np.ndarray:
    h, w = image.shape[:2]
    img = Image.fromarray(image)
    steps = ["blur", "down", "noise", "jpeg"]
    rng.shuffle(steps)
    for step in steps:
        if step == "blur":
            img = _blur(img, rng)
        elif step == "down":
            img = img.resize((w // factor, h // factor), _RESAMPLE[rng.integers(len(_RESAMPLE))])
        elif step == "noise" and rng.random() < 0.7:
            img = _noise(img, rng)
        elif step == "jpeg" and rng.random() < 0.7:
            img = _jpeg(img, rng)
    if img.size != (w // factor, h // factor):
        img = img.resize((w // factor, h // factor), R.BICUBIC)
    return np.asarray(img)


def degrade(image: np.ndarray, rng: np.random.Generator, factor: int = 4) -> np.ndarray:
    """Half bicubic, half BSR: the mix the upscaler trains on."""
    return bicubic(image, factor) if rng.random() < 0.5 else bsr(image, rng, factor)
