from __future__ import annotations

from collections import Counter

from worker.prompts import training_prompts


def test_plain_is_the_papers_bare_concept():
    assert training_prompts(["triangle", "red"], "plain", "shapes") == ("triangle", "red")


def test_varied_shapes_prompts_cover_every_form_that_names_the_concept():
    prompts = training_prompts(["triangle"], "varied", "shapes")
    assert {"triangle", "a triangle", "a blue triangle",
            "a blue triangle on a white background"} <= set(prompts)
    assert len(set(prompts)) == 2 + 6 + 18
    assert all("triangle" in p for p in prompts)
    assert not any("circle" in p for p in prompts)


def test_varied_prompts_weight_two_concepts_evenly():
    prompts = training_prompts(["triangle", "red"], "varied", "shapes")
    # "triangle" has 26 prompts and "red" 17: red's repeat so both are trained as often.
    counts = Counter("triangle" if "triangle" in p and "red" not in p else
                     "red" if "red" in p and "triangle" not in p else "both" for p in prompts)
    assert counts["triangle"] + counts["both"] >= 26 and counts["red"] + counts["both"] >= 26
    assert abs(counts["triangle"] - counts["red"]) <= 1


def test_concepts_outside_the_domain_use_generic_phrasings():
    prompts = training_prompts(["Van Gogh"], "varied", "shapes")
    assert "a painting of a Van Gogh" in prompts and "Van Gogh" in prompts
    assert training_prompts(["dog"], "varied", None)[:2] == ("dog", "a dog")
