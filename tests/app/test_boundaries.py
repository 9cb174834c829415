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
