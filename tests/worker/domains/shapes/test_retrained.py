"""The retrained reference's data: shapes-sd's scenes, less every one of the concept."""

from __future__ import annotations

import numpy as np
import pytest

from worker.domains.shapes.render import COLORS, SHAPES, WORDS
from worker.domains.shapes.retrained import without
from worker.domains.shapes.train import MAX_TOKENS, DemoConfig, make_data
from worker.tokenizer import write_clip_tokenizer


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    tokenizer = write_clip_tokenizer(tmp_path_factory.mktemp("tok"), WORDS,
                                     model_max_length=MAX_TOKENS)
    return tokenizer, make_data(DemoConfig(n_images=300, n_hires=2), tokenizer, lambda m: None)


@pytest.mark.parametrize("concept", ["triangle", "red"])
def test_no_scene_or_prompt_of_the_concept_is_left(scenes, concept):
    tokenizer, data = scenes
    word = tokenizer(concept).input_ids[1]
    column, index = ((0, SHAPES.index(concept)) if concept in SHAPES
                     else (1, list(COLORS).index(concept)))
    shown = data.labels[:, column] == index
    assert shown.any() and (data.prompt_ids == word).any()  # there was something to drop

    kept = without(data, concept)

    assert not (kept.labels[:, column] == index).any()
    assert not (kept.prompt_ids == word).any()  # no prompt names it either
    assert len(kept.images) == len(kept.prompt_ids) == int((~shown).sum())
    np.testing.assert_array_equal(kept.images, data.images[~shown])  # the rest, untouched


def test_a_concept_outside_the_domain_is_refused(scenes):
    with pytest.raises(ValueError, match="'dog'"):
        without(scenes[1], "dog")
