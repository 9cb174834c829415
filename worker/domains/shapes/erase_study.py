"""The experiments behind ``shapes-sd``'s erase defaults: one line of JSON per setting.

    python -m worker.domains.shapes.erase_study --concept triangle --method esd-x \
        --train-prompts varied plain --iterations 200 --lr 1e-3

Each run trains ESD on the registry's ``shapes-sd`` (as an erase job does, without the
queue) and measures the ESD paper's Table 2 protocol with ``shapes-clf``: accuracy on every
concept's "a {colour} {shape}" prompts, and on the erased concept's long rephrasings; and the
neighbour prompts' same-seed drift (PSNR, SSIM) as an erase job's evidence reports it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

from worker.context import get_context
from worker.defaults import ensure_default_models
from worker.domains import get_domain
from worker.domains.shapes.erasure import erasure_report
from worker.domains.shapes.render import SHAPES
from worker.esd import JOB_SAMPLING, ESDConfig, ESDTrainer
from worker.evidence import Drawing
from worker.prompts import training_prompts
from worker.variants import build_variant


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--concept", nargs="+", default=["triangle"])
    parser.add_argument("--method", nargs="+", default=["esd-x"])
    parser.add_argument("--train-prompts", nargs="+", default=["varied"])
    parser.add_argument("--iterations", type=int, nargs="+", default=[200])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--preserve", nargs="+", choices=["on", "off"], default=["on"],
                        help="hold the neighbouring concepts' prompts (see worker.prompts)")
    parser.add_argument("--preserve-weight", type=float, nargs="+", default=[1.0])
    parser.add_argument("--eta", type=float, nargs="+", default=[1.0],
                        help="negative guidance η of the ESD target")
    parser.add_argument("--lora-ranks", type=int, nargs="*", default=[],
                        help="also measure the edit exported as a LoRA of these ranks, "
                        "loaded onto a fresh base with diffusers' load_lora_weights")
    parser.add_argument("--preserve-trajectory", nargs="+", choices=["on", "off"],
                        default=["off"], help="hold neighbours at x_t from their own "
                        "trajectories (worker.esd.ESDConfig.preserve_trajectory)")
    parser.add_argument("--parameterization", nargs="+", choices=["full", "lora"],
                        default=["full"], help="train the weights, or a LoRA beside each "
                        "matrix (worker.esd.ESDConfig.parameterization)")
    parser.add_argument("--robust", nargs="+", choices=["on", "off"], default=["off"],
                        help="adversarial training (worker.esd.ESDConfig.robust)")
    parser.add_argument("--robust-budget", type=float, nargs="+", default=[1.0],
                        help="the adversary's bound (ESDConfig.robust_budget)")
    parser.add_argument("--robust-steps", type=int, nargs="+", default=[4],
                        help="the adversary's steps per search (ESDConfig.robust_steps)")
    parser.add_argument("--robust-shared", nargs="+", choices=["on", "off"], default=["off"],
                        help="one adversarial offset for all prompts (ESDConfig.robust_shared)")
    parser.add_argument("--stops", type=int, nargs="+",
                        default=[JOB_SAMPLING["stops_per_trajectory"]],
                        help="iterations per teacher trajectory "
                        "(ESDConfig.stops_per_trajectory; default: as an erase job)")
    parser.add_argument("--block", type=int, default=JOB_SAMPLING["block"],
                        help="iterations drawn together (ESDConfig.block; default: as a job)")
    parser.add_argument("--train-lora-rank", type=int, default=4,
                        help="the rank of the LoRA trained with --parameterization lora")
    parser.add_argument("--ddim-steps", type=int, default=30)
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--baseline", action="store_true", help="also report the base model")
    parser.add_argument("--attack", action="store_true",
                        help="also attack each edit (worker.attacks, its defaults) and print "
                        "the attack report on a line of its own")
    parser.add_argument("--attack-options", type=json.loads, default={},
                        help='AttackSpec fields as JSON, e.g. \'{"attacks": ["conditioning"]}\'')
    args = parser.parse_args()

    ctx = get_context()
    ensure_default_models(ctx.registry)
    manifest = ctx.registry.get(args.model)
    guidance = manifest["defaults"]["guidance_scale"]
    base, _ = ctx.cache.get(args.model)
    clf, _ = ctx.cache.get(manifest["evaluator"])
    concepts = list(args.concept)
    d = manifest["defaults"]
    drawing = Drawing(base, get_domain(manifest.get("domain")), concepts, guidance,
                      d["steps"], (d["height"], d["width"]))

    def summary(report: dict) -> dict:
        acc = report["accuracy"]
        others = [s for s in SHAPES if s not in concepts]
        return {"accuracy": {k: round(v, 3) for k, v in acc.items()},
                "full_prompts": {k: round(v, 3) for k, v in
                                 report["accuracy_full_prompts"].items()},
                "other_shapes_mean": round(sum(acc[s] for s in others) / len(others), 3)}

    if args.baseline:
        print(json.dumps({"run": "base", "guidance": guidance} | summary(
            erasure_report(base, clf, concepts, args.per_prompt, guidance))), flush=True)
    for (method, style, keep, iters, lr, weight, own, eta, param, robust, budget, steps,
         shared, stops) in itertools.product(
            args.method, args.train_prompts, args.preserve, args.iterations, args.lr,
            args.preserve_weight, args.preserve_trajectory, args.eta, args.parameterization,
            args.robust, args.robust_budget, args.robust_steps, args.robust_shared,
            args.stops):
        cfg = ESDConfig(concepts=tuple(concepts),
                        prompts=training_prompts(concepts, style, manifest.get("domain"),
                                                 preserve=keep == "on"),
                        method=method, iterations=iters, learning_rate=lr,
                        preserve_weight=weight, preserve_trajectory=own == "on",
                        negative_guidance=eta, parameterization=param,
                        lora_rank=args.train_lora_rank, robust=robust == "on",
                        robust_budget=budget, robust_steps=steps,
                        robust_shared=shared == "on", stops_per_trajectory=stops,
                        block=args.block,
                        ddim_steps=args.ddim_steps, height=32, width=32)
        t0 = time.perf_counter()
        trainer = ESDTrainer(base, cfg)
        trainer.train()
        train_s = time.perf_counter() - t0
        delta = trainer.delta()
        variant = build_variant(base, delta, args.model).pipe
        report = erasure_report(variant, clf, concepts, args.per_prompt, guidance)
        drift = drawing.drift(variant) or {}
        if args.attack:
            print(json.dumps({"attacks": attack_line(base, variant, clf, concepts, delta,
                                                     args.attack_options, guidance)}),
                  flush=True)
        for rank in args.lora_ranks:
            print(json.dumps(lora_line(ctx, args.model, base, delta, rank, clf,
                                       concepts, args.per_prompt, guidance, summary)),
                  flush=True)
        print(json.dumps({"run": {"method": method, "train_prompts": style,
                                  "preserve": keep, "preserve_weight": weight,
                                  "preserve_trajectory": own, "eta": eta,
                                  "iterations": iters, "lr": lr,
                                  "ddim_steps": args.ddim_steps, "parameterization": param,
                                  "robust": robust, "stops_per_trajectory": stops,
                                  "block": args.block}
                          | ({"robust_budget": budget, "robust_steps": steps,
                              "robust_shared": shared}
                             if robust == "on" else {})
                          | ({"lora_rank": args.train_lora_rank} if param == "lora" else {}),
                          "train_s": round(train_s, 1),
                          "trained_parameters": sum(p.numel() for p in trainer.params.values()),
                          "delta_fp16_bytes": sum(t.numel() * 2 for t in delta.values()),
                          "drift": {"psnr": drift.get("psnr"), "ssim": drift.get("ssim")}}
                         | summary(report)), flush=True)


def attack_line(base, variant, clf, concepts: list[str], delta: dict, options: dict,
                guidance: float) -> list[dict]:
    """Every attack on the edit, with the base as the control, per erased concept."""
    from app.jobspecs import AttackSpec
    from worker.attacks import Attacker, Drawing, judge_name, judged

    judge = get_domain("shapes").judge(clf)
    def stage(name: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} attack: {name}", file=sys.stderr, flush=True)

    return [Attacker(base, variant, c, get_domain("shapes").training_texts(c),
                     judged(judge, c), AttackSpec(**options), Drawing(guidance=guidance),
                     trained=sorted(delta), on_progress=stage).run()
            | {"judge": judge_name(judge, c)} for c in concepts]


def lora_line(ctx, model: str, base, delta: dict, rank: int, clf, concepts: list[str],
              per_prompt: int, guidance: float, summary) -> dict:
    """The edit as a rank-``rank`` LoRA on a freshly loaded base, measured the same way."""
    from worker.lora import lora_of_edit
    from worker.pipelines import load_pipeline

    export = lora_of_edit(base.unet, delta, rank=rank)
    fresh = load_pipeline(ctx.registry.path(model), ctx.runtime)
    fresh.load_lora_weights(export.state_dict)
    fresh.fuse_lora()
    fresh.unload_lora_weights()
    size = sum(t.numel() * 2 for t in export.state_dict.values())  # as fp16
    return {"lora_rank": rank, "matrices": len(export.ranks),
            "kept_energy_min": round(min(export.kept_energy.values()), 4),
            "left_out": export.left_out, "fp16_bytes": size,
            "delta_fp16_bytes": sum(t.numel() * 2 for t in delta.values())} | summary(
        erasure_report(fresh, clf, concepts, per_prompt, guidance))


if __name__ == "__main__":
    main()
