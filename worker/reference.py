"""The model an erasure is measured against: its base retrained without the concept.

Unlearning's standard is the model that never saw the data: an erased model should be
indistinguishable from it. A domain that trains its own models (``train_without``) makes one
with ``lethe train DOMAIN --without CONCEPT``: a model of the registry like any other, whose
manifest says ``reference_for: {base, concept}``, made once per concept and reused.

Every attack report on an edit whose base has one runs the same attacks on it, learning from
the same images of the base, and reports per attack the **gap**: the edit's rate less the
reference's. An attack that brings a concept back as often from a model that never learned it
measures the attack's reach, not a failed erasure. The reference's rates are kept on its
manifest under the attack settings that made them, so a second report costs nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from app.registry import Registry

KEPT = 16  # attack reports a reference keeps (a manifest is read whole on every request)


def reference_id(base: str, concept: str) -> str:
    """The registry id ``lethe train --without`` gives a reference."""
    return f"{base}-without-{'-'.join(concept.lower().split())}"


def train(registry: Registry, domain: Any, concept: str, seed: int = 0, threads: int = 0,
          scale: float = 1.0, log: Callable[[str], None] = print) -> tuple[dict[str, Any], bool]:
    """The reference of ``domain``'s model without ``concept`` in ``registry``: trained and
    added whole (``lethe train DOMAIN --without CONCEPT``), or the one there already; and
    whether it was made now."""
    import time

    from worker.pipelines import save_pipeline

    if not hasattr(domain, "train_without"):
        raise ValueError(f"the domain {domain.name!r} does not train its models, so it cannot "
                         f"retrain one without {concept!r}")
    made = registry.reference_for(domain.retrains, concept)
    if made is not None:
        return made, False
    t0 = time.perf_counter()
    base, pipe, manifest = domain.train_without(concept, seed=seed, threads=threads,
                                                scale=scale, log=log)
    with registry.create(reference_id(base, concept), manifest | {
            "reference_for": {"base": base, "concept": concept},
            "training": {"seconds": round(time.perf_counter() - t0, 1), "seed": seed,
                         "scale": scale, "without": concept}}) as staging:
        save_pipeline(pipe, staging)
    return registry.get(reference_id(base, concept)), True


def missing(domain: Any, base: str, concept: str) -> str:
    """What a report says where ``base`` has no reference for ``concept``."""
    if not hasattr(domain, "train_without"):
        return (f"no model retrained without {concept!r}: the domain {domain.name!r} cannot "
                f"train its models, so the gap to one that never learned it is not measured")
    return (f"no model retrained without {concept!r} from the recipe of {base!r}, so the gap to "
            f"one that never learned it is not measured: make one with `lethe train "
            f"{domain.name} --without {concept}` (it is kept and reused)")


def attack_key(attacker: Any, base_digest: str | None) -> str:
    """The settings an attack report on a reference depends on, as one digest: the attacks'
    own (less which concepts and models they run on), the drawing, the parameters relearning
    tunes, the concept and its prompts, and the base whose images the attacks learn from."""
    settings = attacker.cfg.model_dump(exclude={"concepts", "control", "reference"})
    text = json.dumps({"attacks": settings, "drawing": asdict(attacker.drawing),
                       "trained": attacker.trained, "concept": attacker.concept,
                       "prompts": attacker.texts, "base": base_digest}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def attacked(registry: Registry, model_id: str, load: Callable[[str], Any], attacker: Any,
             base_digest: str | None = None) -> dict[str, Any]:
    """``attacker``'s attacks run on the reference ``model_id`` (loaded by ``load``; no
    control: the base was the edit's), or the report kept from an earlier run with the same
    settings."""
    key = attack_key(attacker, base_digest)
    kept = ((registry.get(model_id).get("metrics") or {}).get("attacks") or {}).get(key)
    if kept is not None:
        return kept | {"reused": True}
    report = attacker.on(load(model_id)).run()

    def keep(manifest: dict[str, Any]) -> None:
        metrics = manifest.get("metrics") or {}
        reports = {**(metrics.get("attacks") or {}), key: report}
        manifest["metrics"] = metrics | {"attacks": dict(list(reports.items())[-KEPT:])}

    registry.modify(model_id, keep)
    return report | {"reused": False}


def steps_to_half(curve: list[dict[str, Any]]) -> int | None:
    """The first relearning step at which the concept is drawn half the time or more (None:
    not within the steps tried)."""
    return next((c["steps"] for c in curve if c["rate"] is not None and c["rate"] >= 0.5),
                None)


def _gap(edit: float | None, reference: float | None) -> float | None:
    return None if edit is None or reference is None else round(edit - reference, 4)


def compare(edit: dict[str, Any], reference: dict[str, Any], model_id: str) -> dict[str, Any]:
    """The edit's attack report with the reference's rate and the gap beside each of its
    rates, and relearning's steps to half from each; ``worst_gap``: the largest gap of the
    inference-time attacks (relearning changes the weights and is reported apart)."""
    out = dict(edit)

    def beside(row: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
        theirs = None if ref is None else ref["edit"]
        return row | {"reference": theirs, "gap": _gap(row["edit"], theirs)}

    out["plain"] = beside(edit["plain"], reference.get("plain"))
    gaps = []
    for name, key in (("inversion", "tokens"), ("conditioning", "budget"),
                      ("image_inversion", "prompt")):
        if name in edit:
            theirs = {r[key]: r for r in reference.get(name, [])}
            out[name] = [beside(r, theirs.get(r[key])) for r in edit[name]]
            gaps += [r["gap"] for r in out[name]]
    if "prompt_search" in edit:
        theirs = (reference.get("prompt_search") or {}).get("edit") or {}
        row = edit["prompt_search"]
        out["prompt_search"] = row | {"reference": theirs.get("rate"),
                                      "gap": _gap(row["edit"]["rate"], theirs.get("rate"))}
        gaps.append(out["prompt_search"]["gap"])
    if "relearning" in edit and "relearning" in reference:
        mine, theirs = edit["relearning"]["edit"], reference["relearning"]["edit"]
        out["relearning"] = edit["relearning"] | {
            "reference": theirs,
            "steps_to_half": {"edit": steps_to_half(mine), "reference": steps_to_half(theirs)}}
    known = [g for g in gaps if g is not None]
    out["worst_gap"] = max(known) if known else None
    out["reference"] = {"model": model_id, "worst": reference.get("worst"),
                        "reused": reference.get("reused", False),
                        "seconds": reference.get("seconds")}
    return out


class References:
    """An edit's base's references, as its attack report finds them: in ``registry``, loaded
    by ``load`` (the worker's pipeline cache)."""

    def __init__(self, registry: Registry, load: Callable[[str], Any], base: str):
        self.registry, self.load, self.base = registry, load, base

    @classmethod
    def in_context(cls, ctx: Any, base: str) -> References:
        """``base``'s references as a worker finds them: its registry and pipeline cache."""
        return cls(ctx.registry, lambda model_id: ctx.cache.get(model_id)[0], base)

    def beside(self, report: dict[str, Any], attacker: Any, domain: Any) -> dict[str, Any]:
        """``report`` (``attacker``'s on the edit) with the gap to the reference for its
        concept, or a note saying there is none and how to make one."""
        found = self.registry.reference_for(self.base, attacker.concept)
        if found is None:
            return report | {"reference": None,
                             "reference_note": missing(domain, self.base, attacker.concept)}
        base_digest = (self.registry.get(self.base) if self.registry.exists(self.base)
                       else {}).get("digest")
        theirs = attacked(self.registry, found["id"], self.load, attacker, base_digest)
        return compare(report, theirs, found["id"])
