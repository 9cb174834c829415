"""The evaluation job's building blocks (end to end: test_evaluate_e2e.py)."""

from __future__ import annotations


def test_the_apis_prompt_set_sizes_match_the_sets_the_worker_draws():
    from app.params import PROMPT_SET_SIZES
    from app.schemas import PromptSet
    from worker.domains import get_domain

    shapes = get_domain("shapes")
    assert set(PROMPT_SET_SIZES) == set(PromptSet.__args__)
    assert shapes.info()["prompt_sets"] == PROMPT_SET_SIZES
    assert {name: len(shapes.prompt_set(name)) for name in PROMPT_SET_SIZES} == PROMPT_SET_SIZES
