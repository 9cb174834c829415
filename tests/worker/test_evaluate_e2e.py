"""POST /evaluate end to end on the shipped shapes-sd: a report in the job and on the model."""

from __future__ import annotations

import pytest

from tests.conftest import session_registry
from tests.support import wait_job
from worker.defaults import TINY_MANIFEST
from worker.domains import get_domain
from worker.prompts import replace
from worker.tiny import save_tiny_pipeline

pytestmark = pytest.mark.slow


def evaluate(http, **body) -> dict:
    r = http.post("/evaluate", json={"model": "shapes-sd", "images_per_prompt": 1,
                                     "steps": 10, **body})
    assert r.status_code == 202, r.text
    job = wait_job(http, r.json()["id"], timeout_s=300)
    assert job["status"] == "succeeded", job
    return job


def test_evaluate_reports_fid_precision_recall_and_the_classifier_scores(http):
    job = evaluate(http)
    report = job["result"]["report"]
    m = report["metrics"]
    assert report["images"] == 24 and report["reference"] == "render"
    assert report["features"] == "shapes-clf"
    assert set(m) == {"fid", "fid_floor", "precision", "recall", "attribute_score", "accuracy"}
    assert m["fid"] >= 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert m["fid_floor"] > 0  # at 24 images FID is mostly small-sample bias: the floor says so
    # The shipped model draws what it is asked for (the model card measures 100% at 30 steps).
    assert m["accuracy"]["shape"] >= 0.75 and m["accuracy"]["color"] >= 0.75
    assert job["progress"]["stage"] == "done"
    # The report is on the model, with every earlier one.
    reports = http.get("/models/shapes-sd").json()["reports"]
    assert reports[-1]["job"] == job["id"] and reports[-1]["metrics"] == m

    # One denoising step leaves a blur (measured: FID 3349 against 298, attribute score
    # 0.25 against 1.00, recall 0.08 against 1.0): the scores must see it.
    blurred = evaluate(http, steps=1)["result"]["report"]["metrics"]
    assert blurred["fid"] > 2 * m["fid"]
    assert blurred["attribute_score"] < m["attribute_score"] - 0.2
    assert len(http.get("/models/shapes-sd").json()["reports"]) == len(reports) + 1


def test_attacks_run_through_the_generic_domain_on_tiny_sd(http):
    """The path, not the rates: tiny-sd's domain has no judge here (no CLIP folder is
    configured), so every rate is null and the report says what would judge it."""
    small = {"train_images": 2, "judge_images": 2, "batch": 2, "tokens": [1],
             "inversion_steps": 2, "budgets": [1.0], "conditioning_steps": 2,
             "relearn_steps": [1, 2], "search_words": 2, "search_images": 1,
             "search_worst": 1}
    # Opted in on the erase: the attacks' report comes with the new model.
    r = http.post("/erase", json={"base_model": "tiny-sd", "concepts": ["red"],
                                  "iterations": 2, "name": "tiny-attacked", "robust": True,
                                  "anchor": "neighbour",
                                  "attack": {**small, "attacks": ["conditioning"]}})
    erased = wait_job(http, r.json()["id"], timeout_s=300)
    assert erased["status"] == "succeeded", erased
    [on_erase] = erased["result"]["attacks"]
    assert on_erase["concept"] == "red" and "inversion" not in on_erase
    assert [c["budget"] for c in on_erase["conditioning"]] == [1.0]
    model = http.get("/models/tiny-attacked").json()
    assert model["attacks"] == [on_erase] and model["edit"]["robust"] is True
    # Steered to the domain's first neighbour, with no negative guidance (as recorded).
    edit = model["edit"]
    assert (edit["anchor"], edit["negative_guidance"]) == ("neighbour", 0.0)
    near = get_domain(None).neighbours("red", ["red"])[0]
    assert edit["prompts"] and all(p["anchor"] == replace(p["prompt"], "red", near)
                                   for p in edit["prompts"])
    job = evaluate(http, model="tiny-attacked", metrics=[], attack=small, steps=2)
    [attacked] = job["result"]["report"]["attacks"]
    assert attacked["concept"] == "red" and attacked["judge"] is None
    assert "LETHE_CLIP_MODEL_PATH" in attacked["judge_note"]
    assert attacked["plain"] == {"edit": None, "base": None}
    assert [r["steps"] for r in attacked["relearning"]["edit"]] == [1, 2]
    assert attacked["prompt_search"]["edit"]["tried"] == 3
    assert attacked["prompt_search"]["edit"]["rate"] is None  # no judge: no number
    assert attacked["worst"] is None
    # relearned at the edit's own step (tiny-sd's erase default), as recorded
    assert attacked["settings"]["relearn_lr"] == 1e-3
    assert http.get("/models/tiny-attacked").json()["reports"][-1]["attacks"] == [attacked]
    # No model retrained without red: the report says so (tiny-sd's domain trains nothing).
    assert attacked["reference"] is None and "cannot train" in attacked["reference_note"]
    # With one in the registry, the same attacks run on it and each rate has its gap.
    registry = session_registry()
    with registry.create("tiny-sd-without-red", {**TINY_MANIFEST, "reference_for": {
            "base": "tiny-sd", "concept": "red"}}) as staging:
        save_tiny_pipeline(staging, seed=1)
    try:
        job = evaluate(http, model="tiny-attacked", metrics=[], steps=2, attack={
            **small, "attacks": ["conditioning", "image_inversion"]})
        [gapped] = job["result"]["report"]["attacks"]
        assert gapped["reference"]["model"] == "tiny-sd-without-red"
        assert [r["prompt"] for r in gapped["image_inversion"]] == ["empty", "concept"]
        assert all(set(r) >= {"edit", "reference", "gap"}
                   for r in gapped["conditioning"] + gapped["image_inversion"])
        kept = http.get("/models/tiny-sd-without-red").json()
        assert kept["reference_for"] == {"base": "tiny-sd", "concept": "red"}
        assert len(kept["metrics"]["attacks"]) == 1  # kept, and reused by the next report
    finally:
        registry.force_remove("tiny-sd-without-red")
    assert http.delete("/models/tiny-attacked").status_code == 204
