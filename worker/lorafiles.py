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
attention-processor layout (``…attn1.processor.to_q_lora.down.weight``), by the rules of
``app.lorakeys`` (which the API also refuses a file by): a key that names no module of the
base, or a kind of factor Lethe cannot apply, is refused by name.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from app.errors import InvalidParams
from app.jobspecs import LORA_LAYOUTS
from app.lorakeys import UnetLayout, match
from worker.esd import LORA_A, LORA_B
from worker.lora import peft_state_dict

# What the WebUI tools call each base (kohya's ss_base_model_version).
BASE_VERSIONS = {768: "sd_v1", 1024: "sd_v2"}
SDXL_VERSION = "sdxl_base_v1-0"


def unet_layout(unet: Any) -> UnetLayout:
    return UnetLayout.of_config(dict(unet.config), {n: tuple(p.shape)
                                                    for n, p in unet.named_parameters()})


def base_version(unet: Any) -> str | None:
    """kohya's name for the base a UNet's LoRA is for; None for one they do not know."""
    if unet_layout(unet).sdxl:
        return SDXL_VERSION
    return BASE_VERSIONS.get(unet.config.cross_attention_dim)


def kohya_names(unet: Any) -> dict[str, str]:
    """Module path -> its kohya name (``lora_unet_…``) as sd-scripts writes it for this
    base: diffusers' names for SD 1.x / 2.x, the original UNet's for SDXL."""
    return unet_layout(unet).kohya_names()


def write_layout(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: str,
                 unet: Any) -> dict[str, torch.Tensor]:
    """``factors`` (module -> (down, up), the change being up·down) as a LoRA file's
    tensors in ``layout``, for ``unet``'s architecture."""
    if layout not in LORA_LAYOUTS:
        raise InvalidParams(f"`lora_layout` {layout!r} is not one of {list(LORA_LAYOUTS)}")
    if layout == "peft":
        return peft_state_dict(factors)
    out: dict[str, torch.Tensor] = {}
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


def read_lora(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None,
              unet: Any, field: str = "file") -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA file's tensors as an edit of ``unet``: factor pairs under their parameter
    names (``<module>.lora_A.weight`` = down, ``.lora_B.weight`` = up with the file's scale
    folded in), the form ``worker.esd.full_delta`` expands; and what was read (layout,
    ranks). Raises InvalidParams naming every key it cannot place."""
    groups, layouts = match({k: tuple(t.shape) for k, t in tensors.items()},
                            unet_layout(unet), field)
    scales = _peft_scales(metadata or {})
    delta: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, parts in sorted(groups.items()):
        down = tensors[parts["down"]].float().flatten(1)
        up = tensors[parts["up"]].float().flatten(1)
        rank = down.shape[0]
        if "alpha" in parts:
            scale = float(tensors[parts["alpha"]].float().item()) / rank
        else:  # PEFT files keep alpha in their config: in the metadata, else alpha = r
            scale = scales.get("unet", scales.get("", 1.0))
        delta[module + LORA_A] = down.contiguous()
        delta[module + LORA_B] = (up * scale).contiguous()
        ranks[module] = rank
    return delta, {"layout": sorted(layouts)[0] if len(layouts) == 1 else sorted(layouts),
                   "modules": len(ranks), "ranks": sorted(set(ranks.values()))}
