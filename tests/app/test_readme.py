"""The README's examples run as written, against the live service."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parents[2] / "README.md"


def example(name: str) -> str:
    found = re.search(rf"<!-- example: {name} .*?-->\n```python\n(.*?)```", README.read_text(),
                      re.S)
    assert found, f"README has no example {name!r}"
    return found.group(1)


@pytest.mark.parametrize("name", ["sdk", "openai"])
def test_the_readme_example_runs(name, live_url, worker, tmp_path, monkeypatch):
    code = example(name)
    assert len([line for line in code.splitlines() if line.strip()]) <= 5
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://127.0.0.1:8000", live_url), f"README:{name}", "exec"),
         {})
    assert Image.open(tmp_path / "circle.png").format == "PNG"


@pytest.mark.slow
def test_the_readme_lora_example_runs_in_both_layouts_and_dtypes(http, tmp_path, monkeypatch):
    """The LoRA example as written, on the base exported as a diffusers folder and an
    erase's LoRA download in each layout: float32 and float16, with and without fuse_lora.
    (Whether the download still erases at the default erase: tests/compat, judged.)"""
    import numpy as np

    from tests.conftest import session_registry
    from tests.support import wait_job
    from worker.exporter import export_model

    r = http.post("/erase", json={"base_model": "shapes-sd", "concepts": ["triangle"],
                                  "iterations": 20, "evaluate": False, "drift_checks": 0,
                                  "name": "shapes-sd-no-triangle"})
    assert r.status_code == 202, r.text
    assert wait_job(http, r.json()["id"], timeout_s=300)["status"] == "succeeded"
    export_model(session_registry(), "shapes-sd", tmp_path / "shapes-sd")
    code = example("lora")
    monkeypatch.chdir(tmp_path)
    images = {}
    for layout in ("kohya", "peft"):
        params = {"format": "lora", "lora_layout": layout}
        made = http.get("/models/shapes-sd-no-triangle/download", params=params)
        assert wait_job(http, made.json()["id"], timeout_s=120)["status"] == "succeeded"
        (tmp_path / "shapes-sd-no-triangle-lora.safetensors").write_bytes(
            http.get("/models/shapes-sd-no-triangle/download", params=params).content)
        for dtype in ("", ", torch_dtype=torch.float16"):
            for fuse in ("", "; pipe.fuse_lora()"):
                run = (code.replace('from_pretrained("./shapes-sd")',
                                    f'from_pretrained("./shapes-sd"{dtype})')
                       .replace("  # then pipe.fuse_lora(), if you like", fuse)
                       .replace("guidance_scale=4.0", "guidance_scale=4.0, "
                                "generator=torch.Generator().manual_seed(0)"))
                scope: dict = {}
                exec(compile(run, "README:lora", "exec"), scope)
                images[layout, dtype, fuse] = np.asarray(scope["image"]).astype(int)
    import torch
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tmp_path / "shapes-sd")
    plain = np.asarray(base("a blue triangle", height=32, width=32, guidance_scale=4.0,
                            generator=torch.Generator().manual_seed(0)).images[0]).astype(int)
    reference = images["kohya", "", ""]
    assert reference.shape == (32, 32, 3)
    for key, picture in images.items():
        # one edit whatever the layout, precision or fusing (float16 rounds a few levels)
        assert np.abs(picture - reference).mean() < 3, key
    assert http.delete("/models/shapes-sd-no-triangle").status_code == 204
    assert np.abs(plain - reference).mean() > 1  # the LoRA is applied, not ignored
