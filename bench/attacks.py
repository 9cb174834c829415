"""Every erase method side by side, attacked: the table of bench/RESULTS.md and the model card.

    python -m bench.attacks [--model shapes-sd] [--concepts triangle red] [--out F]
                            [--methods default esd-x ...] [--attack-options JSON] [--smoke]
    python -m bench.attacks --reach [--model shapes-sd] [--concepts triangle red]
    python -m bench.attacks --train-only REPEATS [--methods ...]

Each method is resolved as ``POST /erase`` resolves it (the model's ``erase_defaults`` and
their ``by_method`` settings; "esd-x robust" is esd-x with ``"robust": true``) and trained
as an erase job trains it (``worker.jobs.erasure.esd_trainer``), one after the other in this
process. Then, per edit: the model's erasure report (the erased concept's accuracy on its
plain and its long prompts, its neighbours', FID on the prompts naming no erased concept),
the neighbours' same-seed drift against the base, and every attack of ``worker.attacks``
judged by the domain's judge, the base attacked once per concept as the control. The
markdown table goes to ``--out`` (default: stdout), one JSON line per edit to stdout.
``--smoke`` proves the path on tiny settings (numbers that mean nothing).

``--train-only`` trains each method and attacks nothing: its training time, the best of a few
runs one after the other in this process, as a ratio to the default's.

``--reach`` trains nothing: it says how far the conditioning attack's budgets reach in the
text encoder's output — each neighbour's and the empty prompt's encodings, and the domain's
prompts, as distances from the concept's own prompts in units of the attack's radius (a
budget of 1.0 is 1.0 here).
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

# Name -> the request's fields besides ``concepts``.
METHODS: dict[str, dict[str, Any]] = {
    "default": {},
    "default, robust off": {"robust": False},
    "esd-x": {"method": "esd-x"},
    "esd-x robust": {"method": "esd-x", "robust": True},
    "esd-u": {"method": "esd-u"},
    # The strongest against the attacks found for a shape (model card): twice esd-u's steps.
    "esd-u robust": {"method": "esd-u", "robust": True, "iterations": 400},
    # Steered to a neighbour's drawing (concept ablation) under the adversary: every weight
    # (the cleanest drawings that held triangle against every attack), and esd-x.
    "esd-all robust, neighbour anchor": {"method": "esd-all", "robust": True,
                                         "iterations": 400, "anchor": "neighbour"},
    "esd-x robust, neighbour anchor": {"method": "esd-x", "robust": True,
                                       "anchor": "neighbour"},
    # Distilled from the model retrained without the concept (``lethe train --without``):
    # θ learns that model's prediction for each trained prompt instead of ESD's target.
    "to the reference": {"anchor": "reference"},
    "to the reference, robust": {"anchor": "reference", "robust": True},
    "esd-u to the reference, robust": {"method": "esd-u", "anchor": "reference",
                                       "robust": True, "iterations": 400},
}
# The attacks' settings: the service's defaults but the smallest budget and half the
# searched words (the table's run time); the budget the acceptance bar names (1.0) stays.
ATTACK_OPTIONS: dict[str, Any] = {"budgets": [0.5, 1.0], "search_words": 12}
SMOKE_ATTACKS: dict[str, Any] = {
    "train_images": 2, "judge_images": 2, "batch": 2, "tokens": [1], "inversion_steps": 2,
    "budgets": [1.0], "conditioning_steps": 2, "relearn_steps": [1], "search_words": 2,
    "search_images": 1, "search_worst": 1}


def erase_spec(registry: Any, settings: Any, model: str, concept: str,
               fields: dict[str, Any], smoke: bool) -> Any:
    """The erase job ``POST /erase`` would queue for ``concept`` with ``fields``."""
    from app.params import resolve_erase
    from app.schemas import EraseCreate

    body = {"base_model": model, "concepts": [concept], **fields}
    if smoke:
        body["iterations"] = 2
    return resolve_erase(EraseCreate(**body), registry, settings)


def measure(ctx: Any, model: str, concept: str, name: str, fields: dict[str, Any],
            attack_options: dict[str, Any], control: bool, per_prompt: int,
            smoke: bool) -> dict[str, Any]:
    """Train one method on ``concept`` as a job would; its report, drift and attacks."""
    from app.jobspecs import AttackSpec
    from worker.attacks import Attacker, judge_name, judged
    from worker.attacks import Drawing as AttackDrawing
    from worker.domains import get_domain
    from worker.esd import full_delta
    from worker.evidence import Drawing
    from worker.jobs.erasure import esd_trainer
    from worker.reference import References
    from worker.variants import build_variant

    spec = erase_spec(ctx.registry, ctx.settings, model, concept, fields, smoke)
    base, _ = ctx.cache.get(model)
    clf = ctx.judge_model(spec.evaluator)
    domain = get_domain(spec.domain)
    t0 = time.perf_counter()
    trainer = esd_trainer(ctx, spec, base)
    trainer.train()
    seconds = time.perf_counter() - t0
    delta = trainer.delta()
    edited = build_variant(base, delta, model).pipe
    report = (domain.erasure_report(edited, clf, [concept], per_prompt, spec.draw_guidance)
              if spec.evaluator else None)
    drift = Drawing(base, domain, [concept], spec.draw_guidance, spec.draw_steps,
                    (spec.height, spec.width)).drift(edited) or {}
    judge = domain.judge(clf, spec.concept_kind)
    cfg = AttackSpec(**{**attack_options, "control": control,
                        "relearn_lr": spec.learning_rate})
    attacker = Attacker(base, edited, concept,
                        domain.training_texts(concept, spec.concept_kind), judged(judge, concept),
                        cfg, AttackDrawing(spec.draw_guidance, spec.draw_steps, spec.height,
                                           spec.width),
                        trained=sorted(full_delta(base.unet, delta)))
    # Beside the model retrained without the concept where the registry has one (its
    # rates kept on its manifest: measured once for every method).
    attacks = References.in_context(ctx, model).beside(attacker.run(), attacker, domain)
    settings = {k: getattr(spec, k) for k in (
        "method", "iterations", "learning_rate", "negative_guidance", "preserve_weight",
        "robust", "anchor")} | ({"target": spec.reference} if spec.reference else {})
    return {"concept": concept, "method": name, "settings": settings,
            "train_s": round(seconds, 1), "report": report,
            "neighbours": domain.neighbours(concept, [concept], spec.concept_kind),
            "drift": {"psnr": drift.get("psnr"), "ssim": drift.get("ssim")},
            "attacks": attacks | {"judge": judge_name(judge, concept)}}


def base_report(ctx: Any, model: str, concept: str, per_prompt: int) -> dict[str, Any] | None:
    """The base model's erasure report on ``concept``: the column edits are read against."""
    from worker.domains import get_domain

    manifest = ctx.registry.get(model)
    if not manifest.get("evaluator"):
        return None
    clf, _ = ctx.cache.get(manifest["evaluator"])
    return get_domain(manifest.get("domain")).erasure_report(
        ctx.cache.get(model)[0], clf, [concept], per_prompt,
        manifest["defaults"]["guidance_scale"])


def reference_report(ctx: Any, model: str, concept: str, per_prompt: int
                     ) -> dict[str, Any] | None:
    """The erasure report (where the model has an evaluator) and same-seed drift of
    ``model`` retrained without ``concept`` (``lethe train --without``), where the registry
    has it: the column the edits should match."""
    from worker.domains import get_domain
    from worker.evidence import Drawing
    found = ctx.registry.reference_for(model, concept)
    if found is None:
        return None
    manifest = ctx.registry.get(model)
    domain = get_domain(manifest.get("domain"))
    pipe, base = ctx.cache.get(found["id"])[0], ctx.cache.get(model)[0]
    d = manifest["defaults"]
    drift = Drawing(base, domain, [concept], d["guidance_scale"], d["steps"],
                    (d["height"], d["width"])).drift(pipe) or {}
    report = None
    if manifest.get("evaluator"):
        report = domain.erasure_report(pipe, ctx.cache.get(manifest["evaluator"])[0], [concept],
                                       per_prompt, d["guidance_scale"])
    return {"id": found["id"], "train_s": (found.get("training") or {}).get("seconds"),
            "report": report, "drift": {"psnr": drift.get("psnr"), "ssim": drift.get("ssim")}}


def pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.1f}%"


def num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def points(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:+.1f}"


def as_edit(report: dict[str, Any]) -> dict[str, Any]:
    """An attack report with its reference's rates in the edit's place (the reference's
    column reads as any edit's does)."""
    out = {"plain": {"edit": report["plain"]["reference"]}}
    for name in ("inversion", "conditioning", "image_inversion"):
        if name in report:
            out[name] = [r | {"edit": r["reference"]} for r in report[name]]
    if "relearning" in report and "reference" in report["relearning"]:
        out["relearning"] = {"edit": report["relearning"]["reference"]}
    if "prompt_search" in report:
        out["prompt_search"] = {"edit": report["prompt_search"]["reference"]}
    return out


def table(concept: str, base: dict | None, rows: list[dict[str, Any]],
          reference: dict | None = None) -> list[str]:
    """One concept's markdown table: a column per method, the base first and the model
    retrained without the concept next (where there is one), each method's gap to it."""
    control = rows[0]["attacks"]  # the first method's run attacked the base too

    def accuracy(report: dict | None, of: list[str]) -> float | None:
        if report is None:
            return None
        return sum(report["accuracy"][c] for c in of) / len(of)

    def kept(report: dict | None, key: str) -> float | None:
        return ((report or {}).get("kept_prompts") or {}).get(key)

    def attack(a: dict[str, Any], who: str) -> dict[str, str]:
        """The rates of ``who`` ("edit", or "base": the control) under each attack."""
        out = {"plain prompts (the attacks' drawing)": pct(a["plain"][who])}
        for run in a.get("inversion", []):
            out[f"inversion, {run['tokens']} token(s)"] = pct(run[who])
        for run in a.get("conditioning", []):
            out[f"conditioning, budget {run['budget']}"] = pct(run[who])
        for run in a.get("image_inversion", []):
            out[f"image inversion, {run['prompt']} prompt"] = pct(run[who])
        relearned = (a.get("relearning") or {}).get(who) if who != "base" else None
        for run in relearned or []:  # the base has nothing to relearn
            out[f"relearning, {run['steps']} steps"] = pct(run["rate"])
        if "prompt_search" in a:
            found = a["prompt_search"][who]
            if isinstance(found, dict):  # the edit's: which words did worst
                words = ", ".join(repr(w["words"]) for w in found["worst"][:1])
                out["prompt search, worst"] = f"{pct(found['rate'])} ({words})"
            else:
                out["prompt search, worst"] = pct(found)
        return out

    def gaps(a: dict[str, Any]) -> dict[str, str]:
        if not a.get("reference"):
            return {}
        half = (a.get("relearning") or {}).get("steps_to_half") or {}
        return {"**worst gap to the reference (points)**": points(a.get("worst_gap")),
                "relearning: steps to 50% (edit / reference)":
                    f"{half.get('edit') or '–'} / {half.get('reference') or '–'}"}

    neighbours = rows[0]["neighbours"]

    def drawn(r: dict[str, Any]) -> dict[str, str]:
        """How a trained model (a method's edit, the reference) draws without attack."""
        rep = r["report"]
        return {"training time (s)": num(r["train_s"], 0),
                "erased concept's accuracy": pct(accuracy(rep, [concept])),
                "… on its long prompts": pct(((rep or {}).get("accuracy_full_prompts") or {})
                                             .get(concept)),
                "neighbours' accuracy (mean)": pct(accuracy(rep, neighbours)),
                "neighbours' drift PSNR (dB) / SSIM": f"{num(r['drift']['psnr'], 1)} / "
                                                      f"{num(r['drift']['ssim'], 3)}",
                "FID on kept prompts (floor)": num(kept(rep, "fid"))}

    columns: list[tuple[str, dict[str, str]]] = [("base", {
        "training time (s)": "–",
        "erased concept's accuracy": pct(accuracy(base, [concept])),
        "… on its long prompts": pct(((base or {}).get("accuracy_full_prompts") or {})
                                     .get(concept)),
        "neighbours' accuracy (mean)": pct(accuracy(base, neighbours)),
        "neighbours' drift PSNR (dB) / SSIM": "–",
        "FID on kept prompts (floor)": f"{num(kept(base, 'fid'))} "
                                       f"({num(kept(base, 'fid_floor'))})",
    } | attack(control, "base"))]
    if reference is not None and control.get("reference"):
        columns.append((f"never saw it ({reference['id']})", drawn(reference)
                        | attack(as_edit(control), "edit")
                        | {"**worst inference-time attack**":
                           pct(control["reference"]["worst"])}))
    for r in rows:
        a = r["attacks"]
        columns.append((r["method"], drawn(r) | attack(a, "edit")
                        | {"**worst inference-time attack**": pct(a.get("worst"))} | gaps(a)))
    figures = list(dict.fromkeys(k for _, col in columns for k in col))
    lines = [f"| '{concept}' | " + " | ".join(name for name, _ in columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    lines += [f"| {f} | " + " | ".join(col.get(f, "–") for _, col in columns) + " |"
              for f in figures]
    settings = "; ".join(
        f"{r['method']}: " + ", ".join(f"{k} {v}" for k, v in r["settings"].items())
        for r in rows)
    return lines + ["", f"Settings ({concept}): {settings}. Judge: {control['judge']}.", ""]


def timings(model: str, concepts: list[str], methods: list[str], repeats: int) -> list[str]:
    """The ``--train-only`` table: each method's training time alone, one after the other in
    this process (the best of ``repeats``), and its ratio to the default's."""
    from worker.context import get_context
    from worker.defaults import ensure_default_models
    from worker.jobs.erasure import esd_trainer

    ctx = get_context()
    ensure_default_models(ctx.registry)
    base, _ = ctx.cache.get(model)
    lines = ["| concept | method | training (s), best of "
             f"{repeats} | × the default's |", "| --- | --- | --- | --- |"]
    for concept in concepts:
        seconds: dict[str, float] = {}
        for name in ["default", *(m for m in methods if m != "default")]:
            spec = erase_spec(ctx.registry, ctx.settings, model, concept, METHODS[name], False)
            if spec.reference:
                ctx.cache.get(spec.reference)  # loaded before the clock starts
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                esd_trainer(ctx, spec, base).train()
                best = min(best, time.perf_counter() - t0)
            seconds[name] = best
            lines.append(f"| {concept} | {name} | {best:.1f} | "
                         f"{best / seconds['default']:.2f} |")
    return lines


def run(model: str, concepts: list[str], methods: list[str], attack_options: dict[str, Any],
        per_prompt: int, smoke: bool, on_row: Any = None) -> list[str]:
    """The section: a table per concept."""
    from app.jobspecs import AttackSpec
    from worker.context import get_context
    from worker.defaults import ensure_default_models

    ctx = get_context()
    ensure_default_models(ctx.registry)
    spec = AttackSpec(**attack_options)
    lines = [f"## Every erase method side by side, attacked (`python -m bench.attacks`, "
             f"{model}, {per_prompt} images a prompt)", "",
             "Each method as `POST /erase` resolves and trains it (the model's erase "
             "defaults; job sampling), one after the other in one process; the attacks of "
             "`worker.attacks` (settings below), each learning only from the base's images "
             "of the concept, the base attacked once as the control. Rates are the judge's "
             f"share of {spec.judge_images} images showing the erased concept; relearning "
             "fine-tunes the "
             "edit's own parameters at its learning rate; drift is the neighbours' "
             "same-seed PSNR / SSIM against the base. Attack settings: "
             f"`{json.dumps(attack_options)}` over the service's defaults.", ""]
    for concept in concepts:
        rows = []
        for i, name in enumerate(methods):
            print(f"{time.strftime('%H:%M:%S')} bench.attacks: {concept}, {name}",
                  file=sys.stderr, flush=True)
            row = measure(ctx, model, concept, name, METHODS[name], attack_options,
                          control=i == 0, per_prompt=per_prompt, smoke=smoke)
            rows.append(row)
            if on_row:
                on_row(row)
        lines += table(concept, base_report(ctx, model, concept, per_prompt), rows,
                       reference_report(ctx, model, concept, per_prompt))
    return lines


def reach(model: str, concepts: list[str], budgets: list[float]) -> list[str]:
    """The ``--reach`` table: what lies within each budget of the concept's prompts."""
    import torch

    from worker.context import get_context
    from worker.defaults import ensure_default_models
    from worker.domains import get_domain
    from worker.esd import encode_prompts
    from worker.prompts import replace

    ctx = get_context()
    ensure_default_models(ctx.registry)
    pipe, _ = ctx.cache.get(model)
    domain = get_domain(ctx.registry.get(model).get("domain"))
    sets = list(dict.fromkeys(p for name in domain.info()["prompt_sets"]
                              for p in domain.prompt_set(name)))
    lines = [f"| {model}: distance / the attack's radius | " + " | ".join(
        ["radius", "each neighbour's prompts (mean)", "the empty prompt"]
        + [f"domain prompts within {b}" for b in budgets]) + " |",
        "| --- |" + " --- |" * (3 + len(budgets))]
    for concept in concepts:
        texts = domain.training_texts(concept)
        own = encode_prompts(pipe, texts).float().flatten(1)
        radius = float(own.norm(dim=1).mean())  # as the attack measures its budget

        # The domain's prompts: its prompt sets', else every neighbour's own prompts.
        known = sets or [p for n in domain.neighbours(concept, [concept])
                         for p in domain.training_texts(n)]

        def away(prompts: list[str], own: torch.Tensor = own, radius: float = radius
                 ) -> torch.Tensor:
            return torch.cdist(own, encode_prompts(pipe, prompts).float().flatten(1)) / radius

        near = []
        for n in domain.neighbours(concept, [concept]):
            pairs = [(i, m) for i, t in enumerate(texts)
                     if (m := replace(t, concept, n)) is not None]
            moved = encode_prompts(pipe, [m for _, m in pairs]).float().flatten(1)
            d = (own[[i for i, _ in pairs]] - moved).norm(dim=1) / radius
            near.append(f"{n} {float(d.mean()):.2f}")
        empty = float(away([""]).mean())
        apart = away(known)
        within = [f"{float((apart <= b).float().mean()):.0%}" for b in budgets]
        lines.append(f"| {concept} | {radius:.1f} | {', '.join(near)} | {empty:.2f} | "
                     + " | ".join(within) + " |")
    return lines + ["", "Domain prompts: " + (
        f"the {len(sets)} prompts of the domain's prompt sets" if sets
        else "each neighbour's own prompts") + ", in pairs with the concept's own prompts."]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.attacks")
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--concepts", nargs="+", default=["triangle", "red"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--attack-options", type=json.loads, default=None,
                        help="AttackSpec fields as JSON over the service's defaults")
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="tiny settings: the path only")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reach", action="store_true",
                        help="train nothing: how far the conditioning budgets reach")
    parser.add_argument("--train-only", type=int, metavar="REPEATS", default=0,
                        help="only time each method's training (the best of REPEATS runs)")
    args = parser.parse_args()
    if "LETHE_HOME" not in os.environ:  # a registry of its own, the demo models in it
        os.environ["LETHE_HOME"] = tempfile.mkdtemp(prefix="lethe-bench-attacks-")
    if args.reach:
        from app.jobspecs import AttackSpec

        print("\n".join(reach(args.model, args.concepts, AttackSpec().budgets)))
        return
    if args.train_only:
        emit("\n".join(timings(args.model, args.concepts, args.methods, args.train_only)),
             args.out)
        return
    options = args.attack_options if args.attack_options is not None else (
        SMOKE_ATTACKS if args.smoke else ATTACK_OPTIONS)
    lines = run(args.model, args.concepts, args.methods, options,
                1 if args.smoke else args.per_prompt, args.smoke,
                on_row=lambda row: print(json.dumps(row), flush=True))
    emit("\n".join(lines), args.out)


def emit(text: str, out: Path | None) -> None:
    """A bench's markdown: to ``out``, or to stdout."""
    if out:
        out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
