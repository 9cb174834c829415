"""Domains: what one family of models draws, and how to prompt, judge and report on it.

The core (generation, ESD, evaluation) never imports a domain by path: it looks one up by
the name a model's manifest gives (``"domain": "shapes"``) in a name -> class table, the
way diffusers maps pipeline names to classes. A domain is a class with the ``Domain``
methods; plug-ins outside this package join the table through ``LETHE_DOMAINS``
(``name=package.module:Class``, comma-separated), read by every worker.

``generic`` serves any text-to-image model; ``shapes`` is the demo family.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any, Protocol

import numpy as np

from app.jobspecs import GENERIC

# Name -> "module:Class", imported on first use.
DOMAINS: dict[str, str] = {
    GENERIC: "worker.domains.generic:GenericDomain",
    "shapes": "worker.domains.shapes.domain:ShapesDomain",
}


class Judge(Protocol):
    """A domain's classifier at work: per-prompt verdicts and features for FID. A judge may
    also give a second, model-free opinion on a concept (``confirms(concept)`` and
    ``confirm(images, concept)``: the shapes judge's outline geometry), which attack
    verdicts require to agree (``worker.attacks.judged``)."""

    name: str

    def judge(self, images: np.ndarray, prompts: list[str]) -> dict[str, Any]: ...

    def features(self, images: np.ndarray) -> Any: ...


class Domain(Protocol):
    name: str
    report_protocol: int  # the layout of ``erasure_report``; a cached older one is redone

    def info(self) -> dict[str, Any]:
        """What the API needs to know, as JSON: ``prompt_sets`` (name -> size),
        ``default_prompt_set``, ``default_metrics``, ``judge_metrics``, ``reference``
        (the default for fid, or None), ``preserve`` (neighbours are known), and optionally
        ``concept_kinds`` (the values ``concept_kind`` may take)."""
        ...

    def prompt_set(self, name: str) -> list[str]: ...

    def training_texts(self, concept: str, kind: str | None = None) -> list[str]:
        """The prompts that name ``concept``, for "varied" erase training; ``kind`` is the
        request's ``concept_kind`` (a domain may ignore it)."""
        ...

    def neighbours(self, concept: str, erased: list[str], kind: str | None = None
                   ) -> list[str]:
        """Concepts of ``concept``'s kind the edit should keep ([]: none known); the first
        is the one a neighbour anchor draws in the concept's place (``worker.prompts``)."""
        ...

    def judge(self, classifier: Any, kind: str | None = None) -> Judge | None:
        """The domain's judge around ``classifier`` (its own, or the operator's CLIP model
        for the generic domain), None without one; ``kind`` as in ``training_texts``."""
        ...

    def references(self, prompts: list[str], seed: int, side: int) -> np.ndarray:
        """uint8 images the ``render`` reference compares with (one per prompt)."""
        ...

    def load_classifier(self, path: Any, device: Any) -> Any: ...

    def erasure_report(self, pipe: Any, classifier: Any, erased: list[str], per_prompt: int,
                       guidance: float, negative_prompt: str | None = None
                       ) -> dict[str, Any]:
        """How ``pipe`` draws the erased concepts and the others, judged by the classifier
        (ESD paper, Table 2). ``REPORT_PROTOCOL`` names its version."""
        ...


# A domain may also ship models in its package: ``shipped()`` -> {id: (folder, manifest)},
# registered at a worker's first start (worker.defaults). One that trains its own models
# has ``train(out, ...)`` (``lethe train``), and may retrain one without a concept for the
# erasure reports' reference (``worker.reference``): ``retrains``, the id of the model it
# retrains, and ``train_without(concept, ...)`` -> (that id, the pipeline, its manifest).


def register(name: str, target: str) -> None:
    """Add (or replace) a domain: ``target`` is ``"module:Class"``."""
    DOMAINS[name] = target
    get_domain.cache_clear()


def register_from_setting(value: str) -> None:
    """``LETHE_DOMAINS``: ``name=module:Class`` pairs, comma-separated."""
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, target = item.partition("=")
        if not name or ":" not in target:
            raise ValueError(f"LETHE_DOMAINS: {item!r} is not name=module:Class")
        register(name.strip(), target.strip())


@cache
def get_domain(name: str | None) -> Domain:
    """The domain called ``name``; a model that names none is ``generic``."""
    target = DOMAINS.get(name or GENERIC)
    if target is None:
        raise KeyError(f"no domain {name!r}; known: {sorted(DOMAINS)}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)()


def published() -> dict[str, dict[str, Any]]:
    """Every known domain's ``info()``: what workers publish for the API to read."""
    return {name: get_domain(name).info() for name in sorted(DOMAINS)}
