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


# The HTTP process's own modules: how a request becomes a job, and what answers it. A
# worker needs none of them (it gets the typed spec), so none may be imported there.
API_ONLY = ("app.main", "app.api", "app.params", "app.submissions", "app.idempotency",
            "app.quotas", "app.uploads", "app.middleware", "app.openapi", "app.links",
            "app.holds", "app.images", "app.cli", "app.serve", "app.client")


def imports_of(path) -> set[str]:
    """Every module a file names in an import, ``from app import x`` as ``app.x``."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_the_workers_import_none_of_the_http_processs_modules():
    from pathlib import Path

    root = Path(__file__).parents[2]
    wrong = {f"{path.relative_to(root)}: {name}"
             for path in sorted((root / "worker").rglob("*.py"))
             for name in imports_of(path)
             if any(name == m or name.startswith(m + ".") for m in API_ONLY)}
    assert wrong == set()


def test_the_import_check_sees_a_wrong_way_import(tmp_path):
    wrong = tmp_path / "upscale.py"
    wrong.write_text("from app.params import SCALE\n")
    assert "app.params" in imports_of(wrong)
    wrong.write_text("from app import jobfiles, params\n")
    assert {"app.params", "app.jobfiles"} <= imports_of(wrong)
