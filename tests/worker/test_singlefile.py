"""Single-file checkpoints: export in the original layout, import by detection, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from app.checkpoint import Header, detect, read_header
from app.errors import InvalidParams, ModelExists
from app.registry import Registry
from worker.exporter import export_single_file
from worker.importer import import_model
from worker.pipelines import Runtime, load_pipeline
from worker.singlefile import ARCHITECTURES, check_layout, expected_shapes, original_state_dict
from worker.tiny import tiny_pipeline, tiny_sd2_pipeline, tiny_sdxl_pipeline
from worker.tokenizer import write_clip_vocabulary

SHAPES_SD = Path(__file__).resolve().parents[2] / "worker/domains/shapes/models/shapes-sd"
BUILDERS = {"sd1": tiny_pipeline, "sd2": tiny_sd2_pipeline, "sdxl": tiny_sdxl_pipeline}


def _image(registry: Registry, model_id: str, prompt: str = "a red circle") -> np.ndarray:
    pipe = load_pipeline(registry.path(model_id), Runtime.resolve("cpu", "float32"))
    out = pipe(prompt, num_inference_steps=3, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(7))
    return (out.images[0] * 255).round().astype(np.int16)


def _registry_with(tmp_path: Path, name: str, pipe) -> Registry:
    registry = Registry(tmp_path / "registry")
    pipe.save_pretrained(tmp_path / name, safe_serialization=True)
    import_model(registry, tmp_path / name, name)
    return registry


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_tiny_round_trip_gives_the_same_image(tmp_path, arch):
    registry = _registry_with(tmp_path, arch, BUILDERS[arch](seed=0))
    file = export_single_file(registry, arch, tmp_path / f"{arch}.safetensors", "float32")
    header = read_header(file)
    assert any(k.startswith("model.diffusion_model.") for k in header.shapes)
    assert any(k.startswith("first_stage_model.") for k in header.shapes)

    manifest = import_model(registry, file, f"{arch}-back")
    assert manifest["kind"] == "text-to-image"
    before, after = _image(registry, arch), _image(registry, f"{arch}-back")
    assert np.abs(before - after).max() <= 1
    assert before.std() > 0  # a real picture, not a blank both sides agree on


def test_diffusers_reads_the_export_as_the_model_it_was(tmp_path):
    """The layout is diffusers' own reader's: every tensor comes back, unchanged."""
    pipe = tiny_sdxl_pipeline(seed=3)
    pipe.save_pretrained(tmp_path / "config")
    save_file(original_state_dict(pipe), str(tmp_path / "m.safetensors"))
    back = type(pipe).from_single_file(str(tmp_path / "m.safetensors"),
                                       config=str(tmp_path / "config"), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_shapes_sd_round_trip(tmp_path):
    registry = Registry(tmp_path / "registry")
    import_model(registry, SHAPES_SD, "shapes-sd")
    file = export_single_file(registry, "shapes-sd", tmp_path / "shapes.safetensors")
    assert json.loads(read_header(file).metadata["lethe"])["id"] == "shapes-sd"
    import_model(registry, file, "shapes-back")
    prompt = "a red triangle"
    assert np.abs(_image(registry, "shapes-sd", prompt)
                  - _image(registry, "shapes-back", prompt)).max() <= 1


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_real_architectures_are_told_apart_by_their_tensors(arch):
    """The full-size layouts (built on the meta device from the shipped configs): each is
    detected as itself and passes its own layout check, and no other's."""
    shapes = expected_shapes(ARCHITECTURES / arch)
    header = Header(shapes, dict.fromkeys(shapes, "F16"), {})
    assert detect(header) == arch
    check_layout(header, ARCHITECTURES / arch)
    for other in {"sd1", "sd2", "sdxl"} - {arch}:
        with pytest.raises(InvalidParams, match="does not match the layout"):
            check_layout(header, ARCHITECTURES / other)


def test_shipped_clip_vocabulary_tokenizes_as_clip(tmp_path):
    from transformers import CLIPTokenizer

    write_clip_vocabulary(tmp_path, ARCHITECTURES / "clip-merges.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 49408
    # CLIP's own ids for these words, as every Stable Diffusion checkpoint was trained on.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# -- bad files: a clear error, and nothing registered ----------------------------------

def _nothing_registered(registry: Registry, before: list[str]) -> None:
    assert [m["id"] for m in registry.models()] == before
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".import-")]


@pytest.fixture()
def sd1(tmp_path):
    registry = _registry_with(tmp_path, "sd1", tiny_pipeline(seed=0))
    return registry, export_single_file(registry, "sd1", tmp_path / "sd1.safetensors",
                                        "float32")


def test_unknown_tensor_names_are_refused_saying_what_was_found(tmp_path, sd1):
    registry, _ = sd1
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(InvalidParams, match=r"no Stable Diffusion UNet.*found 2 tensors: "
                                            r"encoder.layer.\* \(1\), head.bias.\* \(1\)"):
        import_model(registry, tmp_path / "other.safetensors", "other")
    _nothing_registered(registry, ["sd1"])


def test_truncated_file_is_refused(tmp_path, sd1):
    registry, file = sd1
    data = file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InvalidParams, match="not a whole safetensors file.*truncated"):
        import_model(registry, cut, "cut")
    cut.write_bytes(data[:5])
    with pytest.raises(InvalidParams, match="shorter than the 8-byte header"):
        import_model(registry, cut, "cut")
    _nothing_registered(registry, ["sd1"])


def test_pickle_is_refused_without_the_flag(tmp_path, sd1):
    registry, _ = sd1
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": original_state_dict(tiny_pipeline(seed=0))}, ckpt)
    with pytest.raises(InvalidParams, match="pickled checkpoint: loading a pickle runs"):
        import_model(registry, ckpt, "pickled")
    _nothing_registered(registry, ["sd1"])
    # With the flag it is read: a foreign file, so recognised by its tensors (SD 1.x names)
    # and checked against SD 1.x's full-size layout, which a tiny model does not have.
    with pytest.raises(InvalidParams, match="does not match the layout.*missing"):
        import_model(registry, ckpt, "pickled", allow_pickle=True)
    _nothing_registered(registry, ["sd1"])


def test_a_name_that_exists_is_refused_before_loading(sd1):
    registry, file = sd1
    with pytest.raises(ModelExists, match="'sd1' exists already"):
        import_model(registry, file, "sd1")
    _nothing_registered(registry, ["sd1"])


def test_prediction_type_override(tmp_path):
    registry = _registry_with(tmp_path, "sd2", tiny_sd2_pipeline(seed=0))
    file = export_single_file(registry, "sd2", tmp_path / "sd2.safetensors", "float32")
    assert import_model(registry, file, "sd2-v")["prediction_type"] == "v_prediction"
    assert import_model(registry, file, "sd2-eps",
                        prediction_type="epsilon")["prediction_type"] == "epsilon"
    with pytest.raises(InvalidParams, match="`prediction_type` 'x0'"):
        import_model(registry, file, "sd2-x0", prediction_type="x0")

