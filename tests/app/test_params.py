"""Requests into job specs: what a model's manifest decides and what the request does."""

from __future__ import annotations

import pytest

from app.config import Settings
from app.errors import InvalidParams
from app.jobspecs import DRAW_GUIDANCE, ERASE_METHOD, ERASE_NEGATIVE_GUIDANCE, EraseJob
from app.params import resolve_erase
from app.registry import Registry
from app.schemas import EraseCreate

ERASE_DEFAULTS = {"method": "esd-x-strict", "negative_guidance": 2.0, "iterations": 600,
                  "learning_rate": 5e-4, "robust": True, "preserve_weight": 2.0,
                  "by_method": {"esd-u": {"learning_rate": 1e-4, "iterations": 200,
                                          "negative_guidance": 1.0, "robust": False,
                                          "preserve_weight": 1.0},
                                "esd-all": {"anchor": "neighbour", "learning_rate": 1e-4}},
                  "by_parameterization": {"lora": {"learning_rate": 2e-3}}}


@pytest.fixture
def registry(tmp_path) -> Registry:
    registry = Registry(tmp_path / "registry")
    for model_id, extra in (("tuned-sd", {"erase_defaults": ERASE_DEFAULTS,
                                          "defaults": {"size": 64, "guidance_scale": 4.0}}),
                            ("plain-sd", {})):
        with registry.create(model_id, {"kind": "text-to-image", "format": "diffusers",
                                        "base": None, **extra}):
            pass
    return registry


def erase(registry: Registry, tmp_path, **body) -> EraseJob:
    return resolve_erase(EraseCreate(concepts=["red"], **body), registry,
                         Settings(home=tmp_path))


def test_the_models_erase_defaults_decide_what_the_request_leaves_open(registry, tmp_path):
    spec = erase(registry, tmp_path, base_model="tuned-sd")
    assert (spec.method, spec.negative_guidance, spec.iterations, spec.learning_rate) == \
        ("esd-x-strict", 2.0, 600, 5e-4)
    assert (spec.robust, spec.preserve_weight) == (True, 2.0)
    assert (spec.height, spec.draw_guidance) == (64, 4.0)  # drawn as the model draws
    # A method of the request takes that method's own defaults.
    spec = erase(registry, tmp_path, base_model="tuned-sd", method="esd-u")
    assert (spec.negative_guidance, spec.iterations, spec.learning_rate) == (1.0, 200, 1e-4)
    assert (spec.robust, spec.preserve_weight) == (False, 1.0)
    # Trained as LoRA: that parameterization's own step, the rest as the method's.
    spec = erase(registry, tmp_path, base_model="tuned-sd", parameterization="lora")
    assert (spec.parameterization, spec.lora_rank, spec.learning_rate, spec.iterations) == \
        ("lora", 4, 2e-3, 600)
    with pytest.raises(InvalidParams, match="`method` esd-x or esd-x-strict, got 'esd-u'"):
        erase(registry, tmp_path, base_model="tuned-sd", method="esd-u", parameterization="lora")
    # What the request says wins, a zero included.
    spec = erase(registry, tmp_path, base_model="tuned-sd", negative_guidance=0.0,
                 robust=False)
    assert (spec.negative_guidance, spec.robust) == (0.0, False)


def test_a_model_without_erase_defaults_gets_the_papers(registry, tmp_path):
    spec = erase(registry, tmp_path, base_model="plain-sd")
    assert (spec.method, spec.negative_guidance, spec.iterations, spec.learning_rate) == \
        (ERASE_METHOD, ERASE_NEGATIVE_GUIDANCE, 1000, 1e-5)
    assert not spec.robust
    assert (spec.height, spec.draw_guidance) == (512, DRAW_GUIDANCE)


def test_a_neighbour_anchor_needs_a_neighbour_and_steers_no_further(registry, tmp_path):
    spec = erase(registry, tmp_path, base_model="tuned-sd")
    assert (spec.anchor, spec.negative_guidance) == ("without", 2.0)
    # Asked for: η 0 unless asked too (the neighbour's drawing is the target itself).
    spec = erase(registry, tmp_path, base_model="tuned-sd", anchor="neighbour")
    assert (spec.anchor, spec.negative_guidance) == ("neighbour", 0.0)
    spec = erase(registry, tmp_path, base_model="tuned-sd", anchor="neighbour",
                 negative_guidance=0.5)
    assert spec.negative_guidance == 0.5
    with pytest.raises(InvalidParams, match="`anchor` 'neighbour' .* got train_prompts "
                                            "'plain', anchor_concept None"):
        erase(registry, tmp_path, base_model="tuned-sd", anchor="neighbour",
              train_prompts="plain")
    # A named neighbour implies the anchor, and is no erased concept.
    spec = erase(registry, tmp_path, base_model="tuned-sd", anchor_concept="orange")
    assert (spec.anchor, spec.anchor_concept, spec.negative_guidance) == (
        "neighbour", "orange", 0.0)
    with pytest.raises(InvalidParams, match="`anchor_concept` 'Red' is one of the concepts"):
        erase(registry, tmp_path, base_model="tuned-sd", anchor_concept="Red")
    with pytest.raises(InvalidParams, match="`anchor_concept` 'orange' .* needs anchor "
                                            "'neighbour', got 'without'"):
        erase(registry, tmp_path, base_model="tuned-sd", anchor_concept="orange",
              anchor="without")
    # A method's default anchor holds where a neighbour is known, and gives way where none.
    spec = erase(registry, tmp_path, base_model="tuned-sd", method="esd-all")
    assert (spec.anchor, spec.negative_guidance, spec.learning_rate) == ("neighbour", 0.0, 1e-4)
    spec = erase(registry, tmp_path, base_model="tuned-sd", method="esd-all",
                 train_prompts="plain")
    assert (spec.anchor, spec.negative_guidance) == ("without", 2.0)


def test_a_reference_anchor_needs_the_model_retrained_without_the_concept(registry, tmp_path):
    with pytest.raises(InvalidParams, match="`anchor` 'reference' .* got concepts \\['red'\\] "
                                            "on 'tuned-sd', which has none"):
        erase(registry, tmp_path, base_model="tuned-sd", anchor="reference")
    with registry.create("tuned-sd-without-red", {
            "kind": "text-to-image", "format": "diffusers", "base": None,
            "reference_for": {"base": "tuned-sd", "concept": "red"}}):
        pass
    spec = erase(registry, tmp_path, base_model="tuned-sd", anchor="reference")
    assert (spec.anchor, spec.reference, spec.negative_guidance) == (
        "reference", "tuned-sd-without-red", 0.0)
    with pytest.raises(InvalidParams, match="one concept of a model that has one"):
        resolve_erase(EraseCreate(concepts=["red", "blue"], base_model="tuned-sd",
                                  anchor="reference"), registry, Settings(home=tmp_path))
    # As a model's default: taken where there is a reference, else ESD's own anchor.
    registry.update_manifest("tuned-sd", erase_defaults=ERASE_DEFAULTS | {"anchor": "reference"})
    assert erase(registry, tmp_path, base_model="tuned-sd").reference == "tuned-sd-without-red"
    spec = resolve_erase(EraseCreate(concepts=["blue"], base_model="tuned-sd"), registry,
                         Settings(home=tmp_path))
    assert (spec.anchor, spec.reference, spec.negative_guidance) == ("without", None, 2.0)
