"""Single-file checkpoints: the original Stable Diffusion key layout, out and in.

AUTOMATIC1111, ComfyUI and model sites pass Stable Diffusion around as one
``.safetensors`` file in the layout of the original training code (``model.diffusion_model.``
for the UNet, ``first_stage_model.`` for the VAE, ``cond_stage_model.`` or
``conditioner.embedders.N.`` for the text encoders). diffusers reads that layout
(``from_single_file``) but does not write it; :func:`original_state_dict` does, as the exact
inverse of diffusers' own reader, which the tests check tensor by tensor.

Reading goes through ``from_single_file`` with a local config folder, never the Hub: a file
Lethe wrote carries its whole config folder in its metadata (so even a tiny test model comes
back exactly); any other file is recognised by its tensor names and shapes
(:func:`detect`) and assembled from the configs shipped in ``worker/checkpoints``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.checkpoint import (
    CONFIG_FOLDER_KEY,
    Header,
    attention_up_blocks,
    detect,
    rename_prefix,
    unet_key,
)
from app.errors import InvalidParams
from app.exportmeta import check_config_folder
from app.registry import MANIFEST
from worker.tokenizer import write_clip_vocabulary

ARCHITECTURES = Path(__file__).parent / "architectures"

UNET = "model.diffusion_model."
VAE = "first_stage_model."
# Where each text encoder lives, by pipeline class and component.
TEXT_ENCODERS = {
    "StableDiffusionPipeline": {"text_encoder": "cond_stage_model."},
    "StableDiffusionXLPipeline": {"text_encoder": "conditioner.embedders.0.",
                                  "text_encoder_2": "conditioner.embedders.1."},
}

_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                  ("to_out.0", "proj_out"))


# (diffusers VAE name pattern, its original name given the match and the up-block count):
# the decoder counts up blocks from the lowest resolution in diffusers, from the highest in
# the original.
_VAE_RULES: tuple[tuple[str, Callable[[re.Match, int], str]], ...] = (
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(.+)",
     lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}"),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)",
     lambda m, n: f"encoder.down.{m[1]}.downsample.{m[2]}"),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(.+)",
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)",
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample.{m[2]}"),
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
     lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)",
     lambda m, n: f"{m[1]}.mid.attn_1.{rename_prefix(m[2], _VAE_ATTENTION)}"),
)


def vae_key(key: str, num_up_blocks: int) -> str:
    """The original name of diffusers VAE parameter ``key``."""
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    for side in ("encoder", "decoder"):
        key = key.replace(f"{side}.conv_norm_out.", f"{side}.norm_out.")
    for pattern, original in _VAE_RULES:
        if m := re.fullmatch(pattern, key):
            return original(m, num_up_blocks)
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names


def _clip_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's weights as transformers names them in its checkpoints
    (``text_model.…``): transformers 5.6 flattened ``CLIPTextModel``'s attributes, and the
    original layout keeps the old names."""
    return {(k if k.startswith("text_model.") or k.startswith("text_projection.")
             else "text_model." + k): v
            for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}


def _open_clip_state_dict(encoder: Any, pad_layers_to: int | None) -> dict:
    """A CLIP text encoder in OpenCLIP's layout (SD 2.x's and SDXL's second encoder): fused
    q/k/v projections, ``resblocks``, and the projection transposed.

    ``pad_layers_to``: SD 2.x reads the penultimate layer, so diffusers keeps 23 of its 24;
    the file gets a zero 24th, unused by every reader, so it has the complete original set.
    """
    sd = _clip_state_dict(encoder)
    out: dict[str, torch.Tensor] = {
        "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
        "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
        "ln_final.weight": sd.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": sd.pop("text_model.final_layer_norm.bias"),
    }
    hidden = out["token_embedding.weight"].shape[1]
    projection = sd.pop("text_projection.weight", None)
    out["text_projection"] = (projection.T.contiguous() if projection is not None
                              else torch.eye(hidden, dtype=out["ln_final.weight"].dtype))
    layers = encoder.config.num_hidden_layers
    names = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
             ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))
    for i in range(layers):
        pre, post = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[f"{post}attn.in_proj_{part}"] = torch.cat(
                [sd.pop(f"{pre}self_attn.{p}_proj.{part}") for p in "qkv"])
            for new, old in names:
                out[f"{post}{old}.{part}"] = sd.pop(f"{pre}{new}.{part}")
    if sd:
        raise InvalidParams(f"text encoder parameters with no OpenCLIP name: {sorted(sd)[:5]}")
    for i in range(layers, pad_layers_to or layers):
        template = f"transformer.resblocks.{layers - 1}."
        for key in [k for k in out if k.startswith(template)]:
            out[f"transformer.resblocks.{i}." + key[len(template):]] = torch.zeros_like(out[key])
    return out


def original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """Every weight of a text-to-image pipeline under its original Stable Diffusion name."""
    return _original(type(pipe).__name__, pipe.components)


def _original(kind: str, modules: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if kind not in TEXT_ENCODERS:
        raise InvalidParams(f"a {kind} has no single-file layout; supported: "
                            f"{sorted(TEXT_ENCODERS)}")
    unet, vae = modules["unet"], modules["vae"]
    config = unet.config
    if not isinstance(config.layers_per_block, int):
        raise InvalidParams("a UNet with per-block layer counts has no single-file layout")
    up_attentions = attention_up_blocks(config.up_block_types)
    out = {UNET + unet_key(k, config.layers_per_block, up_attentions): v
           for k, v in unet.state_dict().items()}
    up_blocks = len(vae.config.up_block_types)
    for k, v in vae.state_dict().items():
        name = vae_key(k, up_blocks)
        if ".mid.attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original VAE attention projects with 1x1 convs
        out[VAE + name] = v
    for component, prefix in TEXT_ENCODERS[kind].items():
        encoder = modules[component]
        if type(encoder).__name__ == "CLIPTextModel" and encoder.config.hidden_act == "quick_gelu":
            # OpenAI CLIP (SD 1.x, SDXL's first encoder): the transformers layout as is.
            for k, v in _clip_state_dict(encoder).items():
                out[f"{prefix}transformer.{k}"] = v
        else:
            layers = encoder.config.num_hidden_layers
            pad = 24 if kind == "StableDiffusionPipeline" and layers == 23 else None
            for k, v in _open_clip_state_dict(encoder, pad).items():
                out[f"{prefix}model.{k}"] = v
    return {k: v.contiguous() for k, v in out.items()}


def expected_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The tensors (original names and shapes) a checkpoint of the pipeline that config
    folder ``folder`` describes must hold; built on the meta device, so even SDXL costs no
    memory."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    index = json.loads((folder / "model_index.json").read_text())
    modules: dict[str, Any] = {}
    with torch.device("meta"):
        modules["unet"] = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(folder / "unet"))
        modules["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        for component in TEXT_ENCODERS.get(index["_class_name"], {}):
            cls = getattr(transformers, index[component][1])
            modules[component] = cls(cls.config_class.from_pretrained(folder / component))
    return {k: tuple(v.shape) for k, v in _original(index["_class_name"], modules).items()}


def check_layout(header: Header, folder: Path, field: str = "path") -> None:
    """Refuse a checkpoint that lacks tensors the architecture needs or has them in other
    shapes (saying which); extra tensors (EMA copies, schedule buffers) are ignored."""
    expected = expected_shapes(folder)
    missing = sorted(set(expected) - set(header.shapes))
    wrong = sorted(k for k in expected if k in header.shapes and header.shapes[k] != expected[k])
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of its {len(expected)} tensors missing "
                         f"(e.g. {missing[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} in other shapes (e.g. {k!r}: "
                         f"{list(header.shapes[k])}, expected {list(expected[k])})")
        raise InvalidParams(f"`{field}` does not match the layout it was taken for: "
                            + "; ".join(parts))


def config_folder(header: Header, dest: Path, prediction_type: str | None = None,
                  field: str = "path") -> tuple[str, Path]:
    """Write the diffusers config folder a checkpoint loads with into ``dest``: the one a
    Lethe export carries, else the shipped configs of the architecture its tensors show.
    Returns the architecture (``lethe`` for a carried folder) and the folder."""
    if CONFIG_FOLDER_KEY in header.metadata:
        architecture = "lethe"
        write_config_folder(check_config_folder(header.metadata, field), dest)
    else:
        architecture = detect(header)
        shutil.copytree(ARCHITECTURES / architecture, dest)
        for tokenizer in ("tokenizer", "tokenizer_2"):
            if (dest / tokenizer).is_dir():
                write_clip_vocabulary(dest / tokenizer, ARCHITECTURES / "clip-merges.txt")
    if prediction_type is not None:
        scheduler = dest / "scheduler" / "scheduler_config.json"
        config = json.loads(scheduler.read_text())
        scheduler.write_text(json.dumps({**config, "prediction_type": prediction_type}))
    return architecture, dest


def load_single_file(path: Path, folder: Path, dtype: torch.dtype):
    """The pipeline of checkpoint ``path``, assembled with config folder ``folder`` through
    diffusers' own reader; nothing is fetched."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kind = json.loads((folder / "model_index.json").read_text())["_class_name"]
    classes = {"StableDiffusionPipeline": StableDiffusionPipeline,
               "StableDiffusionXLPipeline": StableDiffusionXLPipeline}
    if kind not in classes:
        raise InvalidParams(f"a {kind} does not import from a single file; supported: "
                            f"{sorted(classes)}")
    return classes[kind].from_single_file(str(path), config=str(folder), torch_dtype=dtype,
                                          local_files_only=True)


def config_folder_files(folder: Path) -> dict[str, str]:
    """The text files of a diffusers folder that are not weights: configs and tokenizers."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in {".json", ".txt"}
            and p.name not in {"lethe.json", MANIFEST}}


def write_config_folder(files: Mapping[str, str], folder: Path) -> Path:
    for name, text in files.items():
        path = (folder / name).resolve()
        if not path.is_relative_to(folder.resolve()):
            raise ValueError(f"config folder entry {name!r} points outside the folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder


def config_metadata(folder: Path) -> dict[str, str]:
    return {CONFIG_FOLDER_KEY: json.dumps(config_folder_files(folder))}
