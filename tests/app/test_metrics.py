"""GET /metrics: one scrape sees the API's and the workers' numbers, parsed with
prometheus-client's own parser."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import SHARED_KEYS, bearer, served, wait_job


def scrape(http: httpx.Client, **headers: str) -> dict[tuple, float]:
    r = http.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(r.text)
            for sample in family.samples}


def moved(before: dict, after: dict) -> dict[tuple, float]:
    return {key: after[key] - before.get(key, 0.0) for key in after
            if after[key] != before.get(key, 0.0)}


def idle(http: httpx.Client) -> dict[tuple, float]:
    """A scrape once no job is queued or running (earlier tests' jobs have ended)."""
    deadline = time.monotonic() + 120
    while True:
        now = scrape(http)
        busy = sum(v for (name, _), v in now.items()
                   if name in ("lethe_queue_depth", "lethe_jobs_running"))
        if not busy:
            return now
        assert time.monotonic() < deadline, "the queues did not drain"
        time.sleep(0.2)


def test_counters_move_by_exactly_one_generate_and_one_erase(http):
    before = idle(http)
    gen = http.post("/generate", json={"prompt": "a", "steps": 2, "width": 64, "height": 64,
                                       "num_images": 2}).json()["id"]
    erase = http.post("/erase", json={"base_model": "tiny-sd", "concepts": ["red"],
                                      "iterations": 3, "name": "tiny-metrics"}).json()["id"]
    assert wait_job(http, gen)["status"] == "succeeded"
    assert wait_job(http, erase, timeout_s=300)["status"] == "succeeded"
    after = scrape(http)
    delta = moved(before, after)

    def change(name: str, **labels: str) -> float:
        return delta.get((name, tuple(sorted(labels.items()))), 0.0)

    for kind in ("generate", "erase"):
        assert change("lethe_jobs_submitted_total", type=kind) == 1
        assert change("lethe_jobs_finished_total", type=kind, status="succeeded") == 1
        for histogram in ("lethe_job_queue_wait_seconds", "lethe_job_run_seconds"):
            assert change(f"{histogram}_count", type=kind) == 1
            assert change(f"{histogram}_bucket", type=kind, le="+Inf") == 1
            assert change(f"{histogram}_sum", type=kind) > 0 or histogram.endswith("wait_seconds")
    assert change("lethe_images_total", type="generate") == 2
    assert change("lethe_esd_iterations_total") == 3
    assert change("lethe_esd_train_seconds_total") > 0
    assert after[("lethe_esd_iterations_per_second", ())] > 0
    # Nothing else counted a job: every job counter moved by these two alone.
    for name in ("lethe_jobs_submitted_total", "lethe_jobs_finished_total"):
        assert sum(v for (n, _), v in delta.items() if n == name) == 2, delta
    # The worker's cache and the disk are in the same scrape.
    workers = [dict(labels)["worker"] for (name, labels) in after
               if name == "lethe_pipeline_cache_loads_total"]
    assert "test-main" in workers
    assert after[("lethe_pipeline_cache_bytes", (("worker", "test-main"),))] > 0
    assert after[("lethe_disk_bytes", (("area", "outputs"),))] > 0
    assert after[("lethe_workers", ())] >= 1
    assert http.delete("/models/tiny-metrics").status_code == 204


def test_a_canceled_job_is_counted_once_as_canceled(http):
    before = idle(http)
    job = http.post("/erase", json={"base_model": "tiny-sd", "concepts": ["red"],
                                    "iterations": 500, "name": "tiny-metrics-cancel"}
                    ).json()["id"]
    wait_job(http, job, until=("running",))
    http.delete(f"/jobs/{job}")
    assert wait_job(http, job)["status"] == "canceled"
    http.get(f"/jobs/{job}")  # a read after the end reports nothing again
    delta = moved(before, scrape(http))
    assert delta[("lethe_jobs_finished_total", (("status", "canceled"), ("type", "erase")))] == 1
    assert sum(v for (n, _), v in delta.items() if n == "lethe_jobs_finished_total") == 1


@pytest.mark.parametrize("who, status", [("alice", 403), ("root", 200), (None, 401)])
def test_metrics_are_for_admin_keys(worker, who, status):
    with served(LETHE_API_KEYS=SHARED_KEYS) as url, httpx.Client(base_url=url) as http:
        r = http.get("/metrics", headers=bearer(who) if who else {})
        assert r.status_code == status, r.text
