"""The benchmark suite's smoke run: every section runs end to end at tiny sizes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_bench_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    # A file as an earlier run left it: a suite section (replaced) and one that another
    # command wrote (kept, since the suite does not measure it).
    out.write_text("# Benchmark results\n\n## Load (old figures)\n\nstale row\n\n"
                   "## The registry on object storage (`python -m bench.storage`)\n\n"
                   "| storage row |\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("Service end to end", "edited variant", "ESD against", "ESD's memory",
                    "Micro-batching", "Load", "Live previews", "clients waiting on a running job"):
        assert heading in text, text
    assert "smoke run" in text
    assert "(0 lost)" in text  # no job of the load section went missing
    assert "stale row" not in text and "old figures" not in text
    assert text.index("clients waiting on a running job") < text.index("| storage row |")


def test_the_attack_table_runs_each_method_as_a_job_would(tmp_path):
    from app.registry import Registry
    from worker.defaults import TINY_MANIFEST
    from worker.tiny import save_tiny_pipeline

    # A model "retrained without red" (another seed's tiny model: the path, not the numbers).
    with Registry(tmp_path / "registry").create("tiny-sd-without-red", {
            **TINY_MANIFEST, "reference_for": {"base": "tiny-sd", "concept": "red"}}) as staging:
        save_tiny_pipeline(staging, seed=1)
    out = tmp_path / "attacks.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    proc = subprocess.run([sys.executable, "-m", "bench.attacks", "--smoke", "--model", "tiny-sd",
                           "--concepts", "red", "--methods", "default", "esd-x robust",
                           "to the reference", "--out", str(out)], cwd=ROOT,
                          env=env | {"LETHE_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert ("| 'red' | base | never saw it (tiny-sd-without-red) | default | esd-x robust | "
            "to the reference |") in text
    # resolved as POST /erase resolves them: tiny-sd's default is plain esd-x
    assert "default: method esd-x, iterations 2" in text and "robust False" in text
    assert "esd-x robust: method esd-x, iterations 2" in text and "robust True" in text
    assert "target tiny-sd-without-red" in text  # distilled from the reference
    assert "| **worst inference-time attack** |" in text  # every attack ran
    assert "| **worst gap to the reference (points)** |" in text
    assert "| image inversion, empty prompt |" in text


def test_reach_says_how_far_the_conditioning_budgets_go(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    proc = subprocess.run([sys.executable, "-m", "bench.attacks", "--reach", "--model", "tiny-sd",
                           "--concepts", "red"], cwd=ROOT, env=env | {"LETHE_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| red |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # radius, the neighbours named with their distances, the empty prompt, three budgets
    assert float(cells[1]) > 0
    neighbours = dict(n.rsplit(" ", 1) for n in cells[2].split(", "))
    assert neighbours and all(float(d) > 0 for d in neighbours.values())
    assert 0 < float(cells[3])
    within = [int(c.rstrip("%")) for c in cells[4:]]
    assert len(within) == 3 and within == sorted(within)  # a larger budget reaches more
