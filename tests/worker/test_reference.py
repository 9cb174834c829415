"""The gap to a model that never learned the concept, on tiny models with a stand-in judge."""

from __future__ import annotations

import pytest

from app.registry import Registry
from tests.worker.test_attacks import SMALL, attacker, tiny_edit
from worker import reference
from worker.defaults import TINY_MANIFEST
from worker.domains import get_domain
from worker.tiny import save_tiny_pipeline, tiny_pipeline


@pytest.fixture(scope="module")
def pipes():
    return tiny_edit()


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "registry")
    with registry.create("tiny-without-red", {**TINY_MANIFEST, "reference_for": {
            "base": "tiny", "concept": "red"}}) as staging:
        save_tiny_pipeline(staging, seed=1)
    return registry


def test_a_report_has_the_references_rate_and_the_gap_beside_each_rate(pipes, registry):
    loaded = []

    def load(model_id):
        loaded.append(model_id)
        return tiny_pipeline(seed=1)

    refs = reference.References(registry, load, "tiny")
    spec = SMALL.model_copy(update={"attacks": ["conditioning", "relearning",
                                                "image_inversion", "prompt_search"]})
    one = attacker(pipes, spec)
    raw = one.run()
    report = refs.beside(raw, one, get_domain("generic"))
    assert report["reference"]["model"] == "tiny-without-red"
    assert report["reference"]["reused"] is False
    for row in report["conditioning"] + report["image_inversion"] + [report["plain"]]:
        assert row["gap"] == pytest.approx(row["edit"] - row["reference"], abs=1e-4)
    assert report["prompt_search"]["gap"] == pytest.approx(
        report["prompt_search"]["edit"]["rate"] - report["prompt_search"]["reference"], abs=1e-4)
    assert report["worst_gap"] == max(r["gap"] for r in report["conditioning"]
                                      + report["image_inversion"] + [report["prompt_search"]])
    curve = report["relearning"]
    assert [c["steps"] for c in curve["reference"]] == [1, 2]
    assert set(curve["steps_to_half"]) == {"edit", "reference"}
    # The reference's rates are kept on its manifest: the same attacks again cost nothing.
    kept = registry.get("tiny-without-red")["metrics"]["attacks"]
    assert len(kept) == 1
    second = refs.beside(raw, attacker(pipes, spec), get_domain("generic"))
    assert second["reference"]["reused"] is True and loaded == ["tiny-without-red"]
    assert [r["reference"] for r in second["conditioning"]] == [
        r["reference"] for r in report["conditioning"]]


def test_without_a_reference_the_report_says_so_and_how_to_make_one(pipes, registry):
    refs = reference.References(registry, tiny_pipeline, "shapes-sd")
    one = attacker(pipes, SMALL.model_copy(update={"attacks": ["conditioning"]}))
    raw = one.run()
    report = refs.beside(raw, one, get_domain("shapes"))
    assert report["reference"] is None and "gap" not in report["conditioning"][0]
    assert "lethe train shapes --without red" in report["reference_note"]
    generic = refs.beside(raw, one, get_domain("generic"))
    assert "cannot train" in generic["reference_note"]


def test_steps_to_half_is_the_first_step_drawing_the_concept_half_the_time():
    curve = [{"steps": 10, "rate": 0.1}, {"steps": 50, "rate": 0.5}, {"steps": 200, "rate": 1}]
    assert reference.steps_to_half(curve) == 50
    assert reference.steps_to_half(curve[:1]) is None


def test_the_reference_id_names_its_base_and_concept():
    assert reference.reference_id("shapes-sd", "Red Fox") == "shapes-sd-without-red-fox"
