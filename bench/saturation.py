"""How much effort each attack needs before more stops helping: its saturation curve.

    python -m bench.saturation [--model shapes-sd] [--concepts triangle] [--method default]
                               [--knobs inversion_steps conditioning_steps ...] [--out F]

An attack report reassures only if its attacks are as strong as a determined attacker's.
Here each attack's effort is raised one knob at a time over the service's defaults
(``app.jobspecs.AttackSpec``) — steps, learning rate, training images — on the base (the
control: does the attack work at all?) and on an edit trained as ``POST /erase`` would with
``--method`` (bench.attacks' methods), and the rate at each setting is printed: where the
curve is flat at the default, the default is enough. One JSON line per point to stdout, the
markdown table to ``--out`` (default: stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Knob -> (the attack it strengthens, the values tried; the default is among them).
KNOBS: dict[str, tuple[str, list[Any]]] = {
    "inversion_steps": ("inversion", [100, 300, 1000]),
    "inversion_lr": ("inversion", [1e-3, 5e-3, 2e-2]),
    "conditioning_steps": ("conditioning", [50, 150, 600]),
    "conditioning_lr": ("conditioning", [0.01, 0.05, 0.2]),
    "train_images": ("inversion", [8, 32, 128]),
}


def rates(attacker: Any, pipe: Any, attack: str, spec: Any) -> dict[str, float | None]:
    """``attack``'s rates on ``pipe`` under ``spec``: per token count or budget."""
    if attack == "inversion":
        return {f"{n} token(s)": attacker.inversion(pipe, n)[0] for n in spec.tokens}
    return {f"budget {b}": attacker.conditioning(pipe, b) for b in spec.budgets}


def run(model: str, concept: str, method: str, knobs: list[str], per_knob: Any = None
        ) -> list[dict[str, Any]]:
    from app.jobspecs import AttackSpec
    from bench.attacks import METHODS, erase_spec
    from worker.attacks import Attacker, Drawing, judged
    from worker.context import get_context
    from worker.defaults import ensure_default_models
    from worker.domains import get_domain
    from worker.jobs.erasure import esd_trainer
    from worker.variants import build_variant

    ctx = get_context()
    ensure_default_models(ctx.registry)
    spec = erase_spec(ctx.registry, ctx.settings, model, concept, METHODS[method], False)
    base, _ = ctx.cache.get(model)
    trainer = esd_trainer(ctx, spec, base)
    trainer.train()
    edited = build_variant(base, trainer.delta(), model).pipe
    domain = get_domain(spec.domain)
    verdict = judged(domain.judge(ctx.judge_model(spec.evaluator), spec.concept_kind), concept)
    drawing = Drawing(spec.draw_guidance, spec.draw_steps, spec.height, spec.width)
    points = []
    for knob in knobs:
        attack, values = KNOBS[knob]
        for value in values:
            # The strongest form of each (4 tokens, the whole budget): the curve that matters.
            cfg = AttackSpec(**{"tokens": [4], "budgets": [1.0], knob: value})
            attacker = Attacker(base, edited, concept,
                                domain.training_texts(concept, spec.concept_kind), verdict, cfg,
                                drawing)
            for who, pipe in (("base", base), (method, edited)):
                t0 = time.perf_counter()
                point = {"concept": concept, "knob": knob, "value": value, "model": who,
                         "rates": rates(attacker, pipe, attack, cfg),
                         "seconds": round(time.perf_counter() - t0, 1)}
                print(json.dumps(point), flush=True)
                points.append(point)
    return points


def table(points: list[dict[str, Any]]) -> list[str]:
    lines = ["| concept | knob | value | model | rates | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for p in points:
        shown = ", ".join(f"{k} {'–' if v is None else f'{v:.1%}'}"
                          for k, v in p["rates"].items())
        lines.append(f"| {p['concept']} | {p['knob']} | {p['value']} | {p['model']} | "
                     f"{shown} | {p['seconds']} |")
    return lines


def main() -> None:
    from bench.attacks import METHODS, emit

    parser = argparse.ArgumentParser(prog="python -m bench.saturation")
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--concepts", nargs="+", default=["triangle"])
    parser.add_argument("--method", choices=list(METHODS), default="default")
    parser.add_argument("--knobs", nargs="+", choices=list(KNOBS), default=list(KNOBS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if "LETHE_HOME" not in os.environ:
        os.environ["LETHE_HOME"] = tempfile.mkdtemp(prefix="lethe-bench-saturation-")
    points = []
    for concept in args.concepts:
        print(f"{time.strftime('%H:%M:%S')} bench.saturation: {concept}", file=sys.stderr,
              flush=True)
        points += run(args.model, concept, args.method, args.knobs)
    emit("\n".join(table(points)), args.out)


if __name__ == "__main__":
    main()
