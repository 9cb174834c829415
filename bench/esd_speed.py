"""ESD iterations per second: Lethe's trainer against a plain loop written from the paper.

    python -m bench.esd_speed [--model shapes-sd] [--concept triangle] [--iterations 600]

Both train the same objective on the same model, prompts (``worker.prompts``, the job's
defaults) and hyper-parameters from the same frozen UNet. The reference does what the
paper's code does, one step at a time: a fresh guided DDIM trajectory per iteration with
one UNet call per prediction (unconditional and conditional apart), then one call for
each of ε₀, ε_c, ε_f (and the preserved prompt's), then the student's forward and backward.
Lethe draws a block of iterations' trajectories side by side and batches the teacher's
predictions (``worker.esd``): once with one trajectory an iteration, once as an erase job
samples (``worker.esd.JOB_SAMPLING``: larger blocks, several stops from each trajectory).
Erasure is then measured the same way for all three: the classifier's accuracy on every
"a {colour} triangle" prompt, 8 images each, the neighbours' accuracy and their same-seed
drift from the base.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import replace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def reference_train(pipe: Any, cfg: Any) -> tuple[dict, float]:
    """The paper's loop, written plainly. Returns the trained parameters and seconds."""
    import torch
    from diffusers import DDIMScheduler
    from torch import nn

    from worker.esd import encode_prompts, esd_target, select_parameters

    t0 = time.perf_counter()
    frozen = pipe.unet
    unet = copy.deepcopy(frozen).float().train()
    unet.requires_grad_(False)
    params = select_parameters(unet, cfg.method)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=cfg.learning_rate)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(cfg.ddim_steps)
    g = torch.Generator().manual_seed(cfg.seed)
    texts = {t for p in cfg.prompts for t in (p.concept, p.prompt, p.anchor, p.preserve or "")}
    emb = dict(zip(texts, encode_prompts(pipe, list(texts))[:, None], strict=True))
    f = pipe.vae_scale_factor
    shape = (1, frozen.config.in_channels, cfg.height // f, cfg.width // f)

    def eps(net: Any, x: Any, t: Any, text: str) -> Any:
        return net(x, t, encoder_hidden_states=emb[text]).sample

    for i in range(cfg.iterations):
        p = cfg.prompts[i % len(cfg.prompts)]
        stop = int(torch.randint(0, cfg.ddim_steps, (1,), generator=g))
        x = torch.randn(shape, generator=g) * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps[:stop]:
                e_u, e_c = eps(frozen, x, t, ""), eps(frozen, x, t, p.prompt)
                x = sched.step(e_u + cfg.start_guidance * (e_c - e_u), t, x).prev_sample
            t = sched.timesteps[stop]
            target = esd_target(eps(frozen, x, t, p.anchor), eps(frozen, x, t, p.concept),
                                eps(frozen, x, t, p.prompt), cfg.negative_guidance)
            kept = eps(frozen, x, t, p.preserve) if p.preserve else None
        loss = nn.functional.mse_loss(eps(unet, x, t, p.prompt), target)
        if kept is not None:
            loss = loss + nn.functional.mse_loss(eps(unet, x, t, p.preserve), kept)
        opt.zero_grad()
        loss.backward()
        opt.step()
    delta = {k: v.detach().clone() for k, v in params.items()}
    return delta, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--concept", default="triangle")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--per-prompt", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(run(args.model, args.concept, args.iterations, args.per_prompt),
                     indent=2))


def setup(model: str, concept: str, iterations: int, method: str | None = "esd-x"
          ) -> tuple[Any, Any, dict, Any]:
    """A fresh registry's ``model`` (the shipped models, in a temporary LETHE_HOME), its
    classifier if it names one, its manifest, and the ESD config an erase job of
    ``concept`` would train with (its erase defaults, varied prompts, preservation on the
    shapes family); ``method`` None: the model's default method."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from app.config import Settings
    from worker.context import WorkerContext
    from worker.defaults import ensure_default_models
    from worker.esd import ESDConfig
    from worker.prompts import training_prompts

    home = Path(tempfile.mkdtemp(prefix="lethe-bench-"))
    atexit.register(shutil.rmtree, home, True)
    ctx = WorkerContext.from_settings(Settings(home=home))
    ensure_default_models(ctx.registry)
    manifest = ctx.registry.get(model)
    d = manifest.get("erase_defaults") or {}
    gen = manifest.get("defaults") or {}
    base, _ = ctx.cache.get(model)
    clf = ctx.cache.get(manifest["evaluator"])[0] if manifest.get("evaluator") else None
    cfg = ESDConfig(concepts=(concept,), method=method or d.get("method", "esd-x"),
                    iterations=iterations,
                    learning_rate=d.get("learning_rate", 1e-5),
                    ddim_steps=d.get("ddim_steps", 50),
                    start_guidance=d.get("start_guidance", 3.0),
                    prompts=training_prompts([concept], "varied", manifest.get("domain"),
                                             preserve=manifest.get("domain") == "shapes"),
                    height=gen.get("height", 32), width=gen.get("width", 32))
    return base, clf, manifest, cfg


def run(model: str, concept: str, iterations: int, per_prompt: int) -> dict:
    from worker.domains import get_domain
    from worker.domains.shapes.erasure import erasure_report
    from worker.esd import JOB_SAMPLING, ESDTrainer
    from worker.evidence import Drawing
    from worker.variants import build_variant

    base, clf, manifest, cfg = setup(model, concept, iterations)
    gen = manifest.get("defaults") or {}
    domain = get_domain(manifest.get("domain"))
    drawing = Drawing(base, domain, [concept], gen.get("guidance_scale", 7.5),
                      gen.get("steps", 30), (gen.get("height", 32), gen.get("width", 32)))
    near = domain.neighbours(concept, [concept])

    def measured(delta: dict, seconds: float) -> dict:
        """Speed, and what the edit did: the erased concept's accuracy, its neighbours'
        (the other concepts of its kind), and their same-seed drift from the base."""
        variant = build_variant(base, delta, model).pipe
        out = {"seconds": round(seconds, 1), "it_per_s": round(iterations / seconds, 2),
               "accuracy_after": None, "neighbours": None}
        if clf is not None:  # a model without a classifier (tiny-sd in the smoke run)
            acc = erasure_report(variant, clf, [concept], per_prompt, gen["guidance_scale"],
                                 include_full=False)["accuracy"]
            out["accuracy_after"] = acc[concept]
            out["neighbours"] = (round(sum(acc[c] for c in near) / len(near), 4)
                                 if near else None)
        drift = drawing.drift(variant) or {}
        return out | {"drift_psnr": drift.get("psnr"), "drift_ssim": drift.get("ssim")}

    ref_delta, ref_s = reference_train(base, cfg)
    runs = {"reference": measured(ref_delta, ref_s)}
    # Lethe with one trajectory an iteration (the paper's sampling), then as a job runs it.
    for name, sampling in (("lethe", {"block": 8, "stops_per_trajectory": 1}),
                           ("lethe_shared", JOB_SAMPLING)):
        t0 = time.perf_counter()
        trainer = ESDTrainer(base, replace(cfg, **sampling))
        trainer.train()
        runs[name] = measured(trainer.delta(), time.perf_counter() - t0) | sampling
    return {"model": model, "concept": concept, "iterations": iterations, **runs,
            "speedup": round(ref_s / runs["lethe"]["seconds"], 2),
            "speedup_shared": round(ref_s / runs["lethe_shared"]["seconds"], 2)}


if __name__ == "__main__":
    main()
