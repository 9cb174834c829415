"""What live previews cost a generate: the same call with and without them, alternated.

    python -m bench.previews [--model shapes-sd] [--steps 30] [--every 5] [--repeats 7]

In this process, on the model's own pipeline: a preview every ``every`` steps decodes the
scheduler's x̂₀ (``worker.previews``) and encodes it as a PNG data URL, as the job does
before it appends the event to Redis (one XADD, not timed here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(model: str = "shapes-sd", steps: int = 30, every: int = 5, repeats: int = 7) -> dict:
    import tempfile

    import torch

    from app.registry import Registry
    from worker.defaults import ensure_default_models
    from worker.pipelines import Runtime, load_pipeline, rebuild, with_scheduler
    from worker.previews import Previewer, previewing

    with tempfile.TemporaryDirectory() as home:
        registry = Registry(home)
        ensure_default_models(registry)
        manifest = registry.get(model)
        side = (manifest.get("defaults") or {}).get("width", 512)
        base = load_pipeline(registry.path(model), Runtime.resolve())
    sent: list[int] = []

    def once(with_previews: bool) -> float:
        pipe = with_scheduler(base, "ddim")
        callback = lambda p, s, t, kw: kw  # noqa: E731  (what the job's reporter costs aside)
        if with_previews:
            pipe = rebuild(pipe, scheduler=previewing(pipe.scheduler))
            previewer = Previewer(pipe, every, steps, lambda s, t, image: sent.append(len(image)))
            callback = previewer.wrap(callback)
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe("a red circle", num_inference_steps=steps, height=side, width=side,
                 generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=callback)
        return time.perf_counter() - t0

    once(True), once(False)  # warm-up
    plain, previewed = [], []
    for i in range(repeats):  # each goes first half the time
        for with_previews in ((False, True) if i % 2 == 0 else (True, False)):
            (previewed if with_previews else plain).append(once(with_previews))
    added = statistics.median(previewed) / statistics.median(plain) - 1
    return {"model": model, "size": side, "steps": steps, "every": every,
            "plain_s": plain, "previews_s": previewed, "added": added,
            "previews_per_run": (steps - 1) // every,
            "preview_png_bytes": statistics.median(sent) if sent else 0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    r = run(args.model, args.steps, args.every, args.repeats)
    print(json.dumps({k: v for k, v in r.items() if not k.endswith("_s")}
                     | {"plain_median_s": statistics.median(r["plain_s"]),
                        "previews_median_s": statistics.median(r["previews_s"])}))


if __name__ == "__main__":
    main()
