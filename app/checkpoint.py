"""What a single-file checkpoint is, read without loading it (no torch: the API uses it).

A ``.safetensors`` file is an 8-byte little-endian header length, a JSON header (every
tensor's dtype, shape and byte range, plus free-form string metadata), then the bytes. The
header alone says whether the file is whole and which architecture it holds, so a bad
upload is refused at once, before a worker spends a minute loading it.
"""

from __future__ import annotations

import json
import re
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
        except RecursionError:  # nesting deeper than any safetensors header has
            raise bad("its header nests too deeply to be a safetensors header") from None
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


# -- the original UNet's parameter names (a checkpoint's, and kohya's SDXL LoRA modules) --

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"),
           ("time_emb_proj", "emb_layers.1"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}

def rename_prefix(rest: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for new, old in pairs:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def attention_up_blocks(up_block_types: list[str] | tuple[str, ...]) -> set[int]:
    """The up blocks with attentions, by index: ``unet_key``'s ``up_attentions``."""
    return {i for i, t in enumerate(up_block_types) if "CrossAttn" in t}


def unet_key(key: str, layers_per_block: int, up_attentions: set[int]) -> str:
    """The original name of diffusers UNet parameter ``key``.

    The original UNet numbers its blocks flat: ``input_blocks`` holds, per resolution,
    ``layers_per_block`` (resnet, attention) pairs and then the downsampler; the decoder side
    one layer more; ``up_attentions``: the up blocks that have attentions (their upsampler
    sits at index 2 of the last layer, after the attention, else at 1).
    """
    per = layers_per_block + 1
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        side, block, kind, layer, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        # input_blocks.0 is conv_in: the encoder's layers count from 1
        index = block * per + layer + (side == "down")
        blocks = "input_blocks" if side == "down" else "output_blocks"
        if kind == "resnets":
            return f"{blocks}.{index}.0.{rename_prefix(rest, _RESNET)}"
        return f"{blocks}.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{rename_prefix(m[2], _RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        slot = 2 if block in up_attentions else 1
        return f"output_blocks.{block * per + layers_per_block}.{slot}.conv.{m[2]}"
    raise ValueError(f"no original name for UNet parameter {key!r}")


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
