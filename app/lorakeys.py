"""Which UNet module each tensor of a LoRA file changes, from names and shapes alone.

No torch here: the API refuses a file whose keys fit no module of its base at upload, from
the file's header and the base's (``UnetLayout.of_folder``), and the worker reads the file
by the same rules (``worker.lorafiles``). The names read:

* kohya's (sd-scripts, the WebUI tools): ``lora_unet_<module, dots as underscores>`` with
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, the module by its diffusers
  name or the original UNet's (SDXL's files use those);
* PEFT's (diffusers' ``save_lora_weights``, peft's ``get_peft_model_state_dict``):
  ``[unet.]<module>.lora_A.weight`` / ``.lora_B.weight``;
* diffusers' older attention processors: ``[unet.]…attn1.processor.to_q_lora.down.weight``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from app.checkpoint import Header, attention_up_blocks, read_header, unet_key
from app.errors import InvalidParams

KOHYA_UNET = "lora_unet_"
# (pattern, factor) for one tensor's name; the first group is the module's key.
FACTORS = (
    (re.compile(r"(.+)\.lora_down\.weight"), "down"),
    (re.compile(r"(.+)\.lora_up\.weight"), "up"),
    (re.compile(r"(.+)\.alpha"), "alpha"),
    (re.compile(r"(.+)\.lora_A(?:\.default)?\.weight"), "down"),
    (re.compile(r"(.+)\.lora_B(?:\.default)?\.weight"), "up"),
    (re.compile(r"(.+)\.lora_linear_layer\.down\.weight"), "down"),
    (re.compile(r"(.+)\.lora_linear_layer\.up\.weight"), "up"),
    (re.compile(r"(.+)_lora\.down\.weight"), "down"),
    (re.compile(r"(.+)_lora\.up\.weight"), "up"),
)
# Tensor names only a LoRA file has.
LORA_MARKS = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight",
              "_lora.down.weight", "_lora.up.weight", ".lora_linear_layer.down.weight")
_TEXT_ENCODER = re.compile(r"(lora_te\d?_|text_encoder(_2)?\.)")


def is_lora(header: Header) -> bool:
    """Whether a safetensors file holds LoRA factors rather than a model's weights."""
    return any(name.endswith(LORA_MARKS) for name in header.shapes)


@dataclass(frozen=True)
class UnetLayout:
    """What of a UNet a LoRA's names are read against: each linear or convolution weight's
    shape by module (``down_blocks.0.….to_k``), and its block structure for the original
    names."""

    weights: dict[str, tuple[int, ...]]
    layers_per_block: int | None
    up_block_types: tuple[str, ...]
    sdxl: bool

    @classmethod
    def of_config(cls, config: dict, shapes: dict[str, tuple[int, ...]]) -> UnetLayout:
        """From a UNet's config and its parameters' shapes (by parameter name)."""
        weights = {name.removesuffix(".weight"): tuple(shape)
                   for name, shape in shapes.items()
                   if name.endswith(".weight") and len(shape) in (2, 4)}
        layers = config.get("layers_per_block")
        return cls(weights, layers if isinstance(layers, int) else None,
                   tuple(config.get("up_block_types") or ()),
                   config.get("addition_embed_type") == "text_time")

    @classmethod
    def of_folder(cls, unet_folder: Path) -> UnetLayout | None:
        """From a diffusers ``unet/`` folder's config and weights headers (the file is not
        read past its header); None where its weights are not safetensors."""
        config = json.loads((unet_folder / "config.json").read_text())
        files = sorted(unet_folder.glob("diffusion_pytorch_model*.safetensors"))
        if not files:
            return None
        shapes: dict[str, tuple[int, ...]] = {}
        for file in files:  # one file, or the shards of a large UNet
            shapes |= read_header(file).shapes
        return cls.of_config(config, shapes)

    def original_names(self) -> dict[str, str]:
        """Module -> the original UNet's name for it, where it has one."""
        if self.layers_per_block is None:
            return {}
        up_attentions = attention_up_blocks(self.up_block_types)
        out = {}
        for module in self.weights:
            try:
                out[module] = unet_key(module + ".weight", self.layers_per_block,
                                       up_attentions).removesuffix(".weight")
            except ValueError:
                continue
        return out

    def kohya_names(self) -> dict[str, str]:
        """Module -> its kohya name as sd-scripts writes it for this base: diffusers' names
        for SD 1.x / 2.x, the original UNet's for SDXL."""
        original = self.original_names() if self.sdxl else {}
        return {m: KOHYA_UNET + original.get(m, m).replace(".", "_") for m in self.weights}

    def resolve(self, key: str, by_kohya: dict[str, str]) -> str | None:
        """The module a LoRA module key names, in any layout read; None if none."""
        if key.startswith(KOHYA_UNET):
            return by_kohya.get(key)
        for prefix in ("unet.", "base_model.model.", ""):
            if key.startswith(prefix):
                name = key[len(prefix):]
                # diffusers' attention-processor layout: attn1.processor.to_q, to_out (.0)
                name = re.sub(r"\.processor\.(to_q|to_k|to_v|to_out)$", r".\1", name)
                if name.endswith(".to_out"):
                    name += ".0"
                if name in self.weights:
                    return name
        return None


def _factor(key: str) -> tuple[str, str] | None:
    for pattern, factor in FACTORS:
        if m := pattern.fullmatch(key):
            return m[1], factor
    return None


def _shown(keys: list[str]) -> str:
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return ", ".join(repr(k) for k in keys[:5]) + more


def match(shapes: dict[str, tuple[int, ...]], layout: UnetLayout, field: str = "file"
          ) -> tuple[dict[str, dict[str, str]], set[str]]:
    """Each module a LoRA file changes -> its factors' tensor names (``down``, ``up``,
    ``alpha``), and the layouts they were written in (``kohya``, ``peft``), from the file's
    tensor shapes by name. Raises InvalidParams naming every key that fits no module of
    ``layout`` (or a kind of factor Lethe cannot apply), text-encoder keys, half pairs and
    factors whose shapes do not make the module's weight."""
    by_kohya = {v: k for k, v in layout.kohya_names().items()}
    by_kohya |= {KOHYA_UNET + o.replace(".", "_"): m for m, o in layout.original_names().items()}
    groups: dict[str, dict[str, str]] = {}
    unknown, text_encoder, layouts = [], [], set()
    for key in shapes:
        parsed = _factor(key)
        if parsed is None:
            unknown.append(key)
            continue
        if _TEXT_ENCODER.match(key):
            text_encoder.append(key)
            continue
        module_key, factor = parsed
        module = layout.resolve(module_key, by_kohya)
        if module is None:
            unknown.append(key)
            continue
        layouts.add("kohya" if module_key.startswith(KOHYA_UNET) else "peft")
        groups.setdefault(module, {})[factor] = key
    if text_encoder:
        raise InvalidParams(
            f"`{field}` changes the text encoder ({len(text_encoder)} keys: "
            f"{_shown(sorted(text_encoder))}); Lethe's edits change the UNet only, so it "
            "imports UNet LoRAs")
    if unknown:
        raise InvalidParams(
            f"`{field}` has {len(unknown)} keys that match no module of the base's UNet "
            f"(a LoRA for another architecture, or a kind Lethe cannot apply): "
            f"{_shown(sorted(unknown))}")
    if not groups:
        raise InvalidParams(f"`{field}` holds no LoRA factors")
    for module, parts in sorted(groups.items()):
        if "down" not in parts or "up" not in parts:
            raise InvalidParams(f"`{field}` has only half of the factors of {module!r} "
                                f"({sorted(parts)})")
        down, up, weight = shapes[parts["down"]], shapes[parts["up"]], layout.weights[module]
        fits = (len(down) >= 2 and len(up) >= 2 and up[1] == down[0]
                and up[0] * math.prod(down[1:]) == math.prod(weight)
                and math.prod(up[2:]) == 1)
        if not fits:
            raise InvalidParams(
                f"`{field}`'s factors for {module!r} ({list(up)} · {list(down)}) do not fit "
                f"its weight {list(weight)}: a LoRA for another architecture")
    return groups, layouts
