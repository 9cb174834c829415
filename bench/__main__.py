"""The benchmark suite: every figure of bench/RESULTS.md, measured in one run.

    python -m bench                  # the full suite on shapes-sd; writes bench/RESULTS.md
    python -m bench --smoke --out /tmp/r.md   # tiny sizes on tiny-sd: proves the suite runs
    python -m bench --only service variant    # a subset

Each figure is a ratio of two things measured side by side in this run, with its median
and spread; absolute times on a shared machine are reported but not judged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUITE = ("service", "variant", "esd", "esd-memory", "batching", "load", "previews", "waiters")


def ms(xs: list[float]) -> str:
    """median (min–max, n) in milliseconds."""
    return (f"{statistics.median(xs) * 1000:.1f} ms ({min(xs) * 1000:.1f}–"
            f"{max(xs) * 1000:.1f}, n={len(xs)})")


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def service_section(smoke: bool, model: str) -> list[str]:
    from bench.service import run

    r = run(model, steps=4 if smoke else 20, repeats=2 if smoke else 7)
    d, c = statistics.median(r["direct"]), statistics.median(r["cached"])
    overhead = c / d - 1
    cold = r["cold"][0]
    return [
        f"## Service end to end against a direct pipeline call ({r['model']}, "
        f"{r['size']}×{r['size']}, {r['steps']} DDIM steps, {r['device']}, {r['dtype']})",
        "",
        "| figure | value |", "| --- | --- |",
        f"| direct pipeline call, this process | {ms(r['direct'])} |",
        f"| HTTP → Redis → worker → PNG, model cached | {ms(r['cached'])} |",
        f"| … of which inside the worker's pipeline call | {ms(r['inside'])} |",
        f"| **service overhead** (target ≤ 10%) | {(c - d) * 1000:+.1f} ms "
        f"({overhead * 100:+.1f}%): {verdict(overhead <= 0.10)} |",
        f"| first request to the model (cold load in the worker) | {cold * 1000:.1f} ms |",
        f"| load alone (`from_pretrained`) | {ms(r['load'])} |",
        f"| **cold / cached** | {cold / c:.2f}× |",
        "",
    ]


def variant_section(smoke: bool, model: str) -> list[str]:
    from bench.variant import run

    r = run(model, repeats=2 if smoke else 7)
    ratio = statistics.median(r["variant"]) / statistics.median(r["cold"])
    mem = r["added_bytes"] / r["delta_bytes"]
    return [
        f"## An edited variant served from its cached base ({r['model']}, {r['device']})",
        "",
        "| figure | value |", "| --- | --- |",
        f"| cold load of the base | {ms(r['cold'])} |",
        f"| variant's first request, base cached | {ms(r['variant'])} |",
        f"| **variant / cold** (target ≤ 0.10) | {ratio:.3f}: {verdict(ratio <= 0.10)} |",
        f"| delta | {r['delta_bytes'] / 1e6:.2f} MB in {r['delta_tensors']} tensors |",
        f"| **memory the variant adds / its delta** (target ≤ 1.2×) | {mem:.2f}×: "
        f"{verdict(mem <= 1.2)} |",
        "",
    ]


def esd_section(smoke: bool, model: str) -> list[str]:
    from bench.esd_speed import run

    r = run(model, "triangle" if not smoke else "red", 8 if smoke else 600,
            1 if smoke else 8)
    ref, ours, shared = r["reference"], r["lethe"], r["lethe_shared"]
    k, b = shared["stops_per_trajectory"], shared["block"]

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{x * 100:.1f}%"

    def row(name: str, key: str, show: Callable[[Any], str] = str) -> str:
        return f"| {name} | " + " | ".join(show(run_[key]) for run_ in (ref, ours, shared)) + " |"

    lines = [
        f"## ESD against a plain reference loop ({r['model']}, erase "
        f"'{r['concept']}', esd-x, {r['iterations']} iterations each)",
        "",
        "The reference (`bench/esd_speed.py`) is the paper's loop written plainly: a fresh "
        "guided DDIM trajectory per iteration, one UNet call per prediction. Lethe's trainer "
        f"draws {ours['block']} iterations' trajectories side by side and batches the "
        f"teacher's predictions; the third run is an erase job's sampling: {b} iterations "
        f"a block and {k} iterations from each trajectory, each at its own random stop "
        "(`worker.esd.JOB_SAMPLING`). Same model, "
        "prompts, hyper-parameters and objective. Neighbours: the other concepts of the "
        "erased one's kind; drift: their same-seed PSNR / SSIM against the base.",
        "",
        f"| figure | reference | Lethe, a trajectory an iteration | Lethe as a job runs "
        f"(block {b}, {k} stops a trajectory) |",
        "| --- | --- | --- | --- |",
        row("training time (s)", "seconds"),
        row("iterations per second", "it_per_s"),
        row("erased concept's accuracy after", "accuracy_after", pct),
        row("neighbours' accuracy after", "neighbours", pct),
        row("neighbours' drift PSNR (dB)", "drift_psnr"),
        row("neighbours' drift SSIM", "drift_ssim"),
        "",
        f"**Speed-up {r['speedup']}×** (target ≥ 2×): {verdict(r['speedup'] >= 2)}; "
        f"**as a job runs {r['speedup_shared']}×** (target ≥ 5×): "
        f"{verdict(r['speedup_shared'] >= 5)}.",
        "",
    ]
    return lines


def esd_memory_section(smoke: bool, model: str) -> list[str]:
    import torch

    from bench.esd_memory import run, table

    if smoke:  # the path only: a tenth-width UNet in float32
        r = run("small", "cpu", "float32", 64, 2, 2, ("esd-x",), 2)
    elif torch.cuda.is_available():
        r = run("sd15", "cuda", "float16", 512, 50, 50, ("esd-x", "esd-u"), 30)
    else:  # half precision on the CPU is bfloat16; SD 1.5's UNet is slow there
        r = run("sd15", "cpu", "bfloat16", 128, 8, 2, ("esd-x", "esd-u"), 10)
    return [
        f"## ESD's memory on a UNet of Stable Diffusion 1.5's configuration ({r['scale']}, "
        f"random weights; {r['device']}, {r['dtype_name']}, {r['size']}² images, "
        f"{r['iterations']} iterations, trajectories of {r['ddim_steps']} DDIM steps)",
        "",
        "`bench/esd_memory.py`, each row in a process of its own. The student shares every "
        "tensor it does not train with the teacher; what it trains is a float32 copy, run "
        "under autocast beside the half-precision rest. The erase's addition is the peak "
        "less the loaded model: activations, gradients, Adam's state, the teacher's batches.",
        "",
        *table(r), "",
    ]


def batching_section(smoke: bool, model: str) -> list[str]:
    from bench.batching import run

    r = run(model, clients=8, rounds=2 if smoke else 6, steps=4 if smoke else 20)
    gain = r["batched"]["images_per_s"] / r["single"]["images_per_s"]
    return [
        f"## Micro-batching ({r['model']}, {r['clients']} concurrent clients, "
        f"{r['steps']} DDIM steps)",
        "",
        "| figure | one at a time | batched (up to "
        f"{r['batched']['max_batch']}) |", "| --- | --- | --- |",
        f"| images per second | {r['single']['images_per_s']:.2f} | "
        f"{r['batched']['images_per_s']:.2f} |",
        f"| request latency | {ms(r['single']['latency_s'])} | "
        f"{ms(r['batched']['latency_s'])} |",
        f"| jobs run in a batch of more than one | – | {r['batched']['batched_jobs']} of "
        f"{r['batched']['jobs']} |",
        f"| every client got its own seed's image | {r['single']['own_images']} | "
        f"{r['batched']['own_images']} |",
        "",
        f"**Gain {gain:.2f}×** (target ≥ 1.5×): {verdict(gain >= 1.5)}.", "",
    ]


def load_section(smoke: bool, model: str) -> list[str]:
    from bench.load import run

    r = run(model, requests=12 if smoke else 300, clients=4 if smoke else 16,
            steps=4 if smoke else 20)
    trace = r["queue_depth"][::max(1, len(r["queue_depth"]) // 12)]
    lost = r["outcomes"].get("lost", 0)
    return [
        f"## Load ({r['model']}, {r['requests']} generate requests from {r['clients']} "
        f"concurrent clients, {r['steps']} DDIM steps)",
        "",
        "| figure | value |", "| --- | --- |",
        f"| throughput | {r['throughput_per_s']:.2f} jobs/s over {r['wall_s']:.1f} s |",
        f"| latency p50 / p95 | {r['p50_s'] * 1000:.0f} ms / {r['p95_s'] * 1000:.0f} ms |",
        f"| outcomes | {r['outcomes']} |",
        f"| **failed or lost jobs** (target 0) | {r['failed']} ({lost} lost): "
        f"{verdict(r['failed'] == 0)} |",
        f"| queue depth, max | {r['max_queue_depth']} |",
        f"| queue depth over time (s: depth) | "
        f"{', '.join(f'{t}: {d}' for t, d in trace)} |",
        "",
    ]


def previews_section(smoke: bool, model: str) -> list[str]:
    from bench.previews import run

    r = run(model, steps=30, every=5, repeats=2 if smoke else 9)
    return [
        f"## Live previews ({r['model']}, {r['size']}×{r['size']}, {r['steps']} DDIM steps, "
        f"a preview every {r['every']})",
        "",
        "| figure | value |", "| --- | --- |",
        f"| without previews | {ms(r['plain_s'])} |",
        f"| with previews ({r['previews_per_run']} a run, PNGs of "
        f"{r['preview_png_bytes']:.0f} B) | {ms(r['previews_s'])} |",
        f"| **added time** (target ≤ 10%) | {r['added'] * 100:+.1f}%: "
        f"{verdict(r['added'] <= 0.10)} |",
        "",
    ]


def waiters_section(smoke: bool, model: str) -> list[str]:
    from bench.waiters import run

    r = run(model, clients=8 if smoke else 48, seconds=3 if smoke else 20)
    worst = max(max(r["healthz_s"]), max(r["models_s"]))
    return [
        f"## {r['clients']} clients waiting on a running job ({r['long_polls']} long polls, "
        f"{r['event_streams']} event streams, {r['model']})",
        "",
        "| figure | value |", "| --- | --- |",
        f"| `/healthz` meanwhile | {ms(r['healthz_s'])} |",
        f"| `/models` meanwhile | {ms(r['models_s'])} |",
        f"| **slowest answer** (target ≤ 1 s) | {worst * 1000:.0f} ms: {verdict(worst <= 1)} |",
        f"| Redis commands/s, the job alone / with the clients waiting | "
        f"{r['commands_per_s_alone']} / {r['commands_per_s_waiting']} |",
        f"| **Redis commands/s per waiting client** (target ≤ 5) | {r['per_client_per_s']}: "
        f"{verdict(r['per_client_per_s'] <= 5)} |",
        "",
    ]


SECTIONS: dict[str, Callable[[bool, str], list[str]]] = {
    "service": service_section, "variant": variant_section, "esd": esd_section,
    "esd-memory": esd_memory_section,
    "batching": batching_section, "load": load_section, "previews": previews_section,
    "waiters": waiters_section,
}


def header(smoke: bool) -> list[str]:
    import diffusers
    import torch
    import transformers

    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    return [
        "# Benchmark results" + (" (smoke run: tiny sizes, not figures)" if smoke else ""),
        "",
        f"Written by `python -m bench` on {dt.date.today().isoformat()}. Device: {device}; "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, transformers {transformers.__version__}. Times are "
        "medians with (min–max, n); each target is a ratio of two things measured side by "
        "side in this run. Earlier measurements (GPU runs among them): EARLIER.md.",
        "",
    ]


def kept_sections(path: Path) -> list[str]:
    """The sections of ``path`` that other commands wrote (a heading naming
    ``python -m bench.<command>``, e.g. bench.storage, bench.attacks): the suite does not
    measure them, so rewriting the file keeps them, after its own."""
    if not path.exists():
        return []
    kept: list[str] = []
    keep = False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            keep = "`python -m bench." in line
        elif line.startswith("# "):
            keep = False
        if keep:
            kept.append(line)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on tiny-sd")
    parser.add_argument("--only", nargs="+", choices=SUITE, default=list(SUITE))
    parser.add_argument("--model", default=None, help="default: shapes-sd (smoke: tiny-sd)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = parser.parse_args()
    model = args.model or ("tiny-sd" if args.smoke else "shapes-sd")
    lines, others = header(args.smoke), kept_sections(args.out)
    for name in args.only:
        print(f"bench: {name} …", file=sys.stderr, flush=True)
        lines += SECTIONS[name](args.smoke, model)
        # What is measured so far survives a crash.
        args.out.write_text("\n".join(lines + ([""] if others else []) + others) + "\n")
    print(f"bench: wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
