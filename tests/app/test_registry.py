from __future__ import annotations

import json

import pytest

from app.errors import InvalidParams, ModelExists, ModelNotFound, ModelProtected
from app.registry import Registry, validate_model_id

BASE = {"kind": "text-to-image", "format": "diffusers", "base": None}


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "registry")


@pytest.mark.parametrize("bad", ["", "Upper", "-lead", "a/b", "..", "a" * 65, "sp ace"])
def test_invalid_ids_name_the_value(bad):
    with pytest.raises(InvalidParams, match="got"):
        validate_model_id(bad)


@pytest.mark.parametrize("good", ["a", "shapes-sd", "x.y_z-1", "a" * 64])
def test_valid_ids(good):
    assert validate_model_id(good) == good


def test_create_publishes_whole_with_digests(registry):
    with registry.create("m1", BASE) as staging:
        (staging / "unet").mkdir()
        (staging / "unet" / "w.bin").write_bytes(b"abc")
        # Nothing is visible before the block ends.
        assert registry.models() == []
    manifest = registry.get("m1")
    assert manifest["files"] == {
        "unet/w.bin": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    }
    assert len(manifest["digest"]) == 64 and manifest["id"] == "m1"
    assert json.loads((registry.path("m1") / "manifest.json").read_text()) == manifest


def test_failed_write_leaves_nothing(registry):
    with pytest.raises(RuntimeError):
        with registry.create("m2", BASE) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert not registry.exists("m2") and registry.models() == []
    assert not (registry.root / "m2").exists()
    assert list((registry.root / ".staging").iterdir()) == []


def test_existing_id_is_a_conflict(registry):
    with registry.create("m3", BASE):
        pass
    with pytest.raises(ModelExists):
        with registry.create("m3", BASE):
            pass


def test_remove_only_derived_models_without_children(registry):
    with registry.create("base", BASE):
        pass
    with registry.create("edit", {**BASE, "format": "delta", "base": {"id": "base"}}):
        pass
    with pytest.raises(ModelProtected):
        registry.remove("base")
    with pytest.raises(ModelProtected, match="edit"):
        registry.force_remove("base")
    registry.remove("edit")
    assert [m["id"] for m in registry.models()] == ["base"]
    with pytest.raises(ModelNotFound):
        registry.get("edit")


def test_update_manifest_merges(registry):
    with registry.create("m4", BASE):
        pass
    registry.update_manifest("m4", metrics={"fid": 1.5})
    assert registry.get("m4")["metrics"] == {"fid": 1.5}
    assert registry.get("m4")["kind"] == "text-to-image"


def test_a_model_keeps_its_most_recently_used_exports(registry, tmp_path):
    """Issue 33, finding 2: every rank × format × dtype asked for was a file kept forever."""
    import os

    with registry.create("m1", BASE) as staging:
        (staging / "weights.bin").write_bytes(b"w")
    for n, name in enumerate(["a.zip", "b.zip", "c.zip"]):
        made = tmp_path / f"made-{name}"
        made.write_bytes(b"x")
        kept = registry.keep_export("m1", name, made, keep=3)
        os.utime(kept, (1000 + n, 1000 + n))  # made one after another
    registry.used_export(registry.export_file("m1", "a.zip"))  # a was served just now
    made = tmp_path / "made-d"
    made.write_bytes(b"x")
    registry.keep_export("m1", "d.zip", made, keep=3)
    assert registry.export_file("m1", "b.zip") is None  # the least recently used went
    assert all(registry.export_file("m1", n) for n in ("a.zip", "c.zip", "d.zip"))
    assert not made.exists()
