"""The API side stays light: importing it never loads torch or diffusers."""

from __future__ import annotations

import subprocess
import sys


def test_app_never_imports_torch():
    code = (
        "import sys, app.main, app.cli, app.serve;"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_maths_and_the_job_specs_never_import_the_web_framework():
    # The trainer, the metrics and what goes on the queue raise app.errors and validate
    # app.jobspecs; neither may pull FastAPI or Starlette into a worker.
    code = (
        "import sys, worker.esd, worker.metrics, app.errors, app.jobspecs;"
        "web = [m for m in ('fastapi', 'starlette') if m in sys.modules];"
        "print(web); sys.exit(1 if web else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
