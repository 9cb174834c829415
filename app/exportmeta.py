"""What an uploaded Lethe export may carry into the registry, checked (no torch: the API
refuses a bad file at once, the worker checks again before it builds anything).

A single-file export carries two things in its safetensors metadata: ``lethe``, how the
model draws and erases where it came from (copied into the new model's manifest, so it
sets defaults for every caller of that model), and ``lethe.config_folder``, the diffusers
config folder it loads with (whose ``model_index.json`` names the classes diffusers will
import). Anyone can write either: a default is kept only within the bounds a request
itself has, a domain only when a worker knows it, a class only from the set Lethe's own
exports use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.checkpoint import CONFIG_FOLDER_KEY
from app.errors import InvalidParams, shown
from app.schemas import EraseMethod, Scheduler

LETHE_KEY = "lethe"


class _Drawing(BaseModel):
    model_config = ConfigDict(extra="ignore")
    steps: int | None = Field(None, ge=1, le=500)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    width: int | None = Field(None, ge=8, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=8, le=2048, multiple_of=8)
    scheduler: Scheduler | None = None
    noise_level: int | None = Field(None, ge=0, le=350)


class _Limits(BaseModel):
    model_config = ConfigDict(extra="ignore")
    max_side: int | None = Field(None, ge=8, le=2048)


class _Erasing(BaseModel):
    model_config = ConfigDict(extra="ignore")
    method: EraseMethod | None = None
    iterations: int | None = Field(None, ge=1, le=100_000)
    learning_rate: float | None = Field(None, gt=0, le=1)
    negative_guidance: float | None = Field(None, ge=0, le=100)
    ddim_steps: int | None = Field(None, ge=1, le=500)
    start_guidance: float | None = Field(None, ge=0, le=50)
    preserve_weight: float | None = Field(None, ge=0, le=100)
    robust: bool | None = None
    anchor: Literal["without", "neighbour"] | None = None


class _EraseDefaults(_Erasing):
    by_method: dict[EraseMethod, _Erasing] | None = None
    by_parameterization: dict[Literal["full", "lora"], _Erasing] | None = None


class _Usage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    defaults: _Drawing | None = None
    limits: _Limits | None = None
    erase_defaults: _EraseDefaults | None = None
    domain: str | None = Field(None, max_length=64)


def usage(metadata: Mapping[str, str], domains: Collection[str], field: str
          ) -> dict[str, Any]:
    """The manifest fields (``defaults``, ``limits``, ``erase_defaults``, ``domain``) a
    file's ``lethe`` metadata sets, each within what a request may ask; {} without it.
    ``InvalidParams`` naming ``field`` and the value out of bounds."""
    if LETHE_KEY not in metadata:
        return {}
    try:
        carried = _Usage.model_validate(json.loads(metadata[LETHE_KEY]))
    except json.JSONDecodeError:
        raise InvalidParams(f"`{field}`'s `lethe` metadata is not JSON") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidParams(f"`{field}`'s `lethe` metadata `{where}` "
                            f"{shown(err.get('input'))}: {err['msg']}") from None
    found = carried.model_dump(exclude_none=True)
    if "domain" in found and found["domain"] not in domains:
        raise InvalidParams(f"`{field}`'s `lethe` metadata names domain "
                            f"{shown(found['domain'])}, which no worker here knows "
                            f"(known: {sorted(domains)})")
    return {k: v for k, v in found.items() if v != {}}


PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
# The component classes Lethe's exports name, by the library diffusers imports them from.
_CLASSES = {
    "diffusers": re.compile(r"UNet2DConditionModel|AutoencoderKL|[A-Za-z0-9]{1,40}Scheduler"),
    "transformers": re.compile(r"CLIPTextModel|CLIPTextModelWithProjection|CLIPTokenizer"
                               r"|CLIPTokenizerFast"),
}
_FILE = re.compile(r"[a-z0-9_]{1,40}/[A-Za-z0-9_.-]{1,80}\.(json|txt)")


def check_config_folder(metadata: Mapping[str, str], field: str) -> dict[str, str]:
    """The config folder a file carries (file name -> text), if it names only a Stable
    Diffusion pipeline of known classes in plain component files; ``InvalidParams``
    naming what is not."""
    try:
        files = json.loads(metadata[CONFIG_FOLDER_KEY])
        index = json.loads(files["model_index.json"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InvalidParams(f"`{field}`'s `{CONFIG_FOLDER_KEY}` metadata is not a config "
                            "folder with a model_index.json") from None
    if not isinstance(files, dict) or not isinstance(index, dict):
        raise InvalidParams(f"`{field}`'s `{CONFIG_FOLDER_KEY}` metadata is not a config "
                            "folder")
    if index.get("_class_name") not in PIPELINES:
        raise InvalidParams(f"`{field}`'s config folder is a "
                            f"{shown(index.get('_class_name'))}; supported: {list(PIPELINES)}")
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        library, cls = (value + [None, None])[:2]
        if library is None and cls is None:
            continue
        pattern = _CLASSES.get(library) if isinstance(library, str) else None
        if pattern is None or not isinstance(cls, str) or not pattern.fullmatch(cls):
            raise InvalidParams(f"`{field}`'s config folder has component {shown(name)} of "
                                f"class {shown(value)}; Lethe loads only the classes of "
                                "Stable Diffusion's own components")
    for name, text in files.items():
        if name != "model_index.json" and not (
                isinstance(name, str) and _FILE.fullmatch(name) and name.split("/")[0] in index
                and isinstance(text, str)):
            raise InvalidParams(f"`{field}`'s config folder holds {shown(name)}, not a "
                                "config or tokenizer file of one of its components")
    return files
