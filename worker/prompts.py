"""The prompts an erase job trains each concept in.

ESD as published trains on the bare concept ("triangle"). The edit then holds for that
prompt but leaks where the concept appears in context ("a blue triangle on a white
background"): the cross-attention keys of the longer prompt are not the ones trained.
Training the concept inside varied prompts (each prompt paired with the concept, whose
direction alone is subtracted: see ``worker.esd``) closes most of that gap, so "varied" is
the default and "plain" keeps the paper's form.
"""

from __future__ import annotations

from worker.demo.erasure import concept_prompts
from worker.demo.render import COLORS, SHAPES
from worker.esd import ESDPrompt

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


def without(prompt: str, concept: str) -> str:
    """``prompt`` with the word(s) of ``concept`` taken out: the anchor it is erased against."""
    words, drop = prompt.split(), concept.split()
    for i in range(len(words) - len(drop) + 1):
        if words[i:i + len(drop)] == drop:
            return " ".join(words[:i] + words[i + len(drop):])
    return ""


def training_prompts(concepts: list[str], style: str, domain: str | None = None
                     ) -> tuple[ESDPrompt, ...]:
    """The prompts to train ``concepts`` in, interleaved so each concept is seen as often
    (a concept with fewer prompts repeats them).

    plain: the concept alone against the empty prompt (the paper). varied: the concept in
    each prompt that uses it, against that prompt without it, so only the concept moves.
    """
    if style == "plain":
        return tuple(ESDPrompt(c, c) for c in concepts)
    per_concept = []
    for c in concepts:
        if domain == "shapes" and (c in SHAPES or c in COLORS):
            texts = shapes_prompts(c)
        else:
            texts = [t.format(c) for t in GENERIC_TEMPLATES]
        per_concept.append([ESDPrompt(p, p, without(p, c)) for p in texts])
    longest = max(len(p) for p in per_concept)
    interleaved = [p[i % len(p)] for i in range(longest) for p in per_concept]
    return tuple(interleaved)
