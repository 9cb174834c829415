"""The API side stays light: importing it never loads torch or diffusers; and the maths and
the job specs, which workers import, never load the web framework."""

from __future__ import annotations

import subprocess
import sys


def loaded(imports: str, watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` a fresh interpreter holds after ``import {imports}``."""
    code = (f"import sys, {imports}; "
            f"print(','.join(m for m in {watched!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [m for m in result.stdout.strip().split(",") if m]


def test_app_never_imports_torch():
    assert loaded("app.main, app.cli, app.serve",
                  ("torch", "diffusers", "transformers")) == []


def test_the_maths_and_the_job_specs_never_import_the_web_framework():
    # The trainer, the metrics and what goes on the queue raise app.errors and validate
    # app.jobspecs; neither may pull FastAPI or Starlette into a worker.
    assert loaded("worker.esd, worker.metrics, app.errors, app.jobspecs",
                  ("fastapi", "starlette")) == []


def test_the_check_sees_a_module_that_is_loaded():
    assert loaded("json", ("json", "torch")) == ["json"]

