"""LoRA files over real HTTP with the session's worker: files written by other tools
uploaded onto a base, served at once as its edits, drawing what diffusers draws with the
same file fused; an edit's export in both layouts; bad files refused, nothing registered."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save, save_file

from app.config import get_settings
from tests.support import wait_job
from tests.worker.test_erase_e2e import erase, image

pytestmark = pytest.mark.slow
TARGETS = ["to_k", "to_v", "to_q", "to_out.0", "proj_in", "ff.net.2"]


def upload(http, model_id: str, data: bytes, filename: str = "lora.safetensors", **fields):
    files = {"id": (None, model_id), **{k: (None, v) for k, v in fields.items()},
             "file": (filename, data, "application/octet-stream")}
    return http.post("/models", files=files)


@pytest.fixture(scope="module")
def other_tools(tmp_path_factory, tiny_model):
    """A LoRA of tiny-sd made with peft, saved by diffusers' ``save_lora_weights`` (PEFT
    layout, its alpha 8 ≠ r 4 in the metadata) and by diffusers' kohya converter; and
    tiny-sd with that LoRA fused by diffusers, as a diffusers folder."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from tests.conftest import session_registry

    folder = tmp_path_factory.mktemp("other-tools")
    source = session_registry().path(tiny_model)
    pipe = StableDiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                     init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    state = get_peft_model_state_dict(pipe.unet)
    StableDiffusionPipeline.save_lora_weights(
        folder / "peft", unet_lora_layers=state,
        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 8, "target_modules": TARGETS})
    # kohya's layout as diffusers writes it for the WebUI tools (alpha: the rank, so the
    # factors carry the 8/4 scale in lora_up here)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": (v * 2 if "lora_B" in k else v)
                                         for k, v in state.items()})
    assert any(k.startswith("lora_unet_") for k in kohya)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(folder / "kohya.safetensors"))
    fused = StableDiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32)
    fused.load_lora_weights(str(folder / "peft" / "pytorch_lora_weights.safetensors"))
    fused.fuse_lora()
    fused.unload_lora_weights()
    fused.save_pretrained(folder / "fused", safe_serialization=True)
    return {"peft": (folder / "peft" / "pytorch_lora_weights.safetensors").read_bytes(),
            "kohya": (folder / "kohya.safetensors").read_bytes(), "fused": folder / "fused"}


@pytest.fixture(scope="module")
def fused_model(other_tools, tiny_model):
    from tests.conftest import session_registry
    from worker.importer import import_model

    registry = session_registry()
    if not registry.exists("tiny-lora-fused"):
        base = registry.get(tiny_model)  # drawn at the base's size and steps
        import_model(registry, other_tools["fused"], "tiny-lora-fused",
                     extra={k: base[k] for k in ("defaults", "limits") if k in base})
    yield "tiny-lora-fused"
    registry.force_remove("tiny-lora-fused")


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_a_lora_another_tool_wrote_imports_as_an_edit_drawing_as_diffusers_fuses_it(
        http, live_url, other_tools, fused_model, layout, tmp_path):
    from app.client import LetheClient

    model_id = f"tiny-lora-{layout}"
    if layout == "peft":
        r = upload(http, model_id, other_tools[layout], base="tiny-sd")
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
    else:  # through the SDK
        (tmp_path / "lora.safetensors").write_bytes(other_tools[layout])
        with LetheClient(live_url) as lethe:
            job_id = lethe.upload_model(tmp_path / "lora.safetensors", model_id,
                                        base="tiny-sd").id
    job = wait_job(http, job_id, timeout_s=120)
    assert job["status"] == "succeeded", job
    model = http.get(f"/models/{model_id}").json()
    assert model["format"] == "delta" and model["base"]["id"] == "tiny-sd"
    assert model["edit"]["imported"] and model["edit"]["layout"] == layout
    assert model["edit"]["ranks"] == [4]
    served, fused, base = image(http, model_id), image(http, fused_model), image(http, "tiny-sd")
    print(f"\n{layout}: served vs diffusers-fused pixels: max {np.abs(served - fused).max()}, "
          f"mean {np.abs(served - fused).mean():.4f}; the base vs fused: mean "
          f"{np.abs(base - fused).mean():.2f}")
    assert np.abs(served - fused).max() <= 1  # float rounding of W + s·B·A at most
    assert np.abs(base - fused).mean() > 1  # and the LoRA does change the drawing
    # an edit like any other: exported, and the base of a further erase
    exported = http.get(f"/models/{model_id}/download", params={"format": "lora"})
    assert wait_job(http, exported.json()["id"], timeout_s=120)["status"] == "succeeded"
    if layout == "kohya":
        job = wait_job(http, erase(http, base_model=model_id, name="tiny-lora-no-red",
                                   iterations=2, drift_checks=0), timeout_s=300)
        assert job["status"] == "succeeded", job
        assert http.get("/models/tiny-lora-no-red").json()["base"]["id"] == model_id
        assert http.delete("/models/tiny-lora-no-red").status_code == 204
    assert http.delete(f"/models/{model_id}").status_code == 204


def test_an_edit_exports_in_both_layouts_and_reads_back(http, live_url, tmp_path):
    job = wait_job(http, erase(http, name="tiny-no-red-export", method="esd-x-strict",
                               iterations=3, learning_rate=0.05, drift_checks=0),
                   timeout_s=300)
    assert job["status"] == "succeeded", job
    files = {}
    params = {"format": "lora"}  # the default layout: kohya's
    r = http.get("/models/tiny-no-red-export/download", params=params)
    assert r.status_code == 202, r.text
    made = wait_job(http, r.json()["id"], timeout_s=120)
    assert made["status"] == "succeeded", made
    r = http.get("/models/tiny-no-red-export/download", params=params)
    assert r.status_code == 200
    assert r.headers["content-disposition"].endswith('-lora.safetensors"')
    files["kohya"] = r.content
    from app.client import LetheClient

    with LetheClient(live_url) as lethe:  # the SDK waits for the export job
        peft_file = lethe.download_model("tiny-no-red-export", tmp_path / "p.safetensors",
                                         format="lora", lora_layout="peft")
    files["peft"] = peft_file.read_bytes()
    kohya, peft = (load_file(_tmp(tmp_path, k, files[k])) for k in ("kohya", "peft"))
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert sum(k.endswith(".alpha") for k in kohya) == sum(k.endswith("lora_down.weight")
                                                           for k in kohya)
    assert all(k.startswith("unet.") and ".lora_" in k for k in peft)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "kohya.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["lora_layout"] == "kohya" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_sd_model_name"] == "tiny-sd" and int(meta["ss_network_dim"]) >= 1
    # Uploaded back onto the base, each draws as the edit did.
    edit = image(http, "tiny-no-red-export")
    for layout, data in files.items():
        r = upload(http, f"tiny-back-{layout}", data, base="tiny-sd")
        assert wait_job(http, r.json()["id"], timeout_s=120)["status"] == "succeeded"
        # fp16 factors of a 99 %-energy truncation: near the edit, far from the base
        assert np.abs(image(http, f"tiny-back-{layout}") - edit).mean() < 2
        assert http.delete(f"/models/tiny-back-{layout}").status_code == 204
    bad = http.get("/models/tiny-no-red-export/download",
                   params={"format": "single-file", "lora_layout": "kohya"})
    assert bad.status_code == 422 and "`lora_layout` 'kohya'" in bad.json()["error"]["message"]
    bad = http.get("/models/tiny-no-red-export/download",
                   params={"format": "lora", "lora_layout": "a1111"})
    assert bad.status_code == 422
    assert http.delete("/models/tiny-no-red-export").status_code == 204


def _tmp(tmp_path, name: str, data: bytes):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(data)
    return str(path)


def test_bad_lora_files_are_refused_naming_the_problem_and_register_nothing(
        http, other_tools, tmp_path):
    before = {m["id"] for m in http.get("/models").json()["data"]}
    good = other_tools["kohya"]
    # a LoRA without its base, and a base that is no text-to-image model or none at all
    r = upload(http, "lora-no-base", good)
    assert r.status_code == 422 and "is a LoRA: send `base`" in r.json()["error"]["message"]
    r = upload(http, "lora-nobase", good, base="no-such-model")
    assert r.status_code == 404 and "no-such-model" in r.json()["error"]["message"]
    r = upload(http, "lora-cut", good[: len(good) // 2], base="tiny-sd")
    assert r.status_code == 422 and "not a whole safetensors file" in r.json()["error"][
        "message"]
    r = upload(http, "lora-pickle", save({"x": torch.zeros(1)}), filename="lora.pt",
               base="tiny-sd")
    assert r.status_code == 422 and "pickled" in r.json()["error"]["message"]
    # keys that fit no module of the base, factors of another architecture's shapes (SDXL's
    # text width): named at upload, from the headers; on shared storage the worker, which
    # loads the base, names them failing the import job
    tensors = load_file(_tmp(tmp_path, "bad-keys", good))
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 8)
    wide = {k: (torch.zeros(v.shape[0], 64) if k.endswith("attn2_to_k.lora_down.weight")
                else v) for k, v in load_file(_tmp(tmp_path, "bad", good)).items()}
    for model_id, data, said in (("lora-stray", tensors, "down_blocks_9"),
                                 ("lora-wide", wide, "another architecture")):
        r = upload(http, model_id, save(data), base="tiny-sd")
        if not get_settings().storage_url:
            assert r.status_code == 422 and said in r.json()["error"]["message"], r.text
            continue
        job = wait_job(http, r.json()["id"], timeout_s=120)
        assert job["status"] == "failed" and job["error"]["code"] == "invalid_params"
        assert said in job["error"]["message"]
    assert {m["id"] for m in http.get("/models").json()["data"]} == before
