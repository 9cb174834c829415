"""Models every fresh install registers at first start: no download, no training."""

from __future__ import annotations

import logging

from app.errors import ModelExists
from app.registry import Registry
from worker.tiny import save_tiny_pipeline

log = logging.getLogger("lethe.worker.defaults")

TINY_ID = "tiny-sd"
TINY_MANIFEST = {
    "kind": "text-to-image",
    "format": "diffusers",
    "pipeline": "StableDiffusionPipeline",
    "base": None,
    "source": "built from configs with seed 0 (random weights; proves the path, not quality)",
    "defaults": {"steps": 20, "guidance_scale": 5.0, "width": 32, "height": 32,
                 "scheduler": "ddim"},
    "limits": {"max_side": 256},
}


def ensure_default_models(registry: Registry) -> list[str]:
    """Register the built-in models that are missing; return the ids added."""
    added = []
    if not registry.exists(TINY_ID):
        try:
            with registry.create(TINY_ID, TINY_MANIFEST) as staging:
                save_tiny_pipeline(staging, seed=0)
            added.append(TINY_ID)
            log.info("registered %s", TINY_ID)
        except ModelExists:
            pass  # another worker won the race; its copy is identical
    return added
