from __future__ import annotations

import json

import pytest

from app.cli import main
from app.registry import Registry
from worker.tiny import save_tiny_pipeline


@pytest.fixture
def registry(tmp_path, monkeypatch):
    from app.config import get_settings

    monkeypatch.setenv("LETHE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield Registry(tmp_path / "home" / "registry")
    get_settings.cache_clear()


def test_models_import_show_list_rm(registry, tmp_path, capsys):
    save_tiny_pipeline(tmp_path / "folder", seed=3)
    main(["models", "import", str(tmp_path / "folder"), "--id", "mine"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["id"] == "mine" and shown["kind"] == "text-to-image"
    assert registry.get("mine")["digest"] == shown["digest"]
    main(["models", "list"])
    assert "mine" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="base model"):
        main(["models", "rm", "mine"])
    main(["models", "rm", "mine", "--force"])
    assert registry.models() == []


def test_import_rejects_what_is_not_a_pipeline(registry, tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(SystemExit, match="model_index.json"):
        main(["models", "import", str(tmp_path / "junk"), "--id", "junk"])
    with pytest.raises(SystemExit, match="got 'Bad/Id'"):
        main(["models", "import", str(tmp_path / "junk"), "--id", "Bad/Id"])
    assert registry.models() == []
