"""The registry on S3-compatible storage (a real SeaweedFS), each host with its own cache:
models published files first and manifest last, fetched once, checked by digest."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from app.errors import ModelExists, ModelNotFound
from app.objectregistry import ObjectRegistry
from app.registry import file_digest
from app.storage import S3Storage


@pytest.fixture
def store(s3_server):
    return S3Storage(s3_server.bucket, f"reg-{uuid.uuid4().hex[:8]}",
                     client=s3_server.client())


def host(store, tmp_path: Path, name: str, **kwargs) -> ObjectRegistry:
    """One host's view: the shared store, a cache of its own."""
    return ObjectRegistry(store, tmp_path / name / "cache", **kwargs)


def publish(registry: ObjectRegistry, model_id: str, size: int = 4096, seed: int = 0) -> dict:
    with registry.create(model_id, {"kind": "text-to-image", "format": "diffusers"}) as folder:
        (folder / "unet").mkdir()
        (folder / "unet" / "weights.bin").write_bytes(bytes((seed + i) % 251
                                                            for i in range(size)))
        (folder / "model_index.json").write_text('{"_class_name": "X"}')
    return registry.get(model_id)


def test_a_model_published_on_one_host_loads_on_another(store, tmp_path):
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    manifest = publish(a, "m1")
    assert [m["id"] for m in b.models()] == ["m1"] and b.get("m1") == manifest
    folder = b.path("m1")
    assert folder.is_relative_to(tmp_path / "b")
    assert file_digest(folder / "unet" / "weights.bin") == manifest["files"]["unet/weights.bin"]
    assert (folder / "manifest.json").is_file()
    with pytest.raises(ModelExists):
        publish(b, "m1")
    b.update_manifest("m1", reports=[{"n": 1}])
    assert a.get("m1")["reports"] == [{"n": 1}]
    # An export made on one host is downloaded from another; it goes with its model.
    assert a.export_file("m1", "x.zip") is None
    made = tmp_path / "made.zip"
    made.write_bytes(b"zip bytes")
    a.keep_export("m1", "x.zip", made)
    served = b.export_file("m1", "x.zip")
    assert served is not None and served.is_relative_to(tmp_path / "b")
    assert served.read_bytes() == b"zip bytes"
    a.force_remove("m1")
    assert b.models() == [] and not b.exists("m1")
    with pytest.raises(ModelNotFound):
        b.path("m1")
    assert list(store.keys("registry/.exports/")) == []


class _CutAfter:
    """A store whose connection dies after ``n`` uploads (a host lost mid-publish)."""

    def __init__(self, inner, n: int):
        self.inner, self.left = inner, n

    def upload(self, key, path):
        if self.left == 0:
            raise ConnectionError("link cut")
        self.left -= 1
        self.inner.upload(key, path)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_publish_cut_short_is_never_listed_and_is_reaped(store, tmp_path):
    cut = host(_CutAfter(store, 1), tmp_path, "a")
    with pytest.raises(ConnectionError):
        publish(cut, "half")
    reader = host(store, tmp_path, "b")
    assert reader.models() == [] and not reader.exists("half")
    assert list(store.keys("registry/half/"))  # its first file got there...
    assert reader.unlisted() == ["half"]
    reader.reap(reader.unlisted())  # ... and is garbage a reaper removes
    assert list(store.keys("registry/half/")) == [] and reader.unlisted() == []
    publish(reader, "half")  # the id is free again
    assert reader.exists("half")


def test_a_damaged_cache_file_is_found_by_its_digest_and_fetched_again(store, tmp_path):
    a = host(store, tmp_path, "a")
    manifest = publish(a, "m2", size=100_000)
    b = host(store, tmp_path, "b")
    weights = b.path("m2") / "unet" / "weights.bin"
    digest = manifest["files"]["unet/weights.bin"]
    blob = tmp_path / "b" / "cache" / "blobs" / digest
    assert blob.samefile(weights)  # the folder links the cached blob
    data = bytearray(blob.read_bytes())
    data[5000] ^= 0xFF  # a flipped byte
    blob.write_bytes(bytes(data))
    assert file_digest(weights) != digest
    repaired = b.path("m2") / "unet" / "weights.bin"
    assert file_digest(repaired) == digest
    blob.unlink()  # a cache file gone altogether comes back too
    assert file_digest(b.path("m2") / "unet" / "weights.bin") == digest


def test_the_cache_keeps_within_its_bound_least_recently_used_first(store, tmp_path):
    writer = host(store, tmp_path, "w")
    for i in range(3):
        publish(writer, f"big{i}", size=50_000, seed=i)
    small = host(store, tmp_path, "r", max_cache_bytes=120_000)
    for i in range(3):
        small.path(f"big{i}")
    blobs = tmp_path / "r" / "cache" / "blobs"
    sizes = sum(p.stat().st_size for p in blobs.iterdir() if not p.name.endswith(".checked"))
    assert sizes <= 120_000
    kept = {p.name for p in blobs.iterdir()}
    newest = small.get("big2")["files"]["unet/weights.bin"]
    oldest = small.get("big0")["files"]["unet/weights.bin"]
    assert newest in kept and oldest not in kept


def test_a_real_pipeline_loads_from_the_object_registry(store, tmp_path):
    from worker.pipelines import Runtime, load_pipeline
    from worker.tiny import save_tiny_pipeline

    writer = host(store, tmp_path, "w")
    writer.import_folder(save_tiny_pipeline(tmp_path / "tiny"), "tiny-s3",
                         {"kind": "text-to-image", "format": "diffusers"})
    pipe = load_pipeline(host(store, tmp_path, "r").path("tiny-s3"), Runtime.resolve("cpu",
                                                                                     "float32"))
    image = pipe("a red circle", num_inference_steps=1, height=32, width=32,
                 output_type="pil").images[0]
    assert image.size == (32, 32)
