from __future__ import annotations

from collections import Counter

import pytest

from app.errors import InvalidParams
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
    assert len(prompts) == 52
    assert all("triangle" in p.prompt for p in prompts[0::2])
    assert all("red" in p.prompt for p in prompts[1::2])
    assert Counter(p.prompt for p in prompts[1::2])["a red circle"] == 2


def test_anchors_leave_out_every_erased_concept():
    # Erasing triangle against "a red" would teach red back while red is being erased.
    prompts = training_prompts(["triangle", "red"], "varied", "shapes")
    anchors = {p.prompt: p.anchor for p in prompts}
    assert anchors["a red triangle"] == "a"
    assert anchors["a red triangle on a gray background"] == "a on a gray background"
    assert anchors["a blue triangle"] == "a blue"
    assert anchors["a red square"] == "a square"


def test_preserve_names_a_neighbour_of_the_same_kind_that_is_kept():
    prompts = training_prompts(["red", "triangle"], "varied", "shapes", preserve=True)
    red = [p for p in prompts[0::2] if p.prompt.startswith("a red ")
           and "triangle" not in p.prompt]
    # The neighbour takes the erased word's place; other erased concepts never appear.
    assert {p.preserve.split()[1] for p in red} == {"orange", "yellow", "green", "blue",
                                                   "purple"}
    assert all(p.preserve == p.prompt.replace("red", p.preserve.split()[1]) for p in red)
    tri = [p for p in prompts[1::2] if "red" not in p.prompt]
    assert {w for p in tri for w in p.preserve.split()} & {"circle", "square", "cross"}
    assert not any("triangle" in p.preserve for p in tri)
    # "a red circle" is no neighbour of "a red triangle" while red is erased too.
    assert {p.preserve for p in prompts if p.prompt == "a red triangle"} == {None}
    # A model of no domain is generic: "dog" is an object, and another object is held.
    assert training_prompts(["dog"], "varied", None, preserve=True)[0].preserve == "cat"
    assert training_prompts(["red"], "varied", "shapes")[0].preserve is None


def test_concepts_outside_the_domain_use_generic_phrasings():
    prompts = training_prompts(["Van Gogh"], "varied", "shapes")  # a style, to generic
    assert ESDPrompt("a painting in the style of Van Gogh",
                     "a painting in the style of Van Gogh", "a painting in the style of"
                     ) in prompts
    assert [p.prompt for p in training_prompts(["dog"], "varied", None)[:2]] == [
        "dog", "a photo of a dog"]
    assert without("a dog in the park", ["dog"]) == "a in the park"
    assert without("a cat", ["dog"]) == "a cat"
    assert without("Van Gogh", ["Van Gogh"]) == ""


def test_generic_concepts_train_in_the_phrasings_of_their_kind_and_hold_neighbours():
    from worker.domains.generic import infer_kind

    assert [infer_kind(c) for c in ("dog", "Van Gogh", "pop art", "nudity", "church")] == [
        "object", "style", "style", "unsafe", "object"]
    dog = training_prompts(["dog"], "varied", None, preserve=True)
    assert {p.prompt: p.anchor for p in dog}["dog in a field"] == "in a field"
    assert {p.prompt: p.preserve for p in dog}["a photo of a dog"] == "a photo of a car"
    style = {p.prompt: p for p in training_prompts(["Van Gogh"], "varied", None, True)}
    assert style["a painting in the style of Van Gogh"].anchor == "a painting in the style of"
    assert style["a painting in the style of Van Gogh"].preserve.startswith(
        "a painting in the style of ")
    # The request's kind wins over the inference: "Apple" the company's style, say.
    assert "Apple style artwork" in [
        p.prompt for p in training_prompts(["Apple"], "varied", None, kind="style")]


def test_the_requests_preserve_prompts_are_held_in_turn():
    held = ["a photo of a cat", "a city street"]
    prompts = training_prompts(["dog"], "varied", None, preserve=True,
                               preserve_prompts=held)
    assert [p.preserve for p in prompts[:4]] == held * 2


def test_a_neighbour_anchor_puts_one_neighbour_in_the_concepts_place():
    prompts = training_prompts(["red", "triangle"], "varied", "shapes", preserve=True,
                               anchor="neighbour")
    anchors = {p.prompt: p.anchor for p in prompts}
    # The domain's first neighbour for every prompt, while the held ones still rotate.
    assert anchors["a red circle"] == "a orange circle"
    assert anchors["a blue triangle on a white background"] == (
        "a blue circle on a white background")
    assert len({p.preserve for p in prompts if p.prompt.startswith("a red ")}) > 1
    # Never another erased concept: "a red triangle" names both.
    assert {p.anchor for p in prompts if p.prompt == "a red triangle"} == {"a orange", "a circle"}
    # The request's concept wins; without preserve the anchor still moves.
    named = training_prompts(["red"], "varied", "shapes", anchor="neighbour",
                             anchor_concept="blue")
    assert {p.prompt: p.anchor for p in named}["a red square"] == "a blue square"
    assert all(p.preserve is None for p in named)
    # The request's own preserve prompts are the anchors, in turn, when no concept is named.
    held = ["a photo of a cat", "a city street"]
    dog = training_prompts(["dog"], "varied", None, preserve=True, preserve_prompts=held,
                           anchor="neighbour")
    assert [p.anchor for p in dog[:4]] == held * 2
    # A concept the domain knows no neighbour of has nothing to be steered to.
    with pytest.raises(InvalidParams, match="knows no neighbour of 'hexagon'; name one"):
        training_prompts(["hexagon"], "varied", "shapes", anchor="neighbour")
    # ESD's anchor otherwise.
    assert {p.prompt: p.anchor for p in training_prompts(["red"], "varied", "shapes")}[
        "a red circle"] == "a circle"
