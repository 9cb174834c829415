"""Live previews: the predicted clean image x̂₀ every k denoising steps, as a small PNG.

x̂₀ is what the scheduler's step itself estimates (``pred_original_sample``); a scheduler
subclass keeps it after each step (``previewing``), so a preview shows the picture the
model is heading for, not the noisy latent. Schedulers that do not estimate it (PNDM,
DPM-Solver++) preview the current latent instead.

Decoding: small images through the model's own VAE (cheap at that size); larger ones
through a linear latent → RGB map, fitted once per model from its VAE
(``fit_preview_map``) and kept in the model's manifest: a few multiply-adds a pixel, at
the latent's resolution.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

VAE_MAX_PIXELS = 128 * 128  # images up to this size preview through the VAE
PREVIEW_SIDE = 256
PREVIEW_WIDTH = 1024
_SUBCLASSES: dict[type, Any] = {}


def previewing(scheduler: Any) -> Any:
    """A fresh scheduler like ``scheduler`` that keeps each step's x̂₀ as ``pred_original``."""
    cls = type(scheduler)
    if cls not in _SUBCLASSES:
        @functools.wraps(cls.step)  # the pipeline reads step's signature (eta, generator)
        def step(self: Any, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
            # The output object names its fields; the tuple form's order varies by class.
            out = cls.step(self, *args, return_dict=True, **kwargs)
            self.pred_original = getattr(out, "pred_original_sample", None)
            return out if return_dict else (out.prev_sample,)

        _SUBCLASSES[cls] = type(f"Previewing{cls.__name__}", (cls,), {"step": step})
    fresh = _SUBCLASSES[cls].from_config(scheduler.config)
    fresh.pred_original = None
    return fresh


@torch.no_grad()
def fit_preview_map(vae: Any, seed: int = 0, n: int = 4, side: int = 16) -> list[list[float]]:
    """Least-squares weights (channels + 1 rows, 3 columns) from a latent pixel (as the
    UNet sees it) to the mean colour its VAE decodes that pixel's patch to."""
    g = torch.Generator().manual_seed(seed)
    channels = vae.config.latent_channels
    z = torch.randn(n, channels, side, side, generator=g).to(vae.device, vae.dtype)
    images = vae.decode(z / vae.config.scaling_factor).sample.float()
    factor = images.shape[-1] // side
    patches = torch.nn.functional.avg_pool2d(images, factor)  # n × 3 × side × side
    x = z.float().permute(0, 2, 3, 1).reshape(-1, channels)
    x = torch.cat([x, torch.ones(len(x), 1, device=x.device)], dim=1)
    y = patches.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(x.cpu(), y.cpu()).solution.tolist()


def through_vae(height: int, width: int) -> bool:
    """Whether an image of this size previews through the VAE (else the linear map)."""
    return height * width <= VAE_MAX_PIXELS


def png_data_url(images: np.ndarray) -> str:
    """uint8 N×H×W×3 images side by side as a PNG data URL, at most ``PREVIEW_SIDE`` a
    side each and ``PREVIEW_WIDTH`` wide in all: a preview is a glimpse, and each one is
    kept in Redis while a reader may still ask for it."""
    strip = Image.fromarray(np.concatenate(list(images), axis=1))
    n, h, w = images.shape[:3]
    scale = min(1.0, PREVIEW_SIDE / max(h, w), PREVIEW_WIDTH / (n * w))
    if scale < 1.0:
        strip = strip.resize((max(1, round(n * w * scale)), max(1, round(h * scale))),
                             Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Previewer:
    """A diffusers ``callback_on_step_end`` wrapper: every ``every`` steps it decodes the
    step's x̂₀ and hands ``on_preview(step, total, data_url)`` the picture."""

    def __init__(self, pipe: Any, every: int, total: int,
                 on_preview: Callable[[int, int, str], None],
                 preview_map: list[list[float]] | None = None):
        self.pipe, self.every, self.total = pipe, every, total
        self.on_preview, self.preview_map = on_preview, preview_map
        self.sent = 0

    def wrap(self, callback: Callable) -> Callable:
        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
            out = callback(pipe, step, timestep, kwargs)
            done = step + 1
            if done % self.every == 0 and done < self.total:  # the last step is the image
                latents = getattr(pipe.scheduler, "pred_original", None)
                self.on_preview(done, self.total, png_data_url(self.decode(
                    kwargs["latents"] if latents is None else latents)))
                self.sent += 1
            return out

        return on_step_end

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.pipe.vae
        f = self.pipe.vae_scale_factor
        if through_vae(latents.shape[-2] * f, latents.shape[-1] * f) or self.preview_map is None:
            images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
            rgb = images.float().permute(0, 2, 3, 1)
        else:
            w = torch.tensor(self.preview_map, device=latents.device, dtype=torch.float32)
            x = latents.float().permute(0, 2, 3, 1)
            rgb = x @ w[:-1] + w[-1]
        return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
