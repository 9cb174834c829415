"""The SDK (LetheClient, AsyncLetheClient) against the live service: submit, wait, follow,
fetch, typed results, and errors as exceptions."""

from __future__ import annotations

import io
import time

import httpx
import pytest
from PIL import Image

from app.client import ApiError, AsyncLetheClient, JobWaitTimeout, LetheClient
from app.schemas import JobCreated, JobPublic


@pytest.fixture
def lethe(live_url: str, worker):
    with LetheClient(live_url) as c:
        yield c


def test_generate_wait_and_fetch_the_images(lethe):
    created = lethe.generate(prompt="a red circle", model="tiny-sd", steps=2, num_images=2,
                             seed=4, negative_prompt=None)  # None: left to the service
    assert isinstance(created, JobCreated) and created.type == "generate"
    t0 = time.monotonic()
    job = lethe.wait(created, timeout_s=60)
    assert isinstance(job, JobPublic) and job.status == "succeeded", job
    assert time.monotonic() - t0 < 30  # a long poll answers when the job ends, not later
    assert job.params["negative_prompt"] is None
    for index in range(2):
        image = Image.open(io.BytesIO(lethe.image(job, index)))
        assert image.size == (32, 32) and image.format == "PNG"  # tiny-sd draws 32²
    assert "tiny-sd" in [m.id for m in lethe.models()]
    assert next(lethe.jobs(type="generate", limit=1)).id == created.id


def test_the_service_errors_arrive_as_exceptions_with_their_code(lethe):
    with pytest.raises(ApiError) as bad:
        lethe.generate(prompt="a", model="tiny-sd", steps=0)
    assert bad.value.status == 422 and bad.value.code == "invalid_params"
    assert "steps" in bad.value.message
    with pytest.raises(ApiError) as missing:
        lethe.job("no-such-job")
    assert missing.value.status == 404 and missing.value.code == "job_not_found"


def test_a_wait_that_runs_out_says_where_the_job_stands(lethe):
    job_id = lethe.generate(prompt="a", model="tiny-sd", steps=400, width=128, height=128).id
    with pytest.raises(JobWaitTimeout) as late:
        lethe.wait(job_id, timeout_s=0.5)
    assert late.value.job.id == job_id
    assert late.value.job.status in ("queued", "running")
    assert lethe.cancel(job_id).id == job_id
    assert lethe.wait(job_id, timeout_s=60).status == "canceled"


def test_upload_an_image_to_upscale(lethe):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    job = lethe.wait(lethe.upscale(buf.getvalue(), steps=1, seed=0), timeout_s=120)
    assert job.status == "succeeded", job
    assert Image.open(io.BytesIO(lethe.image(job))).size == (32, 32)


def test_the_async_client_does_what_the_sync_one_does(live_url, worker):
    import asyncio

    async def run() -> tuple[JobPublic, list[str], bytes, list[str]]:
        async with AsyncLetheClient(live_url) as lethe:
            created = await lethe.generate(prompt="a red circle", model="tiny-sd", steps=2,
                                           seed=4)
            names = [e.event async for e in lethe.events(created)]
            job = await lethe.wait(created, timeout_s=60)
            newest = await anext(lethe.jobs(type="generate", limit=1))
            listed = [newest.id]
            return job, names, await lethe.image(job), listed

    job, names, png, listed = asyncio.run(run())
    assert job.status == "succeeded" and names[-1] == "succeeded" and listed == [job.id]
    assert Image.open(io.BytesIO(png)).format == "PNG"


class _AnswerLost(httpx.BaseTransport):
    """Forwards every request; the first POST's answer is lost on the way back, after the
    service has acted on it (a connection reset at the worst moment)."""

    def __init__(self, inner: httpx.BaseTransport):
        self.inner, self.lost = inner, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST" and not self.lost:
            self.lost += 1
            response.read()
            raise httpx.ReadError("connection reset", request=request)
        return response


def test_a_submission_whose_answer_was_lost_is_sent_again_and_queued_once(live_url, worker):
    transport = _AnswerLost(httpx.HTTPTransport())
    with httpx.Client(base_url=live_url, transport=transport, timeout=30) as http:
        lethe = LetheClient(http=http)
        before = {j.id for j in lethe.jobs(type="erase")}
        created = lethe.erase(base_model="tiny-sd", concepts=["red"], iterations=400,
                              name="tiny-lost-answer")
        assert transport.lost == 1  # the first answer never arrived
        new = [j for j in lethe.jobs(type="erase") if j.id not in before]
        assert [j.id for j in new] == [created.id]  # one training, not two
        lethe.cancel(created)
        assert lethe.wait(created, timeout_s=60).status == "canceled"


def test_download_model_waits_for_the_export_and_writes_the_file(lethe, tmp_path):
    from app.checkpoint import read_header

    path = lethe.download_model("tiny-sd", tmp_path / "tiny.safetensors", timeout_s=300)
    header = read_header(path)
    assert "model.diffusion_model.input_blocks.0.0.weight" in header.shapes
