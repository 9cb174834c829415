"""Edited models served from their cached base: only the delta's tensors are new.

An ESD edit changes a few UNet parameters. Its variant pipeline shares every other tensor
(text encoder, VAE, the untouched UNet weights) with the base pipeline already in the cache,
so building it needs no disk read of the base and costs about the delta in memory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from worker.esd import delta_targets, full_delta
from worker.pipelines import Loaded, rebuild

DELTA_FILE = "unet_delta.safetensors"


def save_delta(delta: dict[str, torch.Tensor], folder: Path) -> Path:
    path = Path(folder) / DELTA_FILE
    save_file({k: v.contiguous() for k, v in delta.items()}, str(path))
    return path


def load_delta(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / DELTA_FILE))


def _with_params(module: Any, values: dict[str, torch.Tensor]) -> Any:
    """A shallow copy of ``module`` holding ``values`` (dotted names) as new parameters.

    Only the modules on the path to a replaced parameter are copied, each with its own
    ``_parameters``/``_modules`` dicts; every other submodule is the base's own object, so
    the variant shares its tensors and costs no copy of the module tree.
    """
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._modules = dict(module._modules)
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in values.items():
        head, _, rest = name.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            old = module._parameters[head]
            clone._parameters[head] = torch.nn.Parameter(
                value.to(device=old.device, dtype=old.dtype), requires_grad=False)
    for child, sub in nested.items():
        clone._modules[child] = _with_params(module._modules[child], sub)
    return clone


def build_variant(base_pipe, delta: dict[str, torch.Tensor], base_id: str) -> Loaded:
    """A pipeline whose UNet shares every tensor of ``base_pipe.unet`` but the delta's."""
    unet = base_pipe.unet
    delta = full_delta(unet, delta)  # an edit trained as LoRA: its matrices, once
    replaced = delta_targets(unet, delta)
    variant_unet = _with_params(unet, delta)
    size = sum(p.numel() * p.element_size() for p in replaced.values())
    return Loaded(rebuild(base_pipe, unet=variant_unet), size, base=base_id)
