"""The LoRA download of shapes-sd's default ``triangle`` erase still erases when plain
diffusers puts it on the base, as the README shows: both layouts, the base in float32 and
in float16, with and without ``fuse_lora``; judged by the shapes classifier (``make
test-compat``: the default erase trains for a minute or more on two cores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support import wait_job

pytestmark = [pytest.mark.compat, pytest.mark.slow]
COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("triangle", "circle", "square", "cross")
SEEDS = 4  # images a prompt: 24 a shape


def shape_rates(pipe, classifier, sheet: list | None = None) -> dict[str, float]:
    """How often each shape's prompts ("a {colour} {shape}") draw that shape; each
    colour's first image appended to ``sheet``, a row a shape, to look at."""
    pipe.set_progress_bar_config(disable=True)
    rates = {}
    for shape in SHAPES:
        prompts = [f"a {c} {shape}" for c in COLORS for _ in range(SEEDS)]
        generator = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        images = pipe(prompts, height=32, width=32, guidance_scale=4.0,
                      num_inference_steps=30, generator=generator, output_type="np").images
        pixels = (images * 255).round().astype("uint8")
        labels = classifier.predict(pixels)
        rates[shape] = sum(label["shape"] == shape for label in labels) / len(labels)
        if sheet is not None:
            sheet.append(pixels[::SEEDS])
    return rates


def test_the_default_triangle_erase_still_erases_as_a_lora_in_plain_diffusers(http, tmp_path):
    from diffusers import StableDiffusionPipeline

    from tests.conftest import session_registry
    from worker.domains.shapes.classifier import ShapesClassifier
    from worker.exporter import export_model

    registry = session_registry()
    r = http.post("/erase", json={"base_model": "shapes-sd", "concepts": ["triangle"],
                                  "name": "shapes-sd-no-triangle"})
    assert r.status_code == 202, r.text
    assert wait_job(http, r.json()["id"], timeout_s=1800)["status"] == "succeeded"
    try:
        base_folder = export_model(registry, "shapes-sd", tmp_path / "shapes-sd")
        classifier = ShapesClassifier.from_pretrained(registry.path("shapes-clf"))
        files = {}
        for layout in ("kohya", "peft"):
            params = {"format": "lora", "lora_layout": layout}
            made = http.get("/models/shapes-sd-no-triangle/download", params=params)
            assert wait_job(http, made.json()["id"], timeout_s=300)["status"] == "succeeded"
            files[layout] = tmp_path / f"{layout}.safetensors"
            files[layout].write_bytes(
                http.get("/models/shapes-sd-no-triangle/download", params=params).content)
        sheet: list = []
        base = shape_rates(StableDiffusionPipeline.from_pretrained(base_folder), classifier,
                           sheet)
        print(f"\nbase: {base}")
        assert base["triangle"] > 0.9
        for layout, file in files.items():
            for dtype in (torch.float32, torch.float16):
                for fuse in (False, True):
                    pipe = StableDiffusionPipeline.from_pretrained(base_folder,
                                                                   torch_dtype=dtype)
                    pipe.load_lora_weights(str(file))
                    if fuse:
                        pipe.fuse_lora()
                    rates = shape_rates(pipe, classifier, sheet if not fuse and
                                        dtype == torch.float32 else None)
                    print(f"{layout} {dtype} fuse={fuse}: {rates}")
                    assert rates["triangle"] <= 0.1, (layout, dtype, fuse, rates)
                    for other in SHAPES[1:]:  # the neighbours are still drawn
                        assert rates[other] >= base[other] - 0.15, (layout, dtype, fuse,
                                                                    rates)
        # To look at: the base's rows, then kohya's and peft's (float32, unfused); a
        # colour a column.
        grid = np.concatenate([np.concatenate(list(row), axis=1) for row in sheet], axis=0)
        Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4),
                                     Image.NEAREST).save(tmp_path / "sheet.png")
        print(f"contact sheet: {tmp_path / 'sheet.png'}")
    finally:
        http.delete("/models/shapes-sd-no-triangle")
