"""Taking a model out of the registry: a standalone diffusers folder, an edit merged in;
or an edit alone, as a LoRA file.

Inside Lethe an edited model is only its ``unet_delta.safetensors`` on top of its base;
a user who takes it elsewhere needs an ordinary folder that
``StableDiffusionPipeline.from_pretrained`` loads with no Lethe code, or a LoRA that
``load_lora_weights`` puts on the base they already have (``worker.lora``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from app.errors import InvalidParams, ModelExists
from app.registry import Registry
from worker.esd import apply_delta
from worker.lora import lora_of_edit
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
        _check_base(registry, model_id, manifest)
        source = registry.path(manifest["base"]["id"])
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


def _check_base(registry: Registry, model_id: str, manifest: dict) -> None:
    """An edit exports only onto the very base it was trained on."""
    base = manifest["base"]
    base_manifest = registry.get(base["id"])
    if base.get("digest") and base_manifest.get("digest") != base["digest"]:
        raise InvalidParams(
            f"`id` {model_id!r} was trained on {base['id']!r} digest {base['digest']!r}, "
            f"but the registry holds digest {base_manifest.get('digest')!r}"
        )


def export_lora(registry: Registry, model_id: str, dest: Path, rank: int | None = None,
                energy: float = 0.99) -> Path:
    """Write edit ``model_id`` as a LoRA ``.safetensors`` file (fp16 factors) for its base.

    ``rank``: factors per changed matrix; None: the least keeping ``energy`` of each
    difference. The file's metadata carries the ranks, the energy kept, what no LoRA can
    hold (changed biases) and the manifest, so a user sees what the export left out.
    """
    dest = Path(dest)
    if dest.exists():
        raise ModelExists(f"`to` {str(dest)!r} exists already; pick a new path")
    manifest = registry.get(model_id)
    if manifest["format"] != "delta":
        raise InvalidParams(f"`id` {model_id!r} is not an edit ({manifest['format']}); only "
                            "an edit exports as a LoRA of its base")
    _check_base(registry, model_id, manifest)
    base = load_pipeline(registry.path(manifest["base"]["id"]), Runtime.resolve("cpu",
                                                                                "float32"))
    export = lora_of_edit(base.unet, load_delta(registry.path(model_id)), rank=rank,
                          energy=energy)
    metadata = {"lethe": json.dumps(manifest), "ranks": json.dumps(export.ranks),
                "kept_energy": json.dumps(export.kept_energy),
                "left_out": json.dumps(export.left_out)}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    save_file({k: v.to(torch.float16) for k, v in export.state_dict.items()}, str(tmp),
              metadata=metadata)
    os.replace(tmp, dest)  # the file appears whole or not at all
    return dest
