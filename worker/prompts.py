"""The prompts an erase job trains each concept in.

ESD as published trains on the bare concept ("triangle"). The edit then holds for that
prompt but leaks where the concept appears in context ("a blue triangle on a white
background"): the cross-attention keys of the longer prompt are not the ones trained.
Training the concept inside varied prompts closes most of that gap, so "varied" is the
default and "plain" keeps the paper's form.
"""

from __future__ import annotations

from worker.demo.erasure import concept_prompts
from worker.demo.render import COLORS, SHAPES

TRAIN_PROMPT_STYLES = ("varied", "plain")

# For concepts outside a known domain: the phrasings users most often wrap a subject in.
GENERIC_TEMPLATES = (
    "{}", "a {}", "a photo of a {}", "a painting of a {}", "a drawing of a {}",
    "an image of a {}", "a close-up of a {}", "a picture with a {} in it",
)


def shapes_prompts(concept: str) -> list[str]:
    """Every prompt form of the shapes domain that names ``concept``."""
    prompts = [concept]
    if concept in SHAPES:
        prompts.append(f"a {concept}")
    prompts += [p for p, _, _ in concept_prompts(concept, "color")]
    prompts += [p for p, _, _ in concept_prompts(concept, "full")]
    return prompts


def training_prompts(concepts: list[str], style: str, domain: str | None = None
                     ) -> tuple[str, ...]:
    """The prompts to train ``concepts`` in, interleaved so each concept is seen as often
    (a concept with fewer prompts repeats them)."""
    if style == "plain":
        return tuple(concepts)
    per_concept = []
    for c in concepts:
        if domain == "shapes" and (c in SHAPES or c in COLORS):
            per_concept.append(shapes_prompts(c))
        else:
            per_concept.append([t.format(c) for t in GENERIC_TEMPLATES])
    longest = max(len(p) for p in per_concept)
    interleaved = [p[i % len(p)] for i in range(longest) for p in per_concept]
    return tuple(interleaved)
