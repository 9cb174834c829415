"""The generic domain: any text-to-image model, with no classifier of its own.

A concept is one of the three kinds the ESD paper erases, each with its own phrasings to
train in and its own neighbours to hold while it goes:

- ``object`` ("dog", "church"): "a photo of a {c}", "{c} in a field", ...; neighbours:
  other common objects;
- ``style`` ("Van Gogh", "pop art"): "a painting in the style of {c}", "{c} style
  artwork", ...; neighbours: other painters (the paper's artist experiments);
- ``unsafe`` ("nudity", "violence"): "a photo of {c}", "an image showing {c}", ...;
  neighbours: people and scenes the edit must still draw.

A request names the kind (``concept_kind``); otherwise ``infer_kind`` decides: a concept
that says "style", "art", "painting" or "painter", or one written as a capitalised name of
two words or more, is a style; one of a short list of unsafe words is unsafe; anything else
is an object. A request may also give its own ``preserve_prompts``.

Its judge, where the operator gives a CLIP folder, is CLIP zero-shot (``judge.py``).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from app.jobspecs import CONCEPT_KINDS, GENERIC_OFFER

KINDS = CONCEPT_KINDS
TEMPLATES = {
    "object": ("{}", "a photo of a {}", "a {}", "{} in a field", "a close-up of a {}",
               "a drawing of a {}", "an image of a {}", "a picture with a {} in it"),
    "style": ("{}", "a painting in the style of {}", "{} style artwork", "an artwork by {}",
              "a landscape in the style of {}", "a portrait painted by {}"),
    "unsafe": ("{}", "a photo of {}", "an image showing {}", "a picture with {}",
               "a painting of {}"),
}
NEIGHBOURS = {
    "object": ("dog", "cat", "car", "tree", "house", "chair"),
    "style": ("Claude Monet", "Rembrandt", "Andy Warhol", "Pablo Picasso"),
    "unsafe": ("people", "a crowd", "a family"),
}
_STYLE_WORDS = {"style", "art", "painting", "painter", "artist"}
_UNSAFE_WORDS = {"nudity", "nude", "naked", "violence", "violent", "blood", "gore", "weapon",
                 "weapons", "nsfw"}


def infer_kind(concept: str) -> str:
    words = concept.split()
    lowered = {w.lower() for w in words}
    if lowered & _STYLE_WORDS or (len(words) >= 2 and all(w[:1].isupper() for w in words)):
        return "style"
    if lowered & _UNSAFE_WORDS:
        return "unsafe"
    return "object"


class GenericDomain:
    name = "generic"
    report_protocol = 0

    def info(self) -> dict[str, Any]:
        return copy.deepcopy(GENERIC_OFFER)  # written once, in app.jobspecs; a copy to change

    def prompt_set(self, name: str) -> list[str]:
        raise KeyError(f"the generic domain has no prompt set {name!r}")

    def training_texts(self, concept: str, kind: str | None = None) -> list[str]:
        return [t.format(concept) for t in TEMPLATES[kind or infer_kind(concept)]]

    def neighbours(self, concept: str, erased: list[str], kind: str | None = None
                   ) -> list[str]:
        taken = {c.lower() for c in erased} | {concept.lower()}
        return [n for n in NEIGHBOURS[kind or infer_kind(concept)] if n.lower() not in taken]

    def judge(self, classifier: Any, kind: str | None = None) -> Any:
        """CLIP zero-shot (``judge.ClipJudge``) when ``classifier`` is the operator's CLIP
        model (``worker.features.ClipScorer``, from LETHE_CLIP_MODEL_PATH); else none."""
        from worker.domains.generic.judge import ClipJudge

        return ClipJudge(classifier, kind) if hasattr(classifier, "text_embeddings") else None

    def references(self, prompts: list[str], seed: int, side: int) -> np.ndarray:
        raise KeyError("the generic domain renders no references")

    def load_classifier(self, path: Any, device: Any) -> Any:
        raise KeyError("the generic domain has no classifier")

    def erasure_report(self, pipe: Any, classifier: Any, erased: list[str], per_prompt: int,
                       guidance: float, negative_prompt: str | None = None
                       ) -> dict[str, Any]:
        raise KeyError("the generic domain has no classifier to judge an erasure with")
