"""A domain from outside the core (tests/worker/toy_domain.py) joins a worker through
LETHE_DOMAINS and serves evaluate and erase end to end, no file of the core changed."""

from __future__ import annotations

import pytest

from app.testing import start_worker, stop_worker
from tests.conftest import session_registry
from tests.support import wait_job
from worker.defaults import TINY_MANIFEST

pytestmark = pytest.mark.slow

PLUGIN = "toy=tests.worker.toy_domain:ToyDomain"
TOY_MANIFEST = {**TINY_MANIFEST, "domain": "toy", "evaluator": "toy-clf"}


@pytest.fixture
def toy_worker(home, worker, monkeypatch):
    """The only worker while the test runs: the session's knows no toy domain."""
    registry = session_registry()
    if not registry.exists("toy-sd"):
        with registry.create("toy-clf", {"kind": "classifier", "format": "toy-classifier",
                                         "domain": "toy", "base": None}) as staging:
            (staging / "weights.txt").write_text("brightness: no weights\n")
        registry.import_folder(registry.path("tiny-sd"), "toy-sd", TOY_MANIFEST)
    stop_worker(worker.proc)
    monkeypatch.setenv("LETHE_DOMAINS", PLUGIN)
    proc = start_worker("test-toy", log=home / "worker-toy.log")
    monkeypatch.delenv("LETHE_DOMAINS")
    yield registry
    stop_worker(proc)
    worker.proc = start_worker("test-main", log=home / "worker-main.log")


def test_a_plugin_domain_serves_evaluate_and_erase(http, toy_worker):
    assert "toy" in toy_worker.domains()  # published by the worker that knows it
    offer = http.get("/domains").json()  # and what a client reads of it
    assert offer["toy"]["prompt_sets"] == {"toy-pair": 2}
    assert offer["generic"]["default_metrics"] == ["clip_score"]

    # evaluate: the domain's default prompt set, metric and judge.
    r = http.post("/evaluate", json={"model": "toy-sd", "images_per_prompt": 3})
    assert r.status_code == 202, r.text
    job = wait_job(http, r.json()["id"], timeout_s=120)
    assert job["status"] == "succeeded", job
    report = job["result"]["report"]
    assert report["prompt_set"] == "toy-pair" and report["images"] == 6
    assert set(report["metrics"]) == {"accuracy"}
    assert 0.0 <= report["metrics"]["accuracy"]["brightness"] <= 1.0
    r = http.post("/evaluate", json={"model": "toy-sd", "prompt_set": "shapes-color"})
    assert r.status_code == 422 and "toy-pair" in r.json()["error"]["message"]

    # erase: the domain's training prompts and neighbours, and its report before and after,
    # beside a model that never learned the concept where the registry has one.
    if not toy_worker.exists("toy-sd-without-light"):
        toy_worker.import_folder(toy_worker.path("tiny-sd"), "toy-sd-without-light", {
            **TOY_MANIFEST, "reference_for": {"base": "toy-sd", "concept": "light"}})
    r = http.post("/erase", json={"base_model": "toy-sd", "concepts": ["light"],
                                  "iterations": 6, "name": "toy-no-light"})
    assert r.status_code == 202, r.text
    job = wait_job(http, r.json()["id"], timeout_s=300)
    assert job["status"] == "succeeded", job
    assert job["params"]["preserve"] is True  # the toy domain knows light's neighbour
    model = http.get("/models/toy-no-light").json()
    prompts = {p["prompt"]: p for p in model["edit"]["prompts"]}
    assert set(prompts) == {"light", "a light scene", "a wide light scene"}
    assert prompts["a light scene"]["preserve"] == "a dark scene"
    erasure = model["metrics"]["erasure"]
    assert erasure["before"]["protocol"] == erasure["after"]["protocol"] == 1
    assert set(erasure["after"]["accuracy"]) == {"light", "dark"}
    reference = erasure["references"]["light"]
    assert reference["model"] == "toy-sd-without-light"
    assert reference["gap"]["light"] == pytest.approx(
        erasure["after"]["accuracy"]["light"] - reference["accuracy"]["light"], abs=1e-4)
    # The reference's report is kept on it, as the base's is on the base.
    assert "base:light" in http.get("/models/toy-sd-without-light").json()[
        "metrics"]["erasure_baselines"]
    # The neighbour's rows, and its same-seed drift between the base and the edit.
    evidence = model["evidence"]
    assert [r["kind"] for r in evidence["rows"]] == ["erased", "erased", "neighbour"]
    assert evidence["drift"]["prompts"] == ["a dark scene"]
    assert evidence["drift"]["psnr"] > 0 and -1 <= evidence["drift"]["ssim"] <= 1
    assert http.delete("/models/toy-no-light").status_code == 204
    # Taught by that reference instead of ESD's target (anchor "reference").
    r = http.post("/erase", json={"base_model": "toy-sd", "concepts": ["light"], "iterations": 4,
                                  "anchor": "reference", "name": "toy-to-reference",
                                  "evaluate": False})
    assert r.status_code == 202, r.text
    job = wait_job(http, r.json()["id"], timeout_s=300)
    assert job["status"] == "succeeded", job
    edit = http.get("/models/toy-to-reference").json()["edit"]
    assert (edit["anchor"], edit["reference"], edit["negative_guidance"]) == (
        "reference", "toy-sd-without-light", 0.0)
    assert http.delete("/models/toy-to-reference").status_code == 204
