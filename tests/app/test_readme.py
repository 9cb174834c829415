"""The README's examples run as written, against the live service."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parents[2] / "README.md"


def example(name: str) -> str:
    found = re.search(rf"<!-- example: {name} .*?-->\n```python\n(.*?)```", README.read_text(),
                      re.S)
    assert found, f"README has no example {name!r}"
    return found.group(1)


@pytest.mark.parametrize("name", ["sdk", "openai"])
def test_the_readme_example_runs(name, live_url, worker, tmp_path, monkeypatch):
    code = example(name)
    assert len([line for line in code.splitlines() if line.strip()]) <= 5
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("http://127.0.0.1:8000", live_url), f"README:{name}", "exec"),
         {})
    assert Image.open(tmp_path / "circle.png").format == "PNG"
