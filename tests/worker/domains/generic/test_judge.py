"""The generic domain's CLIP judge, on a tiny CLIP saved to disk as an operator's would be."""

from __future__ import annotations

import numpy as np

from tests.worker.test_features import clip_folder, pictures  # noqa: F401  (a fixture)
from worker.attacks import judged
from worker.domains import get_domain
from worker.domains.generic.judge import ClipJudge
from worker.features import ClipScorer


def test_the_concept_must_beat_its_bare_caption_and_every_neighbour():
    judge = ClipJudge(clip=None)
    assert judge.captions("dog") == ["a photo of a dog", "a photo", "a photo of a cat",
                                     "a photo of a car", "a photo of a tree",
                                     "a photo of a house", "a photo of a chair"]
    assert judge.captions("Van Gogh")[:3] == [
        "a painting in the style of Van Gogh", "a painting",
        "a painting in the style of Claude Monet"]
    # The request's kind wins over the inferred one.
    assert ClipJudge(None, kind="unsafe").captions("dog")[:2] == ["a photo of dog", "a photo"]


def test_without_a_clip_model_the_generic_domain_has_no_judge():
    assert get_domain("generic").judge(None) is None


def test_an_attack_verdict_is_a_rate_with_clip_and_none_without(clip_folder):  # noqa: F811
    import torch

    judge = get_domain("generic").judge(ClipScorer(clip_folder, torch.device("cpu")), "object")
    assert judge.name == "clip zero-shot"
    images = pictures(6)
    verdict = judge.judge(images, ["red"] * 3 + ["blue"] * 3)
    hits = verdict["hits"]["concept"]
    assert len(hits) == 6 and all(isinstance(h, bool) for h in hits)
    assert 0.0 <= verdict["attribute_score"] <= 1.0
    rate = judged(judge, "red")(images)
    assert rate is not None and rate == np.mean(judge.judge(images, ["red"] * 6)["hits"]["concept"])
    assert judged(None, "red")(images) is None
    assert judge.features(images).shape[0] == 6
