"""The reference an erasure is measured against: ``shapes-sd`` retrained without a concept.

    python -m worker.domains.shapes.retrained triangle --out DIR [--scale 1.0]

Unlearning's gold standard is the model that never saw the data: here, ``shapes-sd``'s own
recipe (``worker.domains.shapes.train``: the same scenes from the same seed, the same
steps) with every scene of the concept dropped, on the shipped VAE and tokenizer. Then
what an erase is judged by, on it: the erasure report (the concept's and its neighbours'
accuracy, FID on kept prompts) and the attacks of ``worker.attacks``, which learn from the
**shipped** model's drawings of the concept, as they do for an edit. An attack that brings
back a concept this model never learned measures the attack's reach, not a failed erasure.
One line of JSON goes to stdout; the model is kept in ``--out`` (run again to evaluate it
without training).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

from app.jobspecs import AttackSpec
from worker.domains.shapes import train
from worker.domains.shapes.render import COLORS, SHAPES

MODEL = "shapes-sd"


def without(data: train.Data, concept: str) -> train.Data:
    """``data`` less every 32×32 scene showing ``concept`` (a shape, or a shape's colour);
    the 128×128 scenes, which the text-to-image model does not see, are kept."""
    if concept in SHAPES:
        keep = data.labels[:, 0] != SHAPES.index(concept)
    elif concept in COLORS:
        keep = data.labels[:, 1] != list(COLORS).index(concept)
    else:
        raise ValueError(f"`concept` must be a shape {SHAPES} or a colour {tuple(COLORS)}, "
                         f"got {concept!r}")
    return train.Data(data.images[keep], data.labels[keep], data.prompt_ids[keep],
                      data.hires, data.hires_prompt_ids)


def retrain(shipped: Any, concept: str, cfg: train.DemoConfig, log: Any = print) -> Any:
    """``shapes-sd``'s text encoder and UNet trained from scratch without ``concept``, as a
    pipeline on ``shipped``'s VAE and tokenizer."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    data = without(train.make_data(cfg, shipped.tokenizer, log), concept)
    log(f"[data] {len(data.images)} scenes without {concept!r}")
    vae = copy.deepcopy(shipped.vae).float()  # the shipped pipeline stays as it is
    text_encoder, unet = train.train_sd(cfg, data, vae, shipped.tokenizer, log)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=shipped.tokenizer, unet=unet,
        scheduler=DDIMScheduler(**train.SD_SCHEDULE), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def evaluate(shipped: Any, model: Any, clf: Any, concept: str, spec: AttackSpec,
             per_prompt: int) -> dict[str, Any]:
    """The erasure report and the attacks on ``model``, drawn as ``shapes-sd`` draws."""
    from worker.attacks import Attacker, Drawing, judged
    from worker.domains import get_domain
    from worker.domains.shapes.domain import DEMO_MANIFESTS

    domain = get_domain("shapes")
    d = DEMO_MANIFESTS[MODEL]["defaults"]  # how shapes-sd draws
    drawing = Drawing(d["guidance_scale"], d["steps"], d["height"], d["width"])
    report = domain.erasure_report(model, clf, [concept], per_prompt, drawing.guidance)
    attacks = Attacker(shipped, model, concept, domain.training_texts(concept),
                       judged(domain.judge(clf), concept), spec, drawing).run()
    neighbours = domain.neighbours(concept, [concept])
    search = (attacks.get("prompt_search") or {}).get("edit")
    return {
        "concept": concept, "erased": report["accuracy"][concept],
        "long_prompts": (report.get("accuracy_full_prompts") or {}).get(concept),
        "neighbours": {c: report["accuracy"][c] for c in neighbours},
        "kept_fid": (report.get("kept_prompts") or {}).get("fid"),
        "plain": attacks["plain"]["edit"],
        "inversion": {r["tokens"]: r["edit"] for r in attacks.get("inversion", [])},
        "conditioning": {r["budget"]: r["edit"] for r in attacks.get("conditioning", [])},
        "prompt_search": search["rate"] if isinstance(search, dict) else search,
        "attack_settings": attacks["settings"]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m worker.domains.shapes.retrained")
    parser.add_argument("concept")
    parser.add_argument("--out", type=Path, required=True,
                        help="the retrained model's folder (trained when absent)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="the recipe's steps and data × this (< 1: a smoke run)")
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--attack-options", type=json.loads, default=None,
                        help="AttackSpec fields as JSON (default: the attack table's)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from diffusers import StableDiffusionPipeline

    from worker.context import get_context
    from worker.defaults import ensure_default_models

    ctx = get_context()
    ensure_default_models(ctx.registry)
    shipped, _ = ctx.cache.get(MODEL)
    if not args.out.exists():
        cfg = train.DemoConfig(n_hires=16)  # the 128×128 scenes train only the upscaler
        cfg = cfg.scaled(args.scale) if args.scale != 1.0 else cfg
        t0 = time.perf_counter()
        model = retrain(shipped, args.concept, cfg, log=lambda m: print(m, flush=True))
        print(f"[retrained] {time.perf_counter() - t0:.0f}s", flush=True)
        model.save_pretrained(args.out, safe_serialization=True)
    model = StableDiffusionPipeline.from_pretrained(args.out, torch_dtype=torch.float32,
                                                    safety_checker=None,
                                                    requires_safety_checker=False)
    model.set_progress_bar_config(disable=True)
    options = args.attack_options or {"attacks": ["inversion", "conditioning", "prompt_search"],
                                      "budgets": [0.25, 0.5, 1.0], "search_words": 12,
                                      "control": False}
    print(json.dumps(evaluate(shipped, model, ctx.judge_model("shapes-clf"), args.concept,
                              AttackSpec(**options), args.per_prompt)), flush=True)


if __name__ == "__main__":
    main()
