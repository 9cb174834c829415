"""The prompts an erase job trains each concept in.

ESD as published trains on the bare concept ("triangle"). The edit then holds for that
prompt but leaks where the concept appears in context ("a blue triangle on a white
background"): the cross-attention keys of the longer prompt are not the ones trained.
Training the concept inside varied prompts (each prompt paired with the concept, whose
direction alone is subtracted: see ``worker.esd``) closes most of that gap, so "varied" is
the default and "plain" keeps the paper's form.

With several concepts, every anchor leaves all of them out: "a red triangle" erased for
"triangle" against the anchor "a red" would teach "red" back while the job erases red.

``preserve`` pairs each varied prompt with a neighbour's: the same prompt with another
concept of the erased one's kind in its place ("a orange circle" for "a red circle"), which
the trainer holds unchanged. Only a known domain says what a neighbour is.
"""

from __future__ import annotations

from worker.domains.shapes.erasure import concept_prompts
from worker.domains.shapes.render import COLORS, SHAPES
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


def replace(prompt: str, concept: str, by: str) -> str | None:
    """``prompt`` with the word(s) of ``concept`` replaced by ``by`` (nothing: taken out);
    None when the prompt does not name the concept."""
    words, drop = prompt.split(), concept.split()
    for i in range(len(words) - len(drop) + 1):
        if words[i:i + len(drop)] == drop:
            return " ".join(words[:i] + by.split() + words[i + len(drop):])
    return None


def without(prompt: str, concepts: list[str]) -> str:
    """``prompt`` with every concept's words taken out: the anchor it is erased against."""
    for c in concepts:
        taken = replace(prompt, c, "")
        prompt = prompt if taken is None else taken
    return prompt


def neighbours(concept: str, erased: list[str]) -> list[str]:
    """The shapes-domain concepts of ``concept``'s kind that the job keeps."""
    kind = SHAPES if concept in SHAPES else COLORS
    return [c for c in kind if c != concept and c not in erased]


def _kept(prompt: str | None, erased: list[str]) -> str | None:
    """``prompt`` unless it names an erased concept ("a red circle" is no neighbour to hold
    while red goes)."""
    if prompt is None or any(replace(prompt, c, "") is not None for c in erased):
        return None
    return prompt


def training_prompts(concepts: list[str], style: str, domain: str | None = None,
                     preserve: bool = False) -> tuple[ESDPrompt, ...]:
    """The prompts to train ``concepts`` in, interleaved so each concept is seen as often
    (a concept with fewer prompts repeats them).

    plain: the concept alone against the empty prompt (the paper). varied: the concept in
    each prompt that uses it, against that prompt without it, so only the concept moves;
    with ``preserve`` (shapes domain only) each also names a neighbour's prompt to hold.
    """
    if style == "plain":
        return tuple(ESDPrompt(c, c) for c in concepts)
    per_concept = []
    for c in concepts:
        known = domain == "shapes" and (c in SHAPES or c in COLORS)
        texts = shapes_prompts(c) if known else [t.format(c) for t in GENERIC_TEMPLATES]
        near = neighbours(c, concepts) if known and preserve else []
        per_concept.append([ESDPrompt(p, p, without(p, concepts),
                                      _kept(replace(p, c, near[i % len(near)]), concepts)
                                      if near else None)
                            for i, p in enumerate(texts)])
    longest = max(len(p) for p in per_concept)
    interleaved = [p[i % len(p)] for i in range(longest) for p in per_concept]
    return tuple(interleaved)
