"""The import contracts: app/ never imports torch (test_boundaries.py); nothing outside a
domain's own folder imports that domain: the core finds it by name (worker.domains); and
the workers import none of the HTTP process's modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ROOT / "worker" / "domains"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_no_module_outside_a_domain_imports_it():
    domains = [d.name for d in DOMAINS.iterdir() if (d / "__init__.py").is_file()]
    assert {"generic", "shapes"} <= set(domains)
    offenders = []
    for path in sorted([*ROOT.glob("app/**/*.py"), *ROOT.glob("worker/**/*.py")]):
        for name in domains:
            if path.is_relative_to(DOMAINS / name):
                continue
            prefix = f"worker.domains.{name}"
            if any(m == prefix or m.startswith(prefix + ".") for m in imported_modules(path)):
                offenders.append(f"{path.relative_to(ROOT)} imports {prefix}")
    assert not offenders, offenders


def test_the_contract_sees_an_import_it_should_refuse(tmp_path):
    # The walker is not blind: a line of the kind the contract forbids is found.
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from worker.domains.shapes.judge import ShapesJudge\n")
    assert "worker.domains.shapes.judge" in imported_modules(probe)


# The HTTP process's own modules: how a request becomes a job, and what answers it. A
# worker needs none of them (it gets the typed spec), so none may be imported there.
API_ONLY = ("app.main", "app.api", "app.params", "app.submissions", "app.idempotency",
            "app.quotas", "app.uploads", "app.middleware", "app.openapi", "app.links",
            "app.holds", "app.images", "app.cli", "app.serve", "app.client")


def test_the_workers_import_none_of_the_http_processs_modules():
    wrong = {f"{path.relative_to(ROOT)}: {name}"
             for path in sorted((ROOT / "worker").rglob("*.py"))
             for name in imported_modules(path)
             if any(name == m or name.startswith(m + ".") for m in API_ONLY)}
    assert wrong == set()


def test_the_contract_sees_a_wrong_way_import(tmp_path):
    probe = tmp_path / "upscale.py"
    probe.write_text("from app import jobfiles, params\n")
    assert {"app.params", "app.jobfiles"} <= imported_modules(probe)
