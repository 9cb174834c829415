from __future__ import annotations

import json

import pytest

from app.cli import main
from app.registry import open_registry
from tests.support import own_storage
from worker.tiny import save_tiny_pipeline


@pytest.fixture
def registry(tmp_path, monkeypatch):
    from app.config import get_settings

    monkeypatch.setenv("LETHE_HOME", str(tmp_path / "home"))
    for name, value in own_storage().items():
        monkeypatch.setenv(f"LETHE_{name.upper()}", value)
    get_settings.cache_clear()
    yield open_registry(get_settings())
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


def test_single_file_export_and_import_through_the_cli(registry, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    save_tiny_pipeline(tmp_path / "folder", seed=3)
    main(["models", "import", str(tmp_path / "folder"), "--id", "mine"])
    out = tmp_path / "mine.safetensors"
    main(["models", "export", "mine", "--to", str(out), "--format", "single-file"])
    tensors = load_file(str(out))
    assert all(v.dtype == torch.float16 for v in tensors.values())  # the single-file default
    capsys.readouterr()
    main(["models", "import", str(out), "--id", "mine-back"])
    assert json.loads(capsys.readouterr().out)["exported_from"]["id"] == "mine"
    # A pickle needs the operator's flag; with it, it is read (and checked like any file).
    ckpt = tmp_path / "mine.ckpt"
    torch.save({"state_dict": tensors}, ckpt)
    with pytest.raises(SystemExit, match="--allow-pickle"):
        main(["models", "import", str(ckpt), "--id", "pickled"])
    with pytest.raises(SystemExit, match="does not match the layout"):
        main(["models", "import", str(ckpt), "--id", "pickled", "--allow-pickle"])
    assert sorted(m["id"] for m in registry.models()) == ["mine", "mine-back"]


def test_jobs_lists_the_callers_jobs_newest_first(http, live_url, capsys):
    ids = [http.post("/generate", json={"prompt": "a", "steps": 1, "width": 64,
                                         "height": 64}).json()["id"] for _ in range(2)]
    main(["jobs", "--url", live_url, "--type", "generate", "--limit", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ids[::-1]
    assert all(" generate " in line and line.rstrip().endswith("anonymous") for line in lines)


def test_serve_with_a_malformed_setting_stops_naming_it(monkeypatch):
    from app.config import get_settings

    monkeypatch.setenv("LETHE_API_KEYS", "alice:k1:boss")
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as stopped:
            main(["serve", "--port", "1"])
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert str(stopped.value) == ("lethe: invalid settings:\n  LETHE_API_KEYS: LETHE_API_KEYS "
                                  "entry 1 (alice): role 'boss' is not one of ['user', 'admin']")


def test_train_without_a_concept_adds_the_reference_once(registry, capsys):
    # A smoke-sized recipe (0.2% of the steps and scenes): the path, not the model.
    main(["train", "shapes", "--without", "triangle", "--scale", "0.002"])
    assert "shapes-sd-without-triangle: trained" in capsys.readouterr().out
    made = registry.get("shapes-sd-without-triangle")
    assert made["reference_for"] == {"base": "shapes-sd", "concept": "triangle"}
    assert made["domain"] == "shapes" and made["training"]["without"] == "triangle"
    main(["train", "shapes", "--without", "triangle"])  # made once, then reused
    assert "already in the registry" in capsys.readouterr().out
    assert registry.get("shapes-sd-without-triangle")["digest"] == made["digest"]
    with pytest.raises(SystemExit, match="got 'hexagon'"):
        main(["train", "shapes", "--without", "hexagon"])
    with pytest.raises(SystemExit, match="--out is required"):
        main(["train", "shapes"])
    assert [m["id"] for m in registry.models()] == ["shapes-sd-without-triangle"]
