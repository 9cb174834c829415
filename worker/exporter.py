"""Taking a model out of the registry: a standalone diffusers folder, an edit merged in.

Inside Lethe an edited model is only its ``unet_delta.safetensors`` on top of its base;
a user who takes it elsewhere needs an ordinary folder that
``StableDiffusionPipeline.from_pretrained`` loads with no Lethe code.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from app.errors import InvalidParams, ModelExists
from app.registry import Registry
from worker.esd import apply_delta
from worker.pipelines import Runtime, load_pipeline
from worker.variants import load_delta

EXPORT_DTYPES = ("float32", "float16")


def export_model(registry: Registry, model_id: str, dest: Path,
                 dtype: str = "float32") -> Path:
    """Write ``model_id`` to ``dest`` as a diffusers folder; deltas merged into their base.

    The folder appears whole or not at all (written beside ``dest``, then renamed), and
    carries the registry manifest as ``lethe.json`` so its provenance travels with it.
    """
    if dtype not in EXPORT_DTYPES:
        raise InvalidParams(f"`dtype` {dtype!r} is not one of {list(EXPORT_DTYPES)}")
    dest = Path(dest)
    if dest.exists():
        raise ModelExists(f"`to` {str(dest)!r} exists already; pick a new path")
    manifest = registry.get(model_id)
    if manifest["format"] == "delta":
        base = manifest["base"]
        base_manifest = registry.get(base["id"])
        if base.get("digest") and base_manifest.get("digest") != base["digest"]:
            raise InvalidParams(
                f"`id` {model_id!r} was trained on {base['id']!r} digest {base['digest']!r}, "
                f"but the registry holds digest {base_manifest.get('digest')!r}"
            )
        source = registry.path(base["id"])
    elif manifest["format"] == "diffusers":
        source = registry.path(model_id)
    else:
        raise InvalidParams(
            f"`id` {model_id!r} is a {manifest['kind']} ({manifest['format']}); "
            "only diffusers pipelines and their edits export"
        )

    pipe = load_pipeline(source, Runtime.resolve("cpu", dtype))
    if manifest["format"] == "delta":
        apply_delta(pipe.unet, load_delta(registry.path(model_id)))

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / "lethe.json").write_text(json.dumps(manifest, indent=2))
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
