"""Taking a model out of the registry: a standalone diffusers folder or a single-file
checkpoint, an edit merged in; or an edit alone, as a LoRA file.

Inside Lethe an edited model is only its ``unet_delta.safetensors`` on top of its base;
a user who takes it elsewhere needs an ordinary folder that
``StableDiffusionPipeline.from_pretrained`` loads with no Lethe code, or a LoRA that
the WebUI tools and ``load_lora_weights`` put on the base they already have
(``worker.lora``, ``worker.lorafiles``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from app.errors import InvalidParams, ModelExists
from app.registry import Registry
from worker.esd import apply_delta
from worker.lora import lora_of_edit
from worker.lorafiles import kohya_metadata, write_layout
from worker.pipelines import Runtime, load_pipeline, save_pipeline
from worker.singlefile import config_metadata, original_state_dict
from worker.variants import load_delta

EXPORT_DTYPES = ("float32", "float16")
# What a manifest says about using the weights, which an import of an export keeps.
USAGE = ("defaults", "limits", "erase_defaults", "domain")


def export_model(registry: Registry, model_id: str, dest: Path,
                 dtype: str = "float32") -> Path:
    """Write ``model_id`` to ``dest`` as a diffusers folder; deltas merged into their base.

    The folder appears whole or not at all (written beside ``dest``, then renamed), and
    carries the registry manifest as ``lethe.json`` so its provenance travels with it.
    """
    dest = _new_path(dest)
    manifest, source, pipe = _merged(registry, model_id, dtype)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_pipeline(pipe, staging)
        (staging / "lethe.json").write_text(json.dumps(manifest, indent=2))
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def export_single_file(registry: Registry, model_id: str, dest: Path,
                       dtype: str = "float16") -> Path:
    """Write ``model_id`` (an edit merged into its base) as one ``.safetensors`` file in the
    original Stable Diffusion layout (``worker.singlefile``), which diffusers'
    ``from_single_file`` and the WebUI tools load. Its metadata carries the config folder
    (so Lethe reads it back exactly, tiny test models included) and the manifest."""
    dest = _new_path(dest)
    manifest, source, pipe = _merged(registry, model_id, dtype)
    if manifest["kind"] != "text-to-image":
        raise InvalidParams(f"`id` {model_id!r} is a {manifest['kind']}; only text-to-image "
                            "models export as a single file")
    if manifest.get("base"):  # how the edit draws and erases is its root base's
        base = registry.get(_lineage(registry, model_id)[0])
        manifest = {**{k: base[k] for k in USAGE if k in base}, **manifest}
    metadata = {"lethe": json.dumps(manifest), **config_metadata(source)}
    _write_safetensors(original_state_dict(pipe), dest, metadata)
    return dest


def _new_path(dest: Path) -> Path:
    dest = Path(dest)
    if dest.exists():
        raise ModelExists(f"`to` {str(dest)!r} exists already; pick a new path")
    return dest


def merged_unet(registry: Registry, model_id: str, skip_last: bool = False) -> Any:
    """``model_id``'s UNet alone in float32 (what a LoRA is made or read against): its
    root base's with every delta of its lineage applied (``skip_last``: all but its own).
    Alone, as a whole pipeline would hold SDXL's text encoders beside it for nothing."""
    from diffusers import UNet2DConditionModel

    root, edits = _lineage(registry, model_id)
    unet = UNet2DConditionModel.from_pretrained(registry.path(root) / "unet",
                                                torch_dtype=torch.float32)
    for edit in edits[:-1] if skip_last else edits:
        apply_delta(unet, load_delta(registry.path(edit)))
    return unet.eval()


def _lineage(registry: Registry, model_id: str) -> tuple[str, list[str]]:
    """The diffusers model at the root of ``model_id``'s lineage, and the edits from it
    down to ``model_id`` in the order they apply (an edit may be the base of another)."""
    edits: list[str] = []
    while True:
        manifest = registry.get(model_id)
        if manifest["format"] == "diffusers":
            return model_id, edits[::-1]
        if manifest["format"] != "delta":
            raise InvalidParams(
                f"`id` {model_id!r} is a {manifest['kind']} ({manifest['format']}); "
                "only diffusers pipelines and their edits export")
        _check_base(registry, model_id, manifest)
        edits.append(model_id)
        model_id = manifest["base"]["id"]


def _merged(registry: Registry, model_id: str, dtype: str) -> tuple[dict, Path, Any]:
    """The manifest, the folder of configs, and the pipeline of ``model_id``, the deltas
    of its lineage applied to the root base."""
    if dtype not in EXPORT_DTYPES:
        raise InvalidParams(f"`dtype` {dtype!r} is not one of {list(EXPORT_DTYPES)}")
    manifest = registry.get(model_id)
    root, edits = _lineage(registry, model_id)
    source = registry.path(root)
    pipe = load_pipeline(source, Runtime.resolve("cpu", dtype))
    for edit in edits:
        apply_delta(pipe.unet, load_delta(registry.path(edit)))
    return manifest, source, pipe


def _write_safetensors(tensors: dict[str, torch.Tensor], dest: Path,
                       metadata: dict[str, str]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, dest)  # the file appears whole or not at all
    finally:
        tmp.unlink(missing_ok=True)


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
                energy: float = 0.99, layout: str = "kohya", dtype: str = "float16") -> Path:
    """Write edit ``model_id`` as a LoRA ``.safetensors`` file for its base.

    ``layout``: ``kohya`` (what the WebUI tools and diffusers read) or ``peft`` (diffusers'
    own; ``worker.lorafiles``). ``rank``: factors per changed matrix; None: the least
    keeping ``energy`` of each difference. The file's metadata carries the layout, the
    ranks, the energy kept, what no LoRA can hold (changed biases and norms), the manifest,
    and the fields the WebUI tools display (``ss_network_dim``, the base's name)."""
    dest = _new_path(dest)
    if dtype not in EXPORT_DTYPES:
        raise InvalidParams(f"`dtype` {dtype!r} is not one of {list(EXPORT_DTYPES)}")
    manifest = registry.get(model_id)
    if manifest["format"] != "delta":
        raise InvalidParams(f"`id` {model_id!r} is not an edit ({manifest['format']}); only "
                            "an edit exports as a LoRA of its base")
    base_id = manifest["base"]["id"]
    unet = merged_unet(registry, model_id, skip_last=True)  # its base's
    export = lora_of_edit(unet, load_delta(registry.path(model_id)), rank=rank,
                          energy=energy)
    tensors = write_layout(export.factors, layout, unet)
    metadata = {"lethe": json.dumps(manifest), "lora_layout": layout,
                "ranks": json.dumps(export.ranks),
                "kept_energy": json.dumps(export.kept_energy),
                "left_out": json.dumps(export.left_out),
                **kohya_metadata(export.ranks, unet, base_id, model_id)}
    _write_safetensors({k: v.to(getattr(torch, dtype)).contiguous()
                        for k, v in tensors.items()}, dest, metadata)
    return dest
