"""Models every fresh install registers at first start: no download, no training."""

from __future__ import annotations

import logging

from app.errors import ModelExists
from app.registry import Registry
from worker.tiny import save_tiny_pipeline, save_tiny_upscaler

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
    # Small enough that an erase job on it takes seconds: for tests and smoke runs.
    "erase_defaults": {"iterations": 20, "learning_rate": 1e-3, "ddim_steps": 10,
                       "start_guidance": 3.0},
}

TINY_X4_ID = "tiny-x4"
TINY_X4_MANIFEST = {
    "kind": "upscaler", "format": "diffusers", "pipeline": "StableDiffusionUpscalePipeline",
    "base": None,
    "source": "built from configs with seed 0 (random weights; proves the path, not quality)",
    "defaults": {"steps": 20, "guidance_scale": 0.0, "noise_level": 20},
}


def ensure_default_models(registry: Registry) -> list[str]:
    """Register the built-in models that are missing, and publish what the known domains
    offer for the API to read; return the ids added."""
    from worker.domains import DOMAINS, get_domain, published

    registry.publish_domains(published())
    added = []
    for model_id, manifest, save in ((TINY_ID, TINY_MANIFEST, save_tiny_pipeline),
                                     (TINY_X4_ID, TINY_X4_MANIFEST, save_tiny_upscaler)):
        if registry.exists(model_id):
            continue
        try:
            with registry.create(model_id, manifest) as staging:
                save(staging, seed=0)
            added.append(model_id)
            log.info("registered %s", model_id)
        except ModelExists:
            pass  # another worker won the race; its copy is identical
    # Models a domain ships in its package (a demo family's trained weights).
    shipped = {model_id: entry for name in DOMAINS
               for model_id, entry in getattr(get_domain(name), "shipped", dict)().items()}
    for model_id, (folder, manifest) in shipped.items():
        if registry.exists(model_id):
            _refresh(registry, model_id, manifest)
            continue
        if not folder.is_dir():
            continue
        try:
            registry.import_folder(folder, model_id, manifest)
            added.append(model_id)
            log.info("registered %s", model_id)
        except ModelExists:
            pass
    return added


# Manifest fields a domain's package decides by experiment: a registry made by an earlier
# version takes the package's current ones (the weights, and so the digest, are the same).
REFRESHED = ("erase_defaults",)


def _refresh(registry: Registry, model_id: str, shipped: dict) -> None:
    current = registry.get(model_id)
    fresh = {k: shipped[k] for k in REFRESHED if k in shipped and current.get(k) != shipped[k]}
    if fresh:
        registry.update_manifest(model_id, **fresh)
        log.info("%s: %s updated from its package", model_id, ", ".join(fresh))
