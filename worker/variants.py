"""Edited models served from their cached base: only the delta's tensors are new.

An ESD edit changes a few UNet parameters. Its variant pipeline shares every other tensor
(text encoder, VAE, the untouched UNet weights) with the base pipeline already in the cache,
so building it needs no disk read of the base and costs about the delta in memory.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from worker.esd import apply_delta
from worker.pipelines import Loaded, rebuild

DELTA_FILE = "unet_delta.safetensors"


def save_delta(delta: dict[str, torch.Tensor], folder: Path) -> Path:
    path = Path(folder) / DELTA_FILE
    save_file({k: v.contiguous() for k, v in delta.items()}, str(path))
    return path


def load_delta(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / DELTA_FILE))


def build_variant(base_pipe, delta: dict[str, torch.Tensor], base_id: str) -> Loaded:
    """A pipeline whose UNet shares every tensor of ``base_pipe.unet`` but the delta's."""
    unet = base_pipe.unet
    # deepcopy's memo maps an object to its "copy": mapping each unchanged parameter and
    # buffer to itself makes the copy share them; only the delta's parameters are new.
    memo = {id(p): p for name, p in unet.named_parameters() if name not in delta}
    memo.update({id(b): b for b in unet.buffers()})
    variant_unet = copy.deepcopy(unet, memo)
    apply_delta(variant_unet, delta)
    size = sum(t.numel() * t.element_size() for n, t in variant_unet.named_parameters()
               if n in delta)
    return Loaded(rebuild(base_pipe, unet=variant_unet), size, base=base_id)
