"""Bringing outside models into the registry: any diffusers folder, or a hub download."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from app.errors import InvalidParams
from app.registry import Registry, validate_model_id
from worker.pipelines import Runtime, load_pipeline

# diffusers pipeline class -> registry kind
_KINDS = {
    "StableDiffusionPipeline": "text-to-image",
    "StableDiffusionUpscalePipeline": "upscaler",
}


def inspect_folder(path: Path) -> dict:
    """Check that ``path`` is a diffusers pipeline folder that loads; describe it."""
    index = path / "model_index.json"
    if not index.is_file():
        raise InvalidParams(f"`path` {str(path)!r} has no model_index.json: not a diffusers folder")
    pipeline = json.loads(index.read_text()).get("_class_name", "")
    if pipeline not in _KINDS:
        raise InvalidParams(f"`path` holds a {pipeline!r}; supported: {sorted(_KINDS)}")
    load_pipeline(path, Runtime.resolve("cpu", "float32"))  # raises if anything is off
    return {"kind": _KINDS[pipeline], "format": "diffusers", "pipeline": pipeline, "base": None}


def import_model(registry: Registry, path: Path, model_id: str) -> dict:
    validate_model_id(model_id, "id")
    manifest = inspect_folder(path) | {"source": f"imported from {path.resolve()}"}
    return registry.import_folder(path, model_id, manifest)


def pull_model(registry: Registry, hub_id: str, model_id: str) -> dict:
    """Download a pipeline from the Hugging Face Hub (needs network; never used at run time)."""
    from diffusers import DiffusionPipeline

    validate_model_id(model_id, "id")
    with tempfile.TemporaryDirectory() as tmp:
        DiffusionPipeline.from_pretrained(hub_id).save_pretrained(tmp, safe_serialization=True)
        manifest = inspect_folder(Path(tmp)) | {"source": f"hub:{hub_id}"}
        return registry.import_folder(Path(tmp), model_id, manifest)
