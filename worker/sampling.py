"""Seeded, batched sampling for evaluations and reports: image ``j`` uses ``seeds[j]``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from worker.pipelines import with_scheduler


def generate(pipe: Any, prompts: list[str], seeds: list[int], guidance: float,
             steps: int = 30, batch: int = 24, negative_prompt: str | None = None,
             size: tuple[int, int] = (32, 32),
             on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """uint8 N×H×W×3 images (``size`` is height, width), DDIM, one fresh scheduler per
    batch; ``on_batch(images_done)`` after each batch may raise to stop."""
    out = []
    for i in range(0, len(prompts), batch):
        with torch.inference_mode():
            images = with_scheduler(pipe, "ddim")(
                prompt=prompts[i:i + batch], num_inference_steps=steps,
                guidance_scale=guidance, height=size[0], width=size[1], output_type="np",
                negative_prompt=None if negative_prompt is None
                else [negative_prompt] * len(prompts[i:i + batch]),
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch]],
            ).images
        out.append((images * 255).round().astype(np.uint8))
        if on_batch:
            on_batch(i + len(images))
    return np.concatenate(out)
