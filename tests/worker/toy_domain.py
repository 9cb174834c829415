"""A domain defined outside the core, for tests: light and dark scenes, judged by brightness.

It joins a worker through LETHE_DOMAINS=toy=tests.worker.toy_domain:ToyDomain, as a
plug-in of a user's would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

KINDS = ("light", "dark")


class BrightnessClassifier(torch.nn.Module):
    """The toy's classifier: a scene is light when its mean pixel is past the middle."""

    def predict(self, images: np.ndarray) -> list[str]:
        return ["light" if image.mean() > 127 else "dark" for image in images]


class BrightnessJudge:
    name = "brightness"

    def __init__(self, classifier: BrightnessClassifier):
        self.classifier = classifier

    def judge(self, images: np.ndarray, prompts: list[str]) -> dict[str, Any]:
        said = self.classifier.predict(images)
        asked = [next((k for k in KINDS if k in p.split()), None) for p in prompts]
        hits = [None if a is None else s == a for s, a in zip(said, asked, strict=True)]
        scored = [h for h in hits if h is not None]
        return {"hits": {"brightness": hits},
                "attribute_score": float(np.mean(scored)) if scored else 0.0}

    def features(self, images: np.ndarray) -> torch.Tensor:
        return torch.tensor(images.reshape(len(images), -1).mean(1, keepdims=True) / 255.0)


class ToyDomain:
    name = "toy"
    report_protocol = 1

    def info(self) -> dict[str, Any]:
        return {"prompt_sets": {"toy-pair": 2}, "default_prompt_set": "toy-pair",
                "default_metrics": ["accuracy"], "judge_metrics": ["accuracy"],
                "reference": None, "preserve": True}

    def prompt_set(self, name: str) -> list[str]:
        return [f"a {k} scene" for k in KINDS]

    def training_texts(self, concept: str, kind: str | None = None) -> list[str]:
        return [concept, f"a {concept} scene", f"a wide {concept} scene"]

    def neighbours(self, concept: str, erased: list[str], kind: str | None = None
                   ) -> list[str]:
        return [k for k in KINDS if k != concept and k not in erased]

    def judge(self, classifier: Any) -> BrightnessJudge | None:
        return BrightnessJudge(classifier) if classifier is not None else None

    def references(self, prompts: list[str], seed: int, side: int) -> np.ndarray:
        raise KeyError("the toy domain renders no references")

    def load_classifier(self, path: Any, device: Any) -> BrightnessClassifier:
        return BrightnessClassifier().eval()

    def erasure_report(self, pipe: Any, classifier: Any, erased: list[str], per_prompt: int,
                       guidance: float, negative_prompt: str | None = None
                       ) -> dict[str, Any]:
        from worker.sampling import generate

        prompts = [p for p in self.prompt_set("toy-pair") for _ in range(per_prompt)]
        images = generate(pipe, prompts, list(range(len(prompts))), guidance, steps=4,
                          negative_prompt=negative_prompt)
        verdict = BrightnessJudge(classifier).judge(images, prompts)
        by_kind = {k: float(np.mean([h for h, p in zip(verdict["hits"]["brightness"], prompts,
                                                         strict=True) if k in p.split()]))
                   for k in KINDS}
        return {"protocol": self.report_protocol, "per_prompt": per_prompt,
                "accuracy": by_kind, "erased": erased}
