"""Models every fresh install registers at first start: no download, no training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from app.errors import ModelExists
from app.registry import Registry
from worker.tiny import save_tiny_pipeline, save_tiny_upscaler

log = logging.getLogger("lethe.worker.defaults")

# The trained "shapes" family ships inside the package (worker/domains/shapes/models/<id>/).
DEMO_DIR = Path(__file__).parent / "domains" / "shapes" / "models"
_DEMO_SOURCE = ("trained by `lethe train demo` (worker/domains/shapes/train.py); see "
                "worker/domains/shapes/models")
DEMO_MANIFESTS: dict[str, dict] = {
    "shapes-sd": {
        "kind": "text-to-image", "format": "diffusers", "pipeline": "StableDiffusionPipeline",
        "base": None, "source": _DEMO_SOURCE,
        "defaults": {"steps": 30, "guidance_scale": 4.0, "width": 32, "height": 32,
                     "scheduler": "ddim"},
        "limits": {"max_side": 128},
        "evaluator": "shapes-clf",
        "domain": "shapes",
        # Found by experiment (python -m worker.domains.shapes.erase_study; numbers in the model
        # card): esd-x at 1e-3 erases a shape in 200 iterations, a colour needs 600 at 5e-4
        # to spare its neighbours (orange); esd-u trains every other weight and needs 1e-4.
        "erase_defaults": {"iterations": 600, "learning_rate": 5e-4, "ddim_steps": 30,
                           "start_guidance": 3.0,
                           "by_method": {"esd-u": {"learning_rate": 1e-4, "iterations": 200},
                                         "esd-all": {"learning_rate": 1e-4,
                                                     "iterations": 200}}},
    },
    "shapes-x4": {
        "kind": "upscaler", "format": "diffusers", "pipeline": "StableDiffusionUpscalePipeline",
        "base": None, "source": _DEMO_SOURCE,
        # One step from t = 999 returns the model's estimate of the posterior mean: the
        # best PSNR (see its quality report); more steps sample sharper, less exact detail.
        "defaults": {"steps": 1, "guidance_scale": 0.0, "noise_level": 0},
    },
    "shapes-clf": {
        "kind": "classifier", "format": "shapes-classifier", "class": "ShapesClassifier",
        "domain": "shapes", "base": None, "source": _DEMO_SOURCE,
    },
}

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
    """Register the built-in models that are missing; return the ids added."""
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
    quality = DEMO_DIR / "quality.json"
    for model_id, manifest in DEMO_MANIFESTS.items():
        folder = DEMO_DIR / model_id
        if registry.exists(model_id) or not folder.is_dir():
            continue
        if quality.is_file():
            manifest = {**manifest, "metrics": json.loads(quality.read_text())}
        try:
            registry.import_folder(folder, model_id, manifest)
            added.append(model_id)
            log.info("registered %s", model_id)
        except ModelExists:
            pass
    return added
