"""A LoRA file's keys read from names and shapes alone, as the API refuses an upload: the
same modules as the worker reads, from a saved UNet's headers."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from app.checkpoint import read_header
from app.errors import InvalidParams
from app.lorakeys import UnetLayout, is_lora, match
from worker.esd import select_parameters
from worker.lora import lora_of_edit
from worker.lorafiles import unet_layout, write_layout
from worker.tiny import tiny_pipeline, tiny_sdxl_pipeline


@pytest.mark.parametrize("build", [tiny_pipeline, tiny_sdxl_pipeline])
def test_a_saved_unets_headers_give_the_layout_the_loaded_unet_has(build, tmp_path):
    pipe = build(seed=0)
    pipe.unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    assert UnetLayout.of_folder(tmp_path / "unet") == unet_layout(pipe.unet)


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_an_exports_header_matches_every_module_it_changes(layout, tmp_path):
    pipe = tiny_sdxl_pipeline(seed=0)
    delta = {n: p.detach() + 0.01 for n, p in select_parameters(pipe.unet, "esd-x").items()}
    export = lora_of_edit(pipe.unet, delta, rank=2)
    save_file(write_layout(export.factors, layout, pipe.unet), str(tmp_path / "l.safetensors"))
    header = read_header(tmp_path / "l.safetensors")
    assert is_lora(header)
    groups, layouts = match(header.shapes, unet_layout(pipe.unet))
    assert layouts == {layout} and sorted(groups) == sorted(export.factors)
    other = unet_layout(tiny_pipeline(seed=0).unet)  # SD 1.x: other names, other shapes
    with pytest.raises(InvalidParams, match="`file`"):
        match(header.shapes, other)
