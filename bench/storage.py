"""What the registry on object storage costs: loading a model cold from S3, warm from the
host's cache, and a whole erase, each beside the same thing on a local folder.

    python -m bench.storage [--model shapes-sd] [--repeats 5] [--iterations 50] [--out F]

A real S3-compatible server (SeaweedFS, ``app.testing.SeaweedS3``) on loopback, so the
cold numbers count the object store's own work and the hashing of every file, not a
network: across hosts add the link's transfer time. Cold: a cache folder never used;
warm: the same cache again (each file's stamp checked, nothing fetched or hashed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def loads(model: str, repeats: int, root: Path, s3) -> dict:  # noqa: ANN001
    from app.objectregistry import ObjectRegistry
    from app.registry import Registry
    from app.storage import S3Storage
    from worker.defaults import ensure_default_models
    from worker.pipelines import Runtime, load_pipeline

    runtime = Runtime.resolve()
    local = Registry(root / "local")
    ensure_default_models(local)
    store = S3Storage(s3.bucket, "bench", client=s3.client())
    manifest = {k: v for k, v in local.get(model).items()
                if k not in ("id", "created_at", "files", "digest")}
    ObjectRegistry(store, root / "writer").import_folder(local.path(model), model, manifest)

    def timed(fn) -> float:  # noqa: ANN001
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    load_pipeline(local.path(model), runtime)  # warm-up: imports, the page cache
    local_s, cold_s, warm_s = [], [], []
    for i in range(repeats):
        host = ObjectRegistry(store, root / f"host-{i}")
        runs = [("local", lambda: load_pipeline(local.path(model), runtime)),
                ("cold", lambda h=host: load_pipeline(h.path(model), runtime)),
                ("warm", lambda h=host: load_pipeline(h.path(model), runtime))]
        if i % 2:  # the local load goes last half the time
            runs = runs[1:] + runs[:1]
        for name, fn in runs:
            {"local": local_s, "cold": cold_s, "warm": warm_s}[name].append(timed(fn))
    med = statistics.median
    return {"model": model, "bytes": sum((local.path(model) / rel).stat().st_size
                                         for rel in local.get(model)["files"]),
            "local_s": local_s, "cold_s": cold_s, "warm_s": warm_s,
            "cold_ratio": med(cold_s) / med(local_s), "warm_ratio": med(warm_s) / med(local_s)}


def erase_s(model: str, iterations: int, env: dict[str, str]) -> float:
    """One erase through the whole service (API, Redis, a worker), submitted to finished."""
    from app.testing import environment
    from bench.stack import Stack

    with environment(**env), Stack() as stack:
        from app.client import LetheClient

        with LetheClient(stack.url, timeout_s=60) as lethe:
            lethe.wait(lethe.generate(prompt="a", model=model, steps=1))  # model loaded
            t0 = time.perf_counter()
            job = lethe.wait(lethe.erase(base_model=model, concepts=["red"],
                                         iterations=iterations), timeout_s=3600)
            took = time.perf_counter() - t0
            assert job.status == "succeeded", job
            return took


def run(model: str = "shapes-sd", repeats: int = 5, iterations: int = 50) -> dict:
    from app.config import get_settings
    from app.testing import SeaweedS3

    with tempfile.TemporaryDirectory() as tmp, SeaweedS3(Path(tmp) / "s3") as s3:
        result = loads(model, repeats, Path(tmp), s3)
        local = erase_s(model, iterations, {"LETHE_STORAGE_URL": ""})
        remote = erase_s(model, iterations, {**s3.env(), "LETHE_STORAGE_URL": s3.url
                                             + "-erase"})
        get_settings.cache_clear()
    return result | {"iterations": iterations, "erase_local_s": local,
                     "erase_s3_s": remote, "erase_ratio": remote / local}


def markdown(r: dict) -> str:
    med = statistics.median
    return "\n".join([
        f"### The registry on object storage (`python -m bench.storage`, {r['model']}, "
        f"{r['bytes'] / 1e6:.1f} MB)",
        "",
        "SeaweedFS on loopback; medians of " + str(len(r["local_s"])) + " alternated runs.",
        "",
        "| load | median | vs local folder |",
        "| --- | --- | --- |",
        f"| local folder | {med(r['local_s']):.3f} s | 1.00× |",
        f"| S3, cold cache (fetch + sha256 of every file) | {med(r['cold_s']):.3f} s | "
        f"{r['cold_ratio']:.2f}× |",
        f"| S3, warm cache | {med(r['warm_s']):.3f} s | {r['warm_ratio']:.2f}× |",
        "",
        f"An erase of {r['iterations']} iterations through the whole service (API, Redis, "
        f"one worker), submitted to finished: {r['erase_local_s']:.1f} s with a local "
        f"registry, {r['erase_s3_s']:.1f} s with the registry, outputs and checkpoints on "
        f"S3 ({r['erase_ratio']:.2f}×).",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args()
    result = run(args.model, args.repeats, args.iterations)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
