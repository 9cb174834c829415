"""The generic domain: any text-to-image model, with no classifier of its own.

Its prompts wrap a concept in the phrasings users most often put a subject in; it knows no
neighbours to preserve and no judge (CLIP scores, when configured, measure such models).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# For concepts outside a known domain: the phrasings users most often wrap a subject in.
TEMPLATES = (
    "{}", "a {}", "a photo of a {}", "a painting of a {}", "a drawing of a {}",
    "an image of a {}", "a close-up of a {}", "a picture with a {} in it",
)


class GenericDomain:
    name = "generic"
    report_protocol = 0

    def info(self) -> dict[str, Any]:
        return {"prompt_sets": {}, "default_prompt_set": None, "default_metrics": ["clip_score"],
                "judge_metrics": [], "reference": None, "preserve": False}

    def prompt_set(self, name: str) -> list[str]:
        raise KeyError(f"the generic domain has no prompt set {name!r}")

    def training_texts(self, concept: str) -> list[str]:
        return [t.format(concept) for t in TEMPLATES]

    def neighbours(self, concept: str, erased: list[str]) -> list[str]:
        return []

    def judge(self, classifier: Any) -> None:
        return None

    def references(self, prompts: list[str], seed: int, side: int) -> np.ndarray:
        raise KeyError("the generic domain renders no references")

    def load_classifier(self, path: Any, device: Any) -> Any:
        raise KeyError("the generic domain has no classifier")

    def erasure_report(self, pipe: Any, classifier: Any, erased: list[str], per_prompt: int,
                       guidance: float, negative_prompt: str | None = None
                       ) -> dict[str, Any]:
        raise KeyError("the generic domain has no classifier to judge an erasure with")
