"""LetheClient against the live service: submit, wait, fetch, and errors as exceptions."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from app.client import ApiError, JobWaitTimeout, LetheClient


@pytest.fixture
def lethe(live_url: str, worker):
    with LetheClient(live_url) as c:
        yield c


def test_generate_wait_and_fetch_the_images(lethe):
    job_id = lethe.generate(prompt="a red circle", model="tiny-sd", steps=2, num_images=2,
                            seed=4, negative_prompt=None)  # None: left to the service
    t0 = time.monotonic()
    job = lethe.wait(job_id, timeout_s=60)
    assert job["status"] == "succeeded", job
    assert time.monotonic() - t0 < 30  # a long poll answers when the job ends, not later
    assert job["params"]["negative_prompt"] is None
    for index in range(2):
        image = Image.open(io.BytesIO(lethe.image(job_id, index)))
        assert image.size == (32, 32) and image.format == "PNG"  # tiny-sd draws 32²
    assert "tiny-sd" in [m["id"] for m in lethe.models()]


def test_the_service_errors_arrive_as_exceptions_with_their_code(lethe):
    with pytest.raises(ApiError) as bad:
        lethe.generate(prompt="a", model="tiny-sd", steps=0)
    assert bad.value.status == 422 and bad.value.code == "invalid_params"
    assert "steps" in bad.value.message
    with pytest.raises(ApiError) as missing:
        lethe.job("no-such-job")
    assert missing.value.status == 404 and missing.value.code == "job_not_found"


def test_a_wait_that_runs_out_says_where_the_job_stands(lethe):
    job_id = lethe.generate(prompt="a", model="tiny-sd", steps=400, width=128, height=128)
    with pytest.raises(JobWaitTimeout) as late:
        lethe.wait(job_id, timeout_s=0.5)
    assert late.value.job["id"] == job_id
    assert late.value.job["status"] in ("queued", "running")
    assert lethe.cancel(job_id)["id"] == job_id
    assert lethe.wait(job_id, timeout_s=60)["status"] == "canceled"


def test_upload_an_image_to_upscale(lethe):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    job = lethe.wait(lethe.upscale(buf.getvalue(), steps=1, seed=0), timeout_s=120)
    assert job["status"] == "succeeded", job
    assert Image.open(io.BytesIO(lethe.image(job["id"]))).size == (32, 32)
