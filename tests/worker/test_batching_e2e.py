"""Micro-batching through the real queue: compatible queued generate jobs share one call."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from tests.support import wait_job

pytestmark = pytest.mark.slow


def submit(http, **body) -> str:
    r = http.post("/generate", json={"prompt": "a red circle", "model": "tiny-sd",
                                     "steps": 4, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def pixels(http, job: dict) -> np.ndarray:
    png = http.get(job["result"]["images"][0]["url"]).content
    return np.asarray(Image.open(io.BytesIO(png))).astype(int)


def test_queued_compatible_jobs_run_as_one_batch_and_keep_their_own_images(http):
    # The worker is busy with a job of another size while the four queue up behind it.
    blocker = submit(http, steps=150, width=64, height=64)
    wait_job(http, blocker, until=("running",))
    ids = [submit(http, seed=40 + i, prompt=f"a {c} circle")
           for i, c in enumerate(["red", "blue", "red", "green"])]
    canceled = submit(http, seed=50)
    http.delete(f"/jobs/{canceled}")
    odd = submit(http, seed=60, steps=5)  # other steps: not compatible
    jobs = [wait_job(http, i, timeout_s=120) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    assert wait_job(http, canceled)["status"] == "canceled"
    assert wait_job(http, odd)["result"]["batch"]["jobs"] == 1
    batch = [j["result"]["batch"] for j in jobs]
    assert [b["led"] for b in batch] == [True, False, False, False] and batch[0]["jobs"] == 4
    assert [j["result"]["images"][0]["seed"] for j in jobs] == [40, 41, 42, 43]
    assert wait_job(http, blocker)["status"] == "succeeded"

    # Each job got its own image: the same request alone draws the same picture.
    alone = wait_job(http, submit(http, seed=41, prompt="a blue circle"))
    assert alone["result"]["batch"]["jobs"] == 1
    assert np.abs(pixels(http, alone) - pixels(http, jobs[1])).max() <= 2
    assert np.abs(pixels(http, jobs[0]) - pixels(http, jobs[2])).mean() > 1  # seeds differ


def test_a_canceled_leader_gives_its_companions_back(http, redis):
    from worker.batching import claim_key

    blocker = submit(http, steps=150, width=64, height=64)
    wait_job(http, blocker, until=("running",))
    leader, companion = submit(http, seed=70, steps=400), submit(http, seed=71, steps=400)
    wait_job(http, leader, until=("running",), timeout_s=60)
    deadline = time.monotonic() + 10  # RQ marks it running just before the job claims
    while redis.get(claim_key(companion)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert redis.get(claim_key(companion)) == leader.encode()  # in the leader's batch
    http.delete(f"/jobs/{leader}")
    assert wait_job(http, leader)["status"] == "canceled"
    done = wait_job(http, companion, timeout_s=120)
    # Nothing lost: released by the canceled batch, the companion ran on its own.
    assert done["status"] == "succeeded", done
    assert done["result"]["batch"] == {"jobs": 1, "images": 1, "led": True}
