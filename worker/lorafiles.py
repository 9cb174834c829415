"""LoRA files in and out, in the layouts the tools people use write and read.

A LoRA file is a bag of tensors whose names say which module each pair of factors changes;
a tool applies the pairs whose names it knows and ignores the rest without an error. So a
file in a layout a tool does not read loads "fine" and changes nothing. Two layouts are
written:

* ``kohya`` (the default): the layout kohya's sd-scripts write and AUTOMATIC1111, Forge,
  ComfyUI and InvokeAI read. ``lora_unet_<module, dots as underscores>.lora_down.weight``
  / ``.lora_up.weight`` / ``.alpha``, the change being ``alpha / rank · up · down``, so
  strength 1.0 is the edit itself. One alpha for every module (the largest rank; a smaller
  rank's ``up`` carries its ``rank / alpha``): diffusers' reader mis-scales a file whose
  alphas differ by module (0.42: the edit's rank-64 matrices off by their whole change).
  SD 1.x and 2.x modules go by their diffusers names, SDXL's by the original (SGM) UNet's
  (``input_blocks_4_1_…``), as sd-scripts names them.
* ``peft``: diffusers' own (``unet.<module>.lora_A.weight`` / ``.lora_B.weight``), what
  ``save_lora_weights`` writes.

Read: those two, kohya files with original names for any architecture, PEFT state dicts
without a prefix (peft's ``get_peft_model_state_dict``), and diffusers' older
attention-processor layout (``…attn1.processor.to_q_lora.down.weight``). A key that names
no module of the base, or a kind of factor Lethe cannot apply, is refused by name.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from torch import nn

from app.errors import InvalidParams
from app.jobspecs import LORA_LAYOUTS
from worker.esd import LORA_A, LORA_B
from worker.singlefile import unet_key

LAYOUTS = LORA_LAYOUTS
UNET = "lora_unet_"
# What the WebUI tools call each base (kohya's ss_base_model_version).
BASE_VERSIONS = {768: "sd_v1", 1024: "sd_v2"}
SDXL_VERSION = "sdxl_base_v1-0"

# (pattern, factor) for one tensor's name; the first group is the module's key.
_FACTORS = (
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
_TEXT_ENCODER = re.compile(r"(lora_te\d?_|text_encoder(_2)?\.)")


def is_sdxl(unet: Any) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def base_version(unet: Any) -> str | None:
    """kohya's name for the base a UNet's LoRA is for; None for one they do not know."""
    if is_sdxl(unet):
        return SDXL_VERSION
    return BASE_VERSIONS.get(unet.config.cross_attention_dim)


def _original_names(unet: Any) -> dict[str, str]:
    """Diffusers module path -> the original UNet's, for the modules that have one."""
    config = unet.config
    if not isinstance(config.layers_per_block, int):
        return {}
    up_attentions = {i for i, t in enumerate(config.up_block_types) if "CrossAttn" in t}
    out = {}
    for name, _ in unet.named_parameters():
        if name.endswith(".weight"):
            try:
                out[name.removesuffix(".weight")] = unet_key(
                    name, config.layers_per_block, up_attentions).removesuffix(".weight")
            except ValueError:
                continue
    return out


def kohya_names(unet: Any) -> dict[str, str]:
    """Module path -> its kohya name (``lora_unet_…``) as sd-scripts writes it for this
    base: diffusers' names for SD 1.x / 2.x, the original UNet's for SDXL."""
    original = _original_names(unet) if is_sdxl(unet) else {}
    return {name: UNET + original.get(name, name).replace(".", "_")
            for name, module in unet.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))}


def write_layout(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: str,
                 unet: Any) -> dict[str, torch.Tensor]:
    """``factors`` (module -> (down, up), the change being up·down) as a LoRA file's
    tensors in ``layout``, for ``unet``'s architecture."""
    if layout not in LAYOUTS:
        raise InvalidParams(f"`lora_layout` {layout!r} is not one of {list(LAYOUTS)}")
    out: dict[str, torch.Tensor] = {}
    if layout == "peft":
        for module, (down, up) in factors.items():
            out[f"unet.{module}.lora_A.weight"] = down
            out[f"unet.{module}.lora_B.weight"] = up
        return out
    names = kohya_names(unet)
    alpha = max((down.shape[0] for down, _ in factors.values()), default=1)
    for module, (down, up) in factors.items():
        name = names[module]
        rank = down.shape[0]
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up * (rank / alpha)  # read back × alpha / rank
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_metadata(ranks: dict[str, int], unet: Any, base_id: str,
                   title: str) -> dict[str, str]:
    """What the WebUI tools display of a LoRA (sd-scripts' ``ss_*`` fields)."""
    dim = max(ranks.values(), default=0)
    version = base_version(unet)
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(dim),
            "ss_network_alpha": str(dim), "ss_sd_model_name": base_id,
            "ss_output_name": title, "ss_v2": str(version == "sd_v2"),
            **({"ss_base_model_version": version} if version else {})}


def _module_key(key: str) -> tuple[str, str] | None:
    for pattern, factor in _FACTORS:
        if m := pattern.fullmatch(key):
            return m[1], factor
    return None


def _peft_scales(metadata: dict[str, str]) -> dict[str, float]:
    """lora_alpha / r per prefix from diffusers' ``lora_adapter_metadata`` (written by
    ``save_lora_weights`` since 0.34), where a file has it."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return {}
    if not isinstance(config, dict):
        return {}
    scales = {}
    for prefix in ("unet", ""):
        p = f"{prefix}." if prefix else ""
        r, alpha = config.get(f"{p}r"), config.get(f"{p}lora_alpha")
        if isinstance(r, int | float) and isinstance(alpha, int | float) and r:
            scales[prefix] = float(alpha) / float(r)
    return scales


def _resolve(key: str, unet_modules: dict[str, nn.Module], by_kohya: dict[str, str]
             ) -> str | None:
    """The UNet module a LoRA module key names, in any layout read; None if none."""
    if key.startswith(UNET):
        return by_kohya.get(key)
    for prefix in ("unet.", "base_model.model.", ""):
        if key.startswith(prefix):
            name = key[len(prefix):]
            # diffusers' attention-processor layout: attn1.processor.to_q, to_out (.0)
            name = re.sub(r"\.processor\.(to_q|to_k|to_v|to_out)$", r".\1", name)
            if name.endswith(".to_out"):
                name += ".0"
            if isinstance(unet_modules.get(name), (nn.Linear, nn.Conv2d)):
                return name
    return None


def _shown(keys: list[str]) -> str:
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return ", ".join(repr(k) for k in keys[:5]) + more


def read_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None,
              unet: Any, field: str = "file") -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA file's tensors as an edit of ``unet``: factor pairs under their parameter
    names (``<module>.lora_A.weight`` = down, ``.lora_B.weight`` = up with the file's scale
    folded in), the form ``worker.esd.full_delta`` expands; and what was read (layout,
    ranks). Raises InvalidParams naming every key it cannot place."""
    modules = dict(unet.named_modules())
    by_kohya = {v: k for k, v in kohya_names(unet).items()}
    by_kohya |= {UNET + o.replace(".", "_"): m for m, o in _original_names(unet).items()}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown, text_encoder, layouts = [], [], set()
    for key, tensor in tensors.items():
        parsed = _module_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        if _TEXT_ENCODER.match(key):
            text_encoder.append(key)
            continue
        module_key, factor = parsed
        module = _resolve(module_key, modules, by_kohya)
        if module is None:
            unknown.append(key)
            continue
        layouts.add("kohya" if module_key.startswith(UNET) else "peft")
        groups.setdefault(module, {})[factor] = tensor
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
    scales = _peft_scales(metadata or {})
    delta: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, parts in sorted(groups.items()):
        if "down" not in parts or "up" not in parts:
            raise InvalidParams(f"`{field}` has only half of the factors of {module!r} "
                                f"({sorted(parts)})")
        down, up = parts["down"].float().flatten(1), parts["up"].float().flatten(1)
        weight = modules[module].weight
        rank = down.shape[0]
        if up.shape[1] != rank or up.shape[0] * down.shape[1] != weight.numel():
            raise InvalidParams(
                f"`{field}`'s factors for {module!r} ({list(parts['up'].shape)} · "
                f"{list(parts['down'].shape)}) do not fit its weight {list(weight.shape)}: "
                "a LoRA for another architecture")
        if "alpha" in parts:
            scale = float(parts["alpha"].float().item()) / rank
        else:  # PEFT files keep alpha in their config: in the metadata, else alpha = r
            scale = scales.get("unet", scales.get("", 1.0))
        delta[module + LORA_A] = down.contiguous()
        delta[module + LORA_B] = (up * scale).contiguous()
        ranks[module] = rank
    return delta, {"layout": sorted(layouts)[0] if len(layouts) == 1 else sorted(layouts),
                   "modules": len(ranks), "ranks": sorted(set(ranks.values()))}

