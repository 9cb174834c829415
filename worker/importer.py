"""Bringing outside models into the registry: a diffusers folder, a single-file checkpoint
(``.safetensors``; a pickle only when the operator allows it), a LoRA file onto a base
already registered (an edit of it, served as its variant), or a hub download."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from app.checkpoint import (
    ARCHITECTURE_NAMES,
    PICKLE_SUFFIXES,
    PREDICTION_TYPES,
    pickle_refusal,
    read_header,
)
from app.errors import InvalidParams, ModelExists
from app.exportmeta import LETHE_KEY, usage
from app.lorakeys import is_lora
from app.registry import Registry, validate_model_id
from worker.exporter import merged_unet
from worker.lorafiles import read_lora
from worker.pipelines import Runtime, load_pipeline, save_pipeline
from worker.singlefile import check_layout, config_folder, load_single_file

# diffusers pipeline class -> registry kind
_KINDS = {
    "StableDiffusionPipeline": "text-to-image",
    "StableDiffusionXLPipeline": "text-to-image",
    "StableDiffusionUpscalePipeline": "upscaler",
}
# The dtype a checkpoint's UNet is stored in -> the dtype the registry keeps it in.
_DTYPES = {"F16": torch.float16, "BF16": torch.float16, "F32": torch.float32}


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


def import_model(registry: Registry, path: Path, model_id: str, allow_pickle: bool = False,
                 prediction_type: str | None = None, source: str | None = None,
                 extra: dict | None = None, base: str | None = None,
                 field: str = "path") -> dict:
    """Import a diffusers folder or a single-file checkpoint as ``model_id``; with
    ``base``, a LoRA file as an edit of that registered model.

    ``prediction_type`` overrides what the checkpoint's scheduler predicts (SD 2.x files do
    not say: the shipped config assumes the 768 v-prediction model; the 512 base models
    predict ``epsilon``). ``extra`` goes into the manifest (the owner of an upload).
    """
    validate_model_id(model_id, "id")
    if registry.exists(model_id):  # before any loading: the answer is the same after it
        raise ModelExists(f"`id` {model_id!r} exists already; pick another or delete it")
    path = Path(path)
    source = source or f"imported from {path.resolve()}"
    if base is not None or (path.is_file() and path.suffix.lower() == ".safetensors"
                            and is_lora(read_header(path, field))):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise pickle_refusal(field, path.name)  # a LoRA is never unpickled
        return import_lora(registry, path, model_id, base, source, extra or {}, field)
    if path.is_dir():
        manifest = inspect_folder(path) | {"source": source} | (extra or {})
        return registry.import_folder(path, model_id, manifest)
    if not path.is_file():
        raise InvalidParams(f"`path` {str(path)!r} is neither a folder nor a file")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise InvalidParams(f"`prediction_type` {prediction_type!r} is not one of "
                            f"{list(PREDICTION_TYPES)}")
    registry.root.mkdir(parents=True, exist_ok=True)
    # Hidden, so never listed as a model; on the registry's disk, as the model will be.
    with tempfile.TemporaryDirectory(prefix=".import-", dir=registry.root) as tmp:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise pickle_refusal("path", path.name)
            path = _pickle_to_safetensors(path, Path(tmp) / "converted.safetensors")
        return _import_single_file(registry, path, model_id, prediction_type, source,
                                   Path(tmp), extra or {}, field)


def _import_single_file(registry: Registry, path: Path, model_id: str,
                        prediction_type: str | None, source: str, tmp: Path,
                        extra: dict, field: str) -> dict:
    header = read_header(path)
    architecture, folder = config_folder(header, tmp / "config", prediction_type, field)
    check_layout(header, folder)
    dtype = _DTYPES.get(header.dtypes.get("model.diffusion_model.input_blocks.0.0.weight", ""),
                        torch.float32)
    pipe = load_single_file(path, folder, dtype)
    staging = tmp / "pipeline"
    save_pipeline(pipe, staging)
    manifest = inspect_folder(staging) | {
        "source": source, "format": "diffusers",
        "architecture": ARCHITECTURE_NAMES.get(architecture, "as exported by Lethe"),
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon")}
    if LETHE_KEY in header.metadata:
        # A Lethe export: the model draws and erases as it did where it came from, within
        # the bounds of a request (its metadata is anyone's to write).
        manifest |= usage(header.metadata, registry.domains(), field)
        exported = json.loads(header.metadata[LETHE_KEY])
        manifest["exported_from"] = {k: str(exported.get(k))[:128]
                                     for k in ("id", "digest")}
    manifest |= extra
    # Written on the registry's disk already: moved into place, not copied a second time.
    return registry.import_folder(staging, model_id, manifest, move=True)


def import_lora(registry: Registry, path: Path, model_id: str, base: str | None,
                source: str, extra: dict, field: str = "path") -> dict:
    """Register LoRA file ``path`` as an edit of model ``base``: its factors, read in any
    layout ``worker.lorafiles`` knows, stored as the delta a variant of the cached base is
    built from (kilobytes). Every key must fit a module of the base's UNet."""
    from safetensors import safe_open

    if base is None:
        raise InvalidParams(f"`{field}` {path.name!r} is a LoRA: name the model it applies to "
                            "with `base`")
    if not path.is_file():
        raise InvalidParams(f"`{field}` {str(path)!r} is not a file; a LoRA is one "
                            ".safetensors file")
    header = read_header(path, field)
    if not is_lora(header):
        raise InvalidParams(f"`base` applies to LoRA files; `{field}` {path.name!r} holds no "
                            "LoRA factors (a full checkpoint imports without `base`)")
    base_manifest = registry.get(base)
    if base_manifest["kind"] != "text-to-image":
        raise InvalidParams(f"`base` {base!r} is a {base_manifest['kind']}; a LoRA applies "
                            "to a text-to-image model")
    unet = merged_unet(registry, base)  # an edit's own delta applied
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    delta, read = read_lora(tensors, header.metadata, unet, field)
    manifest = {
        "kind": "text-to-image", "format": "delta",
        "base": {"id": base, "digest": base_manifest["digest"]},
        "source": source,
        "edit": {"method": "lora", "imported": True, **read},
        # An edit draws as its base does, and is measured the same way.
        **{k: base_manifest.get(k) for k in ("defaults", "limits", "domain", "evaluator")},
        **extra,
    }
    from worker.variants import save_delta

    with registry.create(model_id, manifest) as staging:
        save_delta(delta, staging)
    return registry.get(model_id)


def _pickle_to_safetensors(path: Path, dest: Path) -> Path:
    """The tensors of a pickled checkpoint, rewritten as safetensors (the operator allowed
    running the pickle)."""
    from safetensors.torch import save_file

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise InvalidParams(f"`path` {path.name!r} unpickles to a {type(checkpoint).__name__}, "
                            "not a state dict")
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(dest))
    return dest


def pull_model(registry: Registry, hub_id: str, model_id: str) -> dict:
    """Download a pipeline from the Hugging Face Hub (needs network; never used at run time)."""
    from diffusers import DiffusionPipeline

    validate_model_id(model_id, "id")
    with tempfile.TemporaryDirectory() as tmp:
        DiffusionPipeline.from_pretrained(hub_id).save_pretrained(tmp, safe_serialization=True)
        manifest = inspect_folder(Path(tmp)) | {"source": f"hub:{hub_id}"}
        return registry.import_folder(Path(tmp), model_id, manifest)
