"""A shared deployment read as an attacker would (issue 33): what one key can do to the
service or to another key's work, each over real HTTP with the session's worker."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import session_registry
from tests.support import SHARED_KEYS, bearer, served, wait_job

pytestmark = pytest.mark.slow

SINGLE_FILE_16 = {"format": "single-file", "dtype": "float16"}


def _forget_export(model: str, params: dict) -> None:
    """The export as never made, so this test's request is the one that makes it."""
    from app import exports

    registry = session_registry()
    manifest = registry.get(model)
    dtype, rank, layout = exports.resolve(manifest, params["format"], params.get("dtype"),
                                          None)
    registry._drop_export(model, exports.file_name(manifest, params["format"], dtype, rank,
                                                   layout))


def test_anothers_canceled_export_never_cancels_mine(worker):
    """Finding 6: the first requester of an export could cancel it for everyone, for the
    week its cancel flag outlived the job."""
    _forget_export("tiny-sd", SINGLE_FILE_16)
    with served(LETHE_API_KEYS=SHARED_KEYS) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        r = http.get("/models/tiny-sd/download", params=SINGLE_FILE_16,
                     headers=bearer("alice"))
        assert r.status_code == 202, r.text
        first = r.json()["id"]
        assert http.delete(f"/jobs/{first}", headers=bearer("alice")).status_code == 202
        # Bob's request is his own job, which alice can neither see nor cancel.
        r = http.get("/models/tiny-sd/download", params=SINGLE_FILE_16, headers=bearer("bob"))
        assert r.status_code == 202, r.text
        mine = r.json()["id"]
        assert mine != first
        assert http.delete(f"/jobs/{mine}", headers=bearer("alice")).status_code == 404
        http.headers.update(bearer("bob"))
        assert wait_job(http, mine, timeout_s=120)["status"] == "succeeded"
        r = http.get("/models/tiny-sd/download", params=SINGLE_FILE_16)
        assert r.status_code == 200 and len(r.content) > 1000
        # Alice asks again once her canceled job has ended: her cancel did not outlive it.
        _forget_export("tiny-sd", SINGLE_FILE_16)
        http.headers.update(bearer("alice"))
        wait_job(http, first)
        r = http.get("/models/tiny-sd/download", params=SINGLE_FILE_16)
        assert r.status_code == 202, r.text
        assert wait_job(http, r.json()["id"], timeout_s=120)["status"] == "succeeded"


def test_exports_count_against_the_callers_jobs(worker):
    """Finding 2: exports were queued beside the quotas, so any key could fill the train
    queue with them."""
    with served(LETHE_API_KEYS=SHARED_KEYS, LETHE_MAX_ACTIVE_JOBS="1") as url, \
            httpx.Client(base_url=url, timeout=60, headers=bearer("carol")) as http:
        for dtype in ("float32", "float16"):
            _forget_export("tiny-sd", {"format": "diffusers", "dtype": dtype})
        r = http.get("/models/tiny-sd/download", params={"format": "diffusers"})
        assert r.status_code == 202, r.text
        r2 = http.get("/models/tiny-sd/download",
                      params={"format": "diffusers", "dtype": "float16"})
        assert r2.status_code == 429, r2.text
        assert "LETHE_MAX_ACTIVE_JOBS" in r2.json()["error"]["message"]
        wait_job(http, r.json()["id"], timeout_s=120)


def test_only_a_models_owner_or_an_admin_adds_to_its_reports(worker):
    """Finding 8: any key's evaluation was appended to any model's manifest."""
    body = {"model": "shapes-sd", "prompts": ["a red circle"], "images_per_prompt": 1,
            "steps": 2, "metrics": ["accuracy"]}
    with served(LETHE_API_KEYS=SHARED_KEYS) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        def reports() -> list:
            return http.get("/models/shapes-sd", headers=bearer("bob")).json().get(
                "reports", [])

        before = reports()
        http.headers.update(bearer("bob"))
        job = wait_job(http, http.post("/evaluate", json=body).json()["id"], timeout_s=300)
        assert job["status"] == "succeeded" and job["result"]["report"]["metrics"]
        assert reports() == before  # bob reads his report in his job only
        http.headers.update(bearer("root"))
        job = wait_job(http, http.post("/evaluate", json=body).json()["id"], timeout_s=300)
        assert [r["job"] for r in reports()][-1] == job["id"]
