"""Where an ESD iteration's time goes, measured with PyTorch's own hooks.

    python -m bench.esd_profile [--model shapes-sd] [--concept triangle] [--iterations 96]

The trainer runs as an erase job runs it (the model's erase defaults, varied prompts with
preservation), once per ``stops_per_trajectory`` setting. Forward hooks on the frozen UNet
time every teacher call: the calls of a block before its last batched one walk the guided
trajectories, the rest are the teacher's predictions for the targets. Forward hooks on the
student's UNet time its forward pass, optimizer step hooks the Adam step; the student's
backward is the rest of ``step()`` less those, and bookkeeping whatever the phases leave of
the total.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import replace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Clock:
    """Seconds between a module's forward pre-hook and its forward hook, per call."""

    def __init__(self, module: Any):
        self.calls: list[float] = []
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, *_: Any) -> None:
        self._t = time.perf_counter()

    def _stop(self, *_: Any) -> None:
        self.calls.append(time.perf_counter() - self._t)


def profile(base: Any, cfg: Any) -> dict[str, float]:
    """Seconds per iteration in each phase, for ``cfg.iterations`` iterations."""
    from worker.esd import ESDTrainer

    trainer = ESDTrainer(base, cfg)
    teacher, student = Clock(trainer.frozen), Clock(trainer.unet)
    opt: list[float] = []
    trainer.optimizer.register_step_pre_hook(lambda *_: opt.append(-time.perf_counter()))
    trainer.optimizer.register_step_post_hook(lambda *_: opt.append(opt.pop()
                                                                     + time.perf_counter()))
    out = dict.fromkeys(("trajectories", "teacher predictions", "student forward",
                         "student backward", "optimizer", "bookkeeping"), 0.0)
    rows = 4 if any(p.preserve for p in trainer.prompts) else 3
    teacher_calls = math.ceil(cfg.block * rows / cfg.max_rows)
    t_all = time.perf_counter()
    for block in range(cfg.iterations // cfg.block):
        teacher.calls.clear()
        trainer._block = (block, trainer._draw_block(block))
        out["trajectories"] += sum(teacher.calls[:-teacher_calls])
        out["teacher predictions"] += sum(teacher.calls[-teacher_calls:])
        for _ in range(cfg.block):
            student.calls.clear()
            opt.clear()
            t0 = time.perf_counter()
            trainer.step()
            spent = time.perf_counter() - t0
            out["student forward"] += sum(student.calls)
            out["optimizer"] += sum(opt)
            out["student backward"] += spent - sum(student.calls) - sum(opt)
    total = time.perf_counter() - t_all
    out["bookkeeping"] = total - sum(out.values())
    n = cfg.iterations // cfg.block * cfg.block
    return {k: v / n for k, v in out.items()} | {"total": total / n}


def run(model: str, concept: str, iterations: int, shared: tuple[int, ...] = (1, 4),
        blocks: tuple[int, ...] = (8,), max_rows: int | None = None) -> dict:
    from bench.esd_speed import setup

    base, _, _, cfg = setup(model, concept, iterations, method=None)  # the job's default
    rows = {"max_rows": max_rows} if max_rows else {}
    return {"model": model, "concept": concept, "method": cfg.method,
            "iterations": iterations, "ddim_steps": cfg.ddim_steps,
            "max_rows": max_rows or cfg.max_rows,
            "per_iteration_s": {
                f"block {b}, {k} stops a trajectory": profile(
                    base, replace(cfg, block=b, stops_per_trajectory=k, **rows))
                for b in blocks for k in shared}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--concept", default="triangle")
    parser.add_argument("--iterations", type=int, default=96)
    parser.add_argument("--stops", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--blocks", type=int, nargs="+", default=[8])
    parser.add_argument("--max-rows", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(run(args.model, args.concept, args.iterations, tuple(args.stops),
                         tuple(args.blocks), args.max_rows), indent=2))


if __name__ == "__main__":
    main()
