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
