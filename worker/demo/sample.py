"""Seeded, batched 32×32 sampling for the shapes reports: image ``j`` uses ``seeds[j]``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from worker.pipelines import with_scheduler


def generate(pipe: Any, prompts: list[str], seeds: list[int], guidance: float,
             steps: int = 30, batch: int = 24) -> np.ndarray:
    """uint8 N×32×32×3 images, DDIM, one fresh scheduler per batch."""
    out = []
    for i in range(0, len(prompts), batch):
        with torch.inference_mode():
            images = with_scheduler(pipe, "ddim")(
                prompt=prompts[i:i + batch], num_inference_steps=steps,
                guidance_scale=guidance, width=32, height=32, output_type="np",
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch]],
            ).images
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out)
