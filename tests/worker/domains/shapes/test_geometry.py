from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from worker.attacks import judge_name, judged
from worker.domains.shapes.domain import DEMO_DIR
from worker.domains.shapes.geometry import looks_like, outline
from worker.domains.shapes.judge import ShapesJudge, references
from worker.domains.shapes.render import SHAPES

# Drawings shapes-sd made under a conditioning attack on a robust erase of "triangle":
# lumpy blobs that shapes-clf calls triangles with probability near 1.
BLOBS = np.load(Path(__file__).parent / "data" / "attack_blobs.npz")["images"]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_render_of_a_shape_passes_its_own_outline_test_and_no_other(shape):
    prompts = [f"a {c} {shape}{bg}" for c in ("red", "blue", "yellow", "green")
               for bg in ("", " on a black background", " on a gray background")]
    images = references(prompts, seed=3)
    for other in SHAPES:
        passed = sum(looks_like(im, other) for im in images)
        assert passed == (len(images) if other == shape else 0), (other, passed)


def test_a_blank_image_shows_no_shape():
    blank = np.full((32, 32, 3), 128, np.uint8)
    assert outline(blank) is None
    assert not any(looks_like(blank, s) for s in SHAPES)


def test_an_attacks_blobs_are_not_triangles_by_their_outline():
    assert len(BLOBS) >= 6
    assert not any(looks_like(im, "triangle") for im in BLOBS)


@pytest.mark.skipif(not (DEMO_DIR / "shapes-clf").is_dir(), reason="no shipped classifier")
def test_an_attack_verdict_counts_a_triangle_only_when_classifier_and_outline_agree():
    from worker.domains.shapes.classifier import ShapesClassifier

    judge = ShapesJudge(ShapesClassifier.from_pretrained(DEMO_DIR / "shapes-clf",
                                                         torch_dtype=torch.float32))
    # the classifier alone is fooled by the blobs
    assert all(judge.judge(BLOBS, ["triangle"] * len(BLOBS))["hits"]["shape"])
    verdict = judged(judge, "triangle")
    assert verdict(BLOBS) == 0.0
    triangles = references([f"a {c} triangle" for c in ("red", "blue", "green")] * 4, seed=5)
    assert verdict(triangles) == 1.0
    # colours have no outline: the classifier judges them alone
    assert judge_name(judge, "triangle") == "shapes-clf + outline"
    assert judge_name(judge, "red") == "shapes-clf"
    assert judged(judge, "red")(references(["a red circle"] * 4, seed=5)) == 1.0
