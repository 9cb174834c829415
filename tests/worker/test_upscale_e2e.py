"""Upscaling over real HTTP: uploads, earlier outputs and the generate → upscale cascade."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.app.test_images import png_bytes
from tests.support import until_progress, wait_job
from tests.worker.test_service_e2e import generate, png

pytestmark = pytest.mark.slow


def test_multipart_upload_upscales_four_times(http):
    r = http.post("/upscale", files={"image": ("in.png", png_bytes(12, 8), "image/png")},
                  data={"steps": "2", "seed": "3", "prompt": "a red square"})
    assert r.status_code == 202, r.text
    job = wait_job(http, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["type"] == "upscale" and job["params"]["prompt"] == "a red square"
    assert job["progress"]["step"] == job["progress"]["total"] == 2
    out = Image.open(io.BytesIO(png(http, job["id"])))
    assert out.size == (48, 32)


def test_base64_json_and_same_seed_same_bytes(http):
    b64 = base64.b64encode(png_bytes(8, 8, (0, 0, 255))).decode()
    a = wait_job(http, http.post("/upscale", json={"image": b64, "steps": 2, "seed": 5}
                                 ).json()["id"])
    b = wait_job(http, http.post("/upscale", json={"image": "data:image/png;base64," + b64,
                                                   "steps": 2, "seed": 5}).json()["id"])
    assert a["status"] == b["status"] == "succeeded"
    assert png(http, a["id"]) == png(http, b["id"])


def test_source_job_output_upscales_with_its_prompt(http):
    src = wait_job(http, generate(http, width=32, height=24, prompt="a green cross"))
    r = http.post("/upscale", json={"source": {"job_id": src["id"], "index": 0}, "steps": 2})
    assert r.status_code == 202, r.text
    job = wait_job(http, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["params"]["prompt"] == "a green cross"
    assert Image.open(io.BytesIO(png(http, job["id"]))).size == (128, 96)
    r = http.post("/upscale", json={"source": {"job_id": src["id"], "index": 1}})
    assert r.status_code == 404 and "`source.index`" in r.json()["error"]["message"]


def test_cascade_returns_base_and_upscaled_images_as_one_job(http):
    r = http.post("/generate", json={"prompt": "a red circle", "model": "tiny-sd", "steps": 3,
                                     "seed": 1, "num_images": 2, "width": 32, "height": 32,
                                     "upscale": {"steps": 2}})
    job = wait_job(http, r.json()["id"])
    assert job["status"] == "succeeded", job
    images = job["result"]["images"]
    assert [(i["role"], i["width"]) for i in images] == [("base", 32), ("base", 32),
                                                         ("upscaled", 128), ("upscaled", 128)]
    assert [i.get("source_index") for i in images[2:]] == [0, 1]
    assert job["progress"]["total"] == 3 + 2 * 2 and job["progress"]["stage"] == "done"
    assert Image.open(io.BytesIO(png(http, job["id"], 3))).size == (128, 128)


@pytest.mark.parametrize("stage", ["denoising", "upscaling"])
def test_cascade_cancel_in_either_stage(http, home, stage):
    body = {"prompt": "a red circle", "model": "tiny-sd", "width": 64, "height": 64,
            "steps": 300 if stage == "denoising" else 2, "upscale": {"steps": 300}}
    job_id = http.post("/generate", json=body).json()["id"]
    until_progress(http, job_id, lambda p: p["stage"] == stage)
    assert http.delete(f"/jobs/{job_id}").status_code == 202
    done = wait_job(http, job_id, timeout_s=60)
    assert done["status"] == "canceled", done
    assert done["progress"]["stage"] == stage
    # The base images written before the upscaling stage go with the job.
    assert not (home / "outputs" / job_id).exists()


def test_a_canceled_upload_leaves_no_file(http, home):
    r = http.post("/upscale", files={"image": ("in.png", png_bytes(200, 200), "image/png")},
                  data={"steps": "500"})  # four tiles of 500 steps
    job_id = r.json()["id"]
    assert (home / "outputs" / job_id / "input.png").is_file()
    wait_job(http, job_id, until=("running",))
    assert http.delete(f"/jobs/{job_id}").status_code == 202
    assert wait_job(http, job_id)["status"] == "canceled"
    assert not (home / "outputs" / job_id).exists()


def test_a_failed_job_shows_no_path_of_this_machine(http, redis, home):
    from app.jobspecs import UpscaleJob
    from app.queue import enqueue

    r = http.post("/upscale", files={"image": ("in.png", png_bytes(8, 8), "image/png")},
                  data={"steps": "1"})
    params = wait_job(http, r.json()["id"])["params"]
    # Its stored input gone (deleted by hand, say): the job says so, naming no path here.
    spec = UpscaleJob(**{**params, "input": "gone/input.png"})
    job = enqueue(redis, "upscale", spec, timeout_s=60, result_ttl_s=600)
    failed = wait_job(http, job.id)
    assert failed["status"] == "failed", failed
    message = failed["error"]["message"]
    assert message == "the image to upscale (gone/input.png) is no longer stored", message
    assert str(home) not in message


def test_an_unexpected_error_names_the_data_folder_by_its_setting(home):
    from app.config import get_settings
    from worker.jobs.base import _shown_error

    settings = get_settings()
    missing = settings.home / "outputs" / "x" / "input.png"
    shown = _shown_error(FileNotFoundError(f"no such file: {missing}"), settings)
    assert shown == "FileNotFoundError: no such file: $LETHE_HOME/outputs/x/input.png"
    assert str(home) not in shown
