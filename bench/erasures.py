"""Erasures through the service, with the model's defaults, as a user would run them.

    python -m bench.erasures [--concepts triangle red circle] [--out DIR]
                             [--parameterization lora] [--skip-adherence]

Starts the whole stack (embedded Redis, one worker, the API) on a fresh data folder, asks
``POST /evaluate`` for the base model's prompt adherence, then ``POST /erase`` for each
concept with nothing but ``concepts`` set, and prints one JSON line per job: every
concept's accuracy after the edit, the neighbour prompts' same-seed drift during training
and at the end, and where the comparison grid was saved (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    from app.client import LetheClient
    from bench.stack import Stack

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--concepts", nargs="+", default=["triangle", "red", "circle"])
    parser.add_argument("--out", default=None, help="folder for the comparison grids")
    parser.add_argument("--parameterization", choices=["full", "lora"], default=None,
                        help="train the weights (the default) or a LoRA of them")
    parser.add_argument("--skip-adherence", action="store_true",
                        help="skip the base model's POST /evaluate")
    args = parser.parse_args()
    extra = {"parameterization": args.parameterization} if args.parameterization else {}
    out = Path(args.out) if args.out else None
    with Stack() as stack, LetheClient(stack.url, timeout_s=60) as lethe:
        if not args.skip_adherence:
            t0 = time.monotonic()
            job = lethe.wait(lethe.evaluate(model=args.model), timeout_s=3600)
            assert job.status == "succeeded", job
            metrics = job.result["report"]["metrics"]
            print(json.dumps({"model": args.model, "adherence": metrics.get("accuracy"),
                              "attribute_score": metrics.get("attribute_score"),
                              "seconds": round(time.monotonic() - t0, 1)}), flush=True)
        for concept in args.concepts:
            t0 = time.monotonic()
            job = lethe.wait(lethe.erase(base_model=args.model, concepts=[concept], **extra),
                             timeout_s=7200)
            assert job.status == "succeeded", job
            model = lethe.model(job.result["model"]).model_dump()
            erasure = (model.get("metrics") or {}).get("erasure") or {}
            after = (erasure.get("after") or {}).get("accuracy")
            line = {"concept": concept, "model": model["id"],
                    "method": model["edit"]["method"],
                    "parameterization": model["edit"].get("parameterization", "full"),
                    "iterations": model["edit"]["iterations"],
                    "learning_rate": model["edit"]["learning_rate"],
                    "accuracy_after": after,
                    "full_prompts_after": (erasure.get("after") or {}).get(
                        "accuracy_full_prompts"),
                    "drift": model["training"]["drift"],
                    "seconds": round(time.monotonic() - t0, 1)}
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                grid = out / f"{model['id']}-grid.png"
                grid.write_bytes(lethe.image(job, 0))
                line["grid"] = str(grid)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
