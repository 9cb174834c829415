"""What a single-file checkpoint is, read without loading it (no torch: the API uses it).

A ``.safetensors`` file is an 8-byte little-endian header length, a JSON header (every
tensor's dtype, shape and byte range, plus free-form string metadata), then the bytes. The
header alone says whether the file is whole and which architecture it holds, so a bad
upload is refused at once, before a worker spends a minute loading it.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from app.errors import InvalidParams

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# The metadata key a Lethe export carries its diffusers config folder under
# (worker.singlefile): such a file reads back exactly, whatever its architecture.
CONFIG_FOLDER_KEY = "lethe.config_folder"
# What an SD 2.x UNet may predict (its file does not say): the import's option.
PREDICTION_TYPES = ("epsilon", "v_prediction")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit

ARCHITECTURE_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x",
                 "sdxl": "Stable Diffusion XL base"}
# One tensor that marks each part, in the original layout.
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_TEXT = "cond_stage_model.model.token_embedding.weight"
SDXL_TEXT = ("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
             "conditioner.embedders.1.model.token_embedding.weight")
SDXL_REFINER_TEXT = "conditioner.embedders.0.model.token_embedding.weight"


@dataclass(frozen=True)
class Header:
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]


def pickle_refusal(field: str, name: str) -> InvalidParams:
    return InvalidParams(
        f"`{field}` {name!r} is a pickled checkpoint: loading a pickle runs whatever code it "
        "holds, so Lethe refuses it unless the operator passes --allow-pickle to "
        "`lethe models import` (or converts it to .safetensors first)")


def read_header(path: Path, field: str = "path", name: str | None = None) -> Header:
    """The header of safetensors file ``path``, checked against the file's length: a
    truncated or corrupt file is refused here (InvalidParams naming ``field`` and the file,
    as ``name`` where the client called it something else)."""
    path = Path(path)
    name = name or path.name
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise pickle_refusal(field, name)
    size = path.stat().st_size

    def bad(why: str) -> InvalidParams:
        return InvalidParams(f"`{field}` {name!r} is not a whole safetensors file: {why}")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise bad(f"header of {length} bytes announced, the file has {size}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    shapes, dtypes, end = {}, {}, 0
    try:
        for tensor, info in header.items():
            shapes[tensor] = tuple(int(n) for n in info["shape"])
            dtypes[tensor] = str(info["dtype"])
            end = max(end, int(info["data_offsets"][1]))
    except (TypeError, KeyError, IndexError, ValueError):
        raise bad(f"tensor entry {tensor!r} lacks a shape, dtype or data_offsets") from None
    if 8 + length + end != size:
        raise bad(f"its tensors need {8 + length + end} bytes, the file has {size} "
                  "(truncated or padded)")
    return Header(shapes, dtypes, {str(k): str(v) for k, v in metadata.items()})


# Tensor names only a LoRA file has (kohya's, PEFT's, diffusers' older layouts).
LORA_MARKS = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight",
              "_lora.down.weight", "_lora.up.weight", ".lora_linear_layer.down.weight")


def is_lora(header: Header) -> bool:
    """Whether a safetensors file holds LoRA factors rather than a model's weights."""
    return any(name.endswith(LORA_MARKS) for name in header.shapes)


def _prefixes(names: list[str], depth: int = 2, most: int = 6) -> str:
    counts = Counter(".".join(n.split(".")[:depth]) for n in names)
    return ", ".join(f"{p}.* ({n})" for p, n in counts.most_common(most))


def detect(header: Header, field: str = "path") -> str:
    """Which Stable Diffusion architecture a checkpoint in the original layout holds, from
    its tensor names and shapes; an error that says what was found otherwise."""
    shapes = header.shapes
    found = f"{len(shapes)} tensors: {_prefixes(list(shapes))}" if shapes else "no tensors"
    unet_in = shapes.get(UNET_IN)
    if unet_in is None:
        raise InvalidParams(
            f"`{field}` holds no Stable Diffusion UNet in the original layout (no {UNET_IN!r}); "
            f"found {found}")
    if len(unet_in) != 4 or unet_in[1] != 4:
        raise InvalidParams(
            f"`{field}` holds a UNet taking {unet_in[1] if len(unet_in) > 1 else '?'} input "
            "channels (an inpainting or other special model); only text-to-image models "
            "(4 latent channels) import")
    if all(k in shapes for k in SDXL_TEXT):
        return "sdxl"
    if SDXL_REFINER_TEXT in shapes:
        raise InvalidParams(f"`{field}` holds an SDXL refiner; only SDXL base imports")
    if SD2_TEXT in shapes:
        return "sd2"
    if SD1_TEXT in shapes:
        return "sd1"
    raise InvalidParams(
        f"`{field}` has a Stable Diffusion UNet but no text encoder in a known layout "
        f"(looked for {SD1_TEXT!r}, {SD2_TEXT!r} and SDXL's two); found {found}")
