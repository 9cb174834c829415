"""Storage: the same small interface over a folder and over a real S3-compatible server."""

from __future__ import annotations

import uuid

import pytest

from app.errors import InvalidParams
from app.storage import LocalStorage, S3Storage, Storage, open_storage


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    return S3Storage(server.bucket, f"t-{uuid.uuid4().hex[:8]}", client=server.client())


def test_objects_round_trip_and_list_by_prefix(store, tmp_path):
    store.write("registry/a/manifest.json", b"{}")
    source = tmp_path / "weights.bin"
    source.write_bytes(bytes(range(256)) * 1000)
    store.upload("registry/a/unet/weights.bin", source)
    store.write("registry/b/x", b"1")
    assert store.read("registry/a/manifest.json") == b"{}"
    assert list(store.keys("registry/a/")) == ["registry/a/manifest.json",
                                               "registry/a/unet/weights.bin"]
    assert store.folders("registry") == ["a", "b"]
    store.download("registry/a/unet/weights.bin", tmp_path / "out" / "w.bin")
    assert (tmp_path / "out" / "w.bin").read_bytes() == source.read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["w.bin"]  # no partial left
    store.delete("registry/b/x")
    assert store.folders("registry") == ["a"]
    with pytest.raises(FileNotFoundError):
        store.read("registry/b/x")
    with pytest.raises(FileNotFoundError):
        store.download("registry/b/x", tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("url, words", [("s3://", "names no bucket"),
                                        ("ftp://host/x", "is not s3://bucket/prefix")])
def test_a_bad_storage_url_is_refused_naming_the_setting(url, words):
    with pytest.raises(InvalidParams, match="LETHE_STORAGE_URL") as caught:
        open_storage(url)
    assert words in caught.value.message


def test_opening_the_storage_makes_a_missing_bucket(s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"new-{uuid.uuid4().hex[:8]}"
    store = open_storage(f"s3://{bucket}/x", s3_server.endpoint)
    store.write("registry/.domains.json", b"{}")
    assert store.read("registry/.domains.json") == b"{}"
    assert open_storage(f"s3://{bucket}/x", s3_server.endpoint) is store  # one client
