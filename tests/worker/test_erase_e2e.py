"""POST /erase end to end on the tiny model: a new model appears whole and serves at once."""

from __future__ import annotations

import io
import os
import signal

import numpy as np
import pytest
from PIL import Image

from app.testing import start_worker
from tests.conftest import session_registry
from tests.support import until_progress, wait_job
from tests.worker.test_features import clip_folder  # noqa: F401  (a fixture)

pytestmark = pytest.mark.slow


def erase(http, **body) -> str:
    r = http.post("/erase", json={"base_model": "tiny-sd", "concepts": ["red"], **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def image(http, model: str, seed: int = 3) -> np.ndarray:
    r = http.post("/generate", json={"prompt": "a red circle", "model": model, "steps": 4,
                                     "seed": seed})
    job = wait_job(http, r.json()["id"])
    assert job["status"] == "succeeded", job
    png = http.get(job["result"]["images"][0]["url"]).content
    return np.asarray(Image.open(io.BytesIO(png))).astype(int)


def test_erase_writes_a_delta_model_that_serves_at_once(http):
    job = wait_job(http, erase(http, name="tiny-no-red", learning_rate=0.05), timeout_s=300)
    assert job["status"] == "succeeded", job
    assert job["result"]["model"] == "tiny-no-red"
    assert job["progress"]["total"] == 20
    model = http.get("/models/tiny-no-red").json()
    assert model["format"] == "delta" and model["base"]["id"] == "tiny-sd"
    assert model["edit"]["method"] == "esd-x" and model["edit"]["concepts"] == ["red"]
    assert model["files"] == {"unet_delta.safetensors": model["files"]["unet_delta.safetensors"]}
    # Every erase shows its evidence: same-seed rows before and after, beside the
    # negative-prompt and SLD alternatives, as the job's image 0.
    evidence = model["evidence"]
    grid = job["result"]["images"][0]
    assert grid["role"] == "grid" and evidence["grid"] == grid["url"]
    # "red" is an object to the generic domain: its phrasings, then other objects held.
    assert [(r["kind"], r["prompt"]) for r in evidence["rows"]] == [
        ("erased", "a photo of a red"), ("erased", "a red"),
        ("neighbour", "a photo of a dog"), ("neighbour", "a photo of a cat")]
    assert evidence["columns"] == ["base", "edit", "negative_prompt", "sld"]
    sheet = Image.open(io.BytesIO(http.get(grid["url"]).content))
    assert sheet.size == (4 * 128, 4 * 128)  # columns × rows cells, 32 px images ×4
    assert evidence["drift"]["prompts"] == ["a photo of a dog", "a photo of a cat"]
    assert evidence["drift"]["psnr"] > 0 and evidence["drift"]["ssim"] <= 1
    # The drift was also measured during training (3 checks by default), the last entry
    # being the evidence's own; the manifest keeps the curve.
    curve = job["result"]["drift"]
    assert [d["iteration"] for d in curve] == [5, 10, 15, 20]
    assert curve[-1]["psnr"] == evidence["drift"]["psnr"]
    assert model["training"]["drift"] == curve
    assert curve[0]["psnr"] > curve[-1]["psnr"]  # the neighbours move as training goes on
    assert job["params"]["preserve"] is True
    base, edited = image(http, "tiny-sd"), image(http, "tiny-no-red")
    assert np.abs(base - edited).mean() > 0.5  # the edit changes what the model draws
    # A second erase under the same name is a conflict; the derived model can be deleted.
    assert http.post("/erase", json={"base_model": "tiny-sd", "concepts": ["blue"],
                                     "name": "tiny-no-red"}).status_code == 409
    assert http.delete("/models/tiny-no-red").status_code == 204
    assert http.get("/models/tiny-no-red").status_code == 404


def wait_for_checkpoint(http, home, job_id: str) -> None:
    """Until the job has passed its first checkpoint (every 50 iterations by default)."""
    until_progress(http, job_id, lambda p: p["step"] >= 60)
    assert (home / "checkpoints" / f"{job_id}.pt").is_file()


def test_cancel_an_erase_leaves_no_model_and_no_checkpoint(http, home):
    job_id = erase(http, name="tiny-canceled", iterations=5000)
    wait_for_checkpoint(http, home, job_id)
    http.delete(f"/jobs/{job_id}")
    assert wait_job(http, job_id)["status"] == "canceled"
    assert http.get("/models/tiny-canceled").status_code == 404
    assert not (home / "checkpoints" / f"{job_id}.pt").exists()
    assert not (home / "outputs" / job_id).exists()


def test_an_erase_that_fails_for_good_leaves_no_checkpoint(http, home):

    job_id = erase(http, name="tiny-taken-later", iterations=150)
    wait_for_checkpoint(http, home, job_id)
    # Another writer takes the name meanwhile: the erase cannot publish, and each retry
    # finds the name taken at once.
    with session_registry().create("tiny-taken-later", {"kind": "text-to-image",
                                                        "format": "delta"}):
        pass
    try:
        done = wait_job(http, job_id, timeout_s=300)
        assert done["status"] == "failed" and done["error"]["code"] == "model_exists", done
        assert not (home / "checkpoints" / f"{job_id}.pt").exists()
    finally:
        session_registry().force_remove("tiny-taken-later")


def test_killed_train_worker_resumes_from_its_checkpoint(http, home, worker):
    from app.testing import stop_worker

    stop_worker(worker.proc)
    # It checkpoints every 10 iterations (50 by default: fewer iterations to wait for).
    victim = start_worker("test-train-victim", queues="train",
                          log=home / "worker-train-victim.log",
                          env={"LETHE_CHECKPOINT_EVERY": "10"})
    job_id = erase(http, name="tiny-resumed", iterations=100)
    seen_partial = False

    def listed_yet(progress: dict) -> bool:  # at every step: is a half-made model listed?
        nonlocal seen_partial
        seen_partial |= "tiny-resumed" in [m["id"] for m in http.get("/models").json()["data"]]
        return progress["step"] >= 40

    progress = until_progress(http, job_id, listed_yet)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    worker.proc = start_worker("test-main", log=home / "worker-main.log")
    # Past the first drift check (at 25), the running job showed it, and its loss.
    assert (progress.get("drift") or {}).get("iteration") == 25, progress
    assert progress["loss"] is not None
    # Generous: a 2-core CI machine runs the remaining iterations after a worker restart.
    done = wait_job(http, job_id, timeout_s=600)
    assert done["status"] == "succeeded", done
    assert not seen_partial
    assert "tiny-resumed" in [m["id"] for m in http.get("/models").json()["data"]]
    # It picked up at its last checkpoint, not at iteration zero.
    assert done["result"]["iterations"] == 100
    assert 30 <= done["result"]["resumed_from"] < 100, done["result"]
    # The drift measured before the kill came back with the checkpoint.
    assert [d["iteration"] for d in done["result"]["drift"]] == [25, 50, 75, 100]


def test_with_a_clip_model_clip_judges_the_evidence_and_the_attacks(http, home, worker,
                                                             clip_folder, monkeypatch):  # noqa: F811
    from app.testing import stop_worker

    stop_worker(worker.proc)
    monkeypatch.setenv("LETHE_CLIP_MODEL_PATH", str(clip_folder))
    proc = start_worker("test-clip", log=home / "worker-clip.log")
    monkeypatch.delenv("LETHE_CLIP_MODEL_PATH")
    try:
        job = wait_job(http, erase(http, name="tiny-no-red-clip", iterations=4, attack={
            "attacks": ["conditioning"], "budgets": [1.0], "conditioning_steps": 2,
            "train_images": 2, "judge_images": 4, "batch": 2}), timeout_s=300)
    finally:
        stop_worker(proc)
        worker.proc = start_worker("test-main", log=home / "worker-main.log")
    assert job["status"] == "succeeded", job
    evidence = job["result"]["evidence"]
    assert "clip_note" not in evidence  # nothing missing to name
    for kind in ("erased", "neighbour"):  # two rows of each, four seeds a row
        scores = evidence["clip"][kind]
        assert scores["images"] == 8 and 0 <= scores["before"] <= 1 and 0 <= scores["after"] <= 1
    # The generic domain's attacks are judged by CLIP zero-shot: rates, on edit and base.
    [attacked] = job["result"]["attacks"]
    assert attacked["judge"] == "clip zero-shot" and "judge_note" not in attacked
    [curve] = attacked["conditioning"]
    assert all(curve[k] in {0.0, 0.25, 0.5, 0.75, 1.0} for k in ("edit", "base"))


def test_lethe_erase_command_runs_through_the_api(live_url, worker, http, capsys):
    from app.cli import main

    main(["erase", "blue", "--url", live_url, "--base-model", "tiny-sd", "--iterations", "3",
          "--name", "tiny-no-blue-cli", "--robust", "--anchor-concept", "green"])
    assert capsys.readouterr().out.strip() == "tiny-no-blue-cli"
    edit = http.get("/models/tiny-no-blue-cli").json()["edit"]
    assert (edit["robust"], edit["anchor"], edit["anchor_concept"]) == (True, "neighbour",
                                                                         "green")
    assert {p["prompt"]: p["anchor"] for p in edit["prompts"]}["a photo of a blue"] == (
        "a photo of a green")


def test_two_erases_deriving_the_same_name_both_publish(http):
    # Both are queued before either has published: each derives "tiny-sd-no-green".
    first, second = (erase(http, concepts=["green"], iterations=3) for _ in range(2))
    done = [wait_job(http, job_id, timeout_s=120) for job_id in (first, second)]
    assert [d["status"] for d in done] == ["succeeded", "succeeded"], done
    names = sorted(d["result"]["model"] for d in done)
    assert names == ["tiny-sd-no-green", "tiny-sd-no-green-2"], names
    for name in names:
        assert http.delete(f"/models/{name}").status_code == 204


def test_sdxl_generates_erases_and_serves_its_edit(http, home):
    """SDXL through the service: a tiny SDXL generates, an esd-x erase of it trains (the
    pooled embedding and time ids conditioning its UNet), and the edit serves at once."""
    from worker.defaults import TINY_MANIFEST
    from worker.tiny import tiny_sdxl_pipeline

    registry = session_registry()
    if not registry.exists("tiny-sdxl"):
        with registry.create("tiny-sdxl", {**TINY_MANIFEST,
                                           "pipeline": "StableDiffusionXLPipeline"}) as staging:
            tiny_sdxl_pipeline(seed=0).save_pretrained(staging, safe_serialization=True)
    job = wait_job(http, erase(http, base_model="tiny-sdxl", name="tiny-sdxl-no-red",
                               learning_rate=0.05), timeout_s=300)
    assert job["status"] == "succeeded", job
    model = http.get("/models/tiny-sdxl-no-red").json()
    assert model["format"] == "delta" and model["base"]["id"] == "tiny-sdxl"
    evidence = model["evidence"]
    assert evidence["columns"] == ["base", "edit", "negative_prompt"]
    assert "Safe Latent Diffusion" in evidence["columns_note"]
    base, edited = image(http, "tiny-sdxl"), image(http, "tiny-sdxl-no-red")
    assert base.shape == edited.shape == (32, 32, 3)
    assert np.abs(base - edited).mean() > 0.5
    # The cascade: an SDXL image upscaled ×4 by the (Stable Diffusion) upscaler, one job.
    r = http.post("/generate", json={"prompt": "a red circle", "model": "tiny-sdxl-no-red",
                                     "steps": 2, "upscale": {"steps": 2}})
    job = wait_job(http, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert [(i["role"], i["width"]) for i in job["result"]["images"]] == [("base", 32),
                                                                         ("upscaled", 128)]
    assert http.delete("/models/tiny-sdxl-no-red").status_code == 204


def test_erase_trained_as_lora_stores_only_its_factors(http):
    job = wait_job(http, erase(http, name="tiny-no-red-lora", method="esd-x-strict",
                               parameterization="lora", lora_rank=2, learning_rate=0.05,
                               drift_checks=0), timeout_s=300)
    assert job["status"] == "succeeded", job
    model = http.get("/models/tiny-no-red-lora").json()
    assert model["edit"]["parameterization"] == "lora" and model["edit"]["lora_rank"] == 2
    full = http.post("/erase", json={"base_model": "tiny-sd", "concepts": ["red"],
                                     "method": "esd-u", "parameterization": "lora"})
    assert full.status_code == 422 and "esd-x or esd-x-strict" in full.json()["error"]["message"]
    base, edited = image(http, "tiny-sd"), image(http, "tiny-no-red-lora")
    assert np.abs(base - edited).mean() > 0.5
    assert http.delete("/models/tiny-no-red-lora").status_code == 204
