from __future__ import annotations

from collections import Counter

from worker.esd import ESDPrompt
from worker.prompts import training_prompts, without


def test_plain_is_the_papers_bare_concept_against_the_empty_prompt():
    assert training_prompts(["triangle", "red"], "plain", "shapes") == (
        ESDPrompt("triangle", "triangle", ""), ESDPrompt("red", "red", ""))


def test_varied_shapes_prompts_cover_every_form_and_anchor_on_the_rest_of_the_prompt():
    prompts = training_prompts(["triangle"], "varied", "shapes")
    texts = [p.prompt for p in prompts]
    assert {"triangle", "a triangle", "a blue triangle",
            "a blue triangle on a white background"} <= set(texts)
    assert len(set(texts)) == 2 + 6 + 18
    assert all("triangle" in t and "circle" not in t for t in texts)
    anchors = {p.prompt: p.anchor for p in prompts}
    assert anchors["a blue triangle on a white background"] == "a blue on a white background"
    assert anchors["triangle"] == "" and anchors["a triangle"] == "a"
    # A colour's anchor is the same prompt without the colour: a form the model knows.
    red = {p.prompt: p.anchor for p in training_prompts(["red"], "varied", "shapes")}
    assert red["a red circle"] == "a circle"


def test_varied_prompts_weight_two_concepts_evenly():
    prompts = training_prompts(["triangle", "red"], "varied", "shapes")
    # "triangle" has 26 prompts and "red" 17: red's repeat so both are trained as often.
    owner = Counter("triangle" if "triangle" in p.anchor + " " + p.prompt
                    and "triangle" not in p.anchor else "red" for p in prompts)
    assert owner["triangle"] == owner["red"] == 26


def test_concepts_outside_the_domain_use_generic_phrasings():
    prompts = training_prompts(["Van Gogh"], "varied", "shapes")
    assert ESDPrompt("a painting of a Van Gogh", "a painting of a Van Gogh",
                     "a painting of a") in prompts
    assert [p.prompt for p in training_prompts(["dog"], "varied", None)[:2]] == ["dog", "a dog"]
    assert without("a dog in the park", "dog") == "a in the park"
    assert without("a cat", "dog") == ""
