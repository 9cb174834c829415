"""The shapes family as a domain: its prompt sets, neighbours, judge and erasure report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.domains.shapes import erasure
from worker.domains.shapes.judge import ShapesJudge, references
from worker.domains.shapes.render import COLORS, SHAPES

# The named prompt sets and how many prompts each holds (DESIGN.md's prompt forms).
PROMPT_SETS = {"shapes-color": 24, "shapes-full": 72, "shapes-shape": 4}


class ShapesDomain:
    name = "shapes"
    report_protocol = erasure.PROTOCOL

    def info(self) -> dict[str, Any]:
        return {"prompt_sets": PROMPT_SETS, "default_prompt_set": "shapes-color",
                "default_metrics": ["fid", "precision_recall", "attribute_score", "accuracy"],
                "judge_metrics": ["attribute_score", "accuracy"], "reference": "render",
                "preserve": True}

    def prompt_set(self, name: str) -> list[str]:
        if name == "shapes-shape":
            return [f"a {s}" for s in SHAPES]
        form = {"shapes-color": "color", "shapes-full": "full"}[name]
        return [p for p, _, _ in erasure.concept_prompts("", form)]

    def training_texts(self, concept: str) -> list[str]:
        """Every prompt form that names ``concept``; a word outside the domain gets the
        generic phrasings."""
        if concept not in SHAPES and concept not in COLORS:
            from worker.domains import get_domain

            return get_domain("generic").training_texts(concept)
        prompts = [concept]
        if concept in SHAPES:
            prompts.append(f"a {concept}")
        prompts += [p for p, _, _ in erasure.concept_prompts(concept, "color")]
        prompts += [p for p, _, _ in erasure.concept_prompts(concept, "full")]
        return prompts

    def neighbours(self, concept: str, erased: list[str]) -> list[str]:
        kind = SHAPES if concept in SHAPES else COLORS if concept in COLORS else ()
        return [c for c in kind if c != concept and c not in erased]

    def judge(self, classifier: Any) -> ShapesJudge | None:
        return ShapesJudge(classifier) if classifier is not None else None

    def references(self, prompts: list[str], seed: int, side: int) -> np.ndarray:
        return references(prompts, seed, side=side)

    def load_classifier(self, path: Any, device: Any) -> Any:
        from worker.domains.shapes.classifier import ShapesClassifier

        return ShapesClassifier.from_pretrained(path, torch_dtype=torch.float32
                                                ).to(device).eval()

    def erasure_report(self, pipe: Any, classifier: Any, erased: list[str], per_prompt: int,
                       guidance: float, negative_prompt: str | None = None
                       ) -> dict[str, Any]:
        return erasure.erasure_report(pipe, classifier, erased, per_prompt, guidance,
                                      negative_prompt=negative_prompt)

    def train(self, out: Path, seed: int = 0, threads: int = 0, scale: float = 1.0
              ) -> dict[str, Path]:
        """``lethe train demo``: the family from scratch (``scale`` < 1 for a smoke run)."""
        from worker.domains.shapes.train import DemoConfig, train_demo

        cfg = DemoConfig(seed=seed, threads=threads)
        return train_demo(out, cfg.scaled(scale) if scale != 1.0 else cfg)
