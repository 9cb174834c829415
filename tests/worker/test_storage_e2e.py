"""A whole service with its registry on S3-compatible storage (a real SeaweedFS): the
worker publishes and fetches models through the bucket, nothing through a shared disk."""

from __future__ import annotations

import httpx
import pytest

from app.testing import start_worker, stop_worker
from tests.conftest import REDIS_URL
from tests.support import served, wait_job

pytestmark = pytest.mark.slow


def test_generate_erase_and_delete_with_the_registry_in_a_bucket(s3_server, tmp_path):
    # Its own Redis database and data folder: the session's worker never sees these jobs.
    redis_url = (REDIS_URL.split("?")[0] + "?db=15" if REDIS_URL.startswith("unix://")
                 else REDIS_URL.rsplit("/", 1)[0] + "/15")
    env = {**s3_server.env(), "LETHE_HOME": str(tmp_path / "home"),
           "LETHE_REDIS_URL": redis_url}
    client = s3_server.client()
    with served(**env) as url:
        worker = start_worker("s3-worker", log=tmp_path / "worker.log")
        try:
            with httpx.Client(base_url=url, timeout=60) as http:
                listed = [m["id"] for m in http.get("/models").json()["data"]]
                assert {"tiny-sd", "shapes-sd"} <= set(listed)
                r = http.post("/erase", json={"base_model": "tiny-sd", "concepts": ["red"],
                                              "iterations": 3, "name": "tiny-no-red-s3"})
                assert wait_job(http, r.json()["id"], timeout_s=300)["status"] == "succeeded"
                keys = [o["Key"] for o in client.list_objects_v2(
                    Bucket=s3_server.bucket, Prefix="lethe/registry/tiny-no-red-s3/")[
                    "Contents"]]
                assert "lethe/registry/tiny-no-red-s3/manifest.json" in keys
                assert "lethe/registry/tiny-no-red-s3/unet_delta.safetensors" in keys
                r = http.post("/generate", json={"prompt": "a red circle", "steps": 2,
                                                 "model": "tiny-no-red-s3"})
                assert wait_job(http, r.json()["id"])["status"] == "succeeded"
                assert http.delete("/models/tiny-no-red-s3").status_code == 204
                assert "tiny-no-red-s3" not in [m["id"] for m in http.get("/models").json()[
                    "data"]]
                assert client.list_objects_v2(Bucket=s3_server.bucket, Prefix=(
                    "lethe/registry/tiny-no-red-s3/")).get("KeyCount", 0) == 0
            # No registry folder on this host: only the cache of what it loaded.
            assert not (tmp_path / "home" / "registry").exists()
            assert any((tmp_path / "home" / "cache" / "blobs").iterdir())
        finally:
            stop_worker(worker)
