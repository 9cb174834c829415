"""Downloadable exports of a model: which file each format and option set is, and its URL.

An export is made once by a worker (``worker.jobs.transfer``) and kept beside the model
(``Registry.exports_dir``) until the model goes; its name carries the model's digest, so a
model re-created under the same id never serves an old file.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from app.errors import InvalidParams, shown
from app.jobspecs import EXPORT_FORMATS, LORA_LAYOUTS

DEFAULT_DTYPES = {"diffusers": "float32", "single-file": "float16", "lora": "float16"}
SUFFIXES = {"diffusers": ".zip", "single-file": ".safetensors", "lora": ".safetensors"}
MAX_RANK = 1024


def resolve(manifest: dict[str, Any], format: str, dtype: str | None, rank: int | None,
            lora_layout: str | None = None) -> tuple[str, int | None, str | None]:
    """The export's dtype, rank and LoRA layout, defaults filled (the layout is None but
    for a LoRA); what a model cannot export refused."""
    if format not in EXPORT_FORMATS:
        raise InvalidParams(f"`format` {shown(format)} is not one of {list(EXPORT_FORMATS)}")
    if format == "lora" and manifest.get("format") != "delta":
        raise InvalidParams(f"`format` 'lora' needs an edit; {manifest['id']!r} is a "
                            f"{manifest.get('format')} model, not an edit of a base")
    if format != "diffusers" and manifest.get("kind") != "text-to-image":
        raise InvalidParams(f"`format` {format!r} is for text-to-image models; "
                            f"{manifest['id']!r} is a {manifest.get('kind')}")
    if manifest.get("format") not in ("diffusers", "delta"):
        raise InvalidParams(f"`model` {manifest['id']!r} ({manifest.get('format')}) does not "
                            "export")
    if rank is not None and (format != "lora" or not 1 <= rank <= MAX_RANK):
        raise InvalidParams(f"`rank` {shown(rank)} applies to format 'lora' only, "
                            f"from 1 to {MAX_RANK}")
    if lora_layout is not None and (format != "lora" or lora_layout not in LORA_LAYOUTS):
        raise InvalidParams(f"`lora_layout` {shown(lora_layout)} applies to format 'lora' "
                            f"only, one of {list(LORA_LAYOUTS)}")
    if format == "lora":
        lora_layout = lora_layout or LORA_LAYOUTS[0]
    dtype = dtype or DEFAULT_DTYPES[format]
    if dtype not in ("float32", "float16"):
        raise InvalidParams(f"`dtype` {shown(dtype)} is not one of ['float32', 'float16']")
    return dtype, rank, lora_layout


def file_name(manifest: dict[str, Any], format: str, dtype: str, rank: int | None,
              lora_layout: str | None = None) -> str:
    rank_part = f"-r{rank}" if rank else ""
    # The layout is in every LoRA's name: a file kept before it could be chosen (PEFT) is
    # never served for a kohya request.
    layout_part = f"-{lora_layout}" if lora_layout else ""
    return (f"{manifest['digest'][:16]}-{format}{layout_part}-{dtype}{rank_part}"
            f"{SUFFIXES[format]}")


def download_name(model_id: str, format: str, rank: int | None,
                  lora_layout: str | None = None) -> str:
    """What the client's file is called: the model's id and what it holds."""
    what = {"diffusers": "", "single-file": "", "lora": "-lora"}[format]
    if lora_layout and lora_layout != LORA_LAYOUTS[0]:
        what += f"-{lora_layout}"
    return f"{model_id}{what}{f'-r{rank}' if rank else ''}{SUFFIXES[format]}"


def download_url(model_id: str, format: str, dtype: str, rank: int | None,
                 lora_layout: str | None = None) -> str:
    query = {"format": format, "dtype": dtype, **({"rank": rank} if rank else {}),
             **({"lora_layout": lora_layout} if lora_layout else {})}
    return f"/models/{model_id}/download?{urlencode(query)}"
