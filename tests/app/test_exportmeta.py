"""What an uploaded export's metadata may set: bounded defaults, known domains and classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.errors import InvalidParams
from app.exportmeta import check_config_folder, usage

ARCHITECTURES = Path(__file__).parents[2] / "worker" / "architectures"


def _lethe(**fields) -> dict[str, str]:
    return {"lethe": json.dumps(fields)}


def test_defaults_within_a_requests_bounds_are_kept_and_unknown_keys_dropped():
    carried = usage(_lethe(defaults={"steps": 30, "scheduler": "ddim", "exec": "rm"},
                           erase_defaults={"by_method": {"esd-u": {"iterations": 200}}},
                           domain="shapes", pipeline="os.system"), {"shapes"}, "file")
    assert carried == {"defaults": {"steps": 30, "scheduler": "ddim"}, "domain": "shapes",
                       "erase_defaults": {"by_method": {"esd-u": {"iterations": 200}}}}
    assert usage({}, {"shapes"}, "file") == {}


@pytest.mark.parametrize("fields, named", [
    ({"defaults": {"steps": 10**9}}, "`defaults.steps` 1000000000"),
    ({"limits": {"max_side": 100_000}}, "`limits.max_side` 100000"),
    ({"erase_defaults": {"by_method": {"esd-u": {"ddim_steps": 0}}}},
     "`erase_defaults.by_method.esd-u.ddim_steps` 0"),
    ({"domain": "elsewhere"}, "names domain 'elsewhere'"),
])
def test_a_default_out_of_bounds_is_refused_naming_it(fields, named):
    with pytest.raises(InvalidParams, match=named.replace(".", r"\.")):
        usage(_lethe(**fields), {"shapes"}, "file")


def _folder(name: str) -> dict[str, str]:
    root = ARCHITECTURES / name
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".json", ".txt")}


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_the_config_folders_of_real_architectures_pass(name):
    files = _folder(name)
    assert check_config_folder({"lethe.config_folder": json.dumps(files)}, "file") == files


@pytest.mark.parametrize("change, named", [
    (lambda f, i: i.update(unet=["os", "system"]), "component 'unet'"),
    (lambda f, i: i.update(_class_name="DiffusionPipeline"), "'DiffusionPipeline'"),
    (lambda f, i: f.update({"../../etc/x.json": "{}"}), "'../../etc/x.json'"),
    (lambda f, i: f.update({"unet/model.py": "import os"}), "'unet/model.py'"),
])
def test_a_config_folder_naming_other_classes_or_files_is_refused(change, named):
    files = _folder("sd1")
    index = json.loads(files["model_index.json"])
    change(files, index)
    files["model_index.json"] = json.dumps(index)
    with pytest.raises(InvalidParams, match=named.replace(".", r"\.")):
        check_config_folder({"lethe.config_folder": json.dumps(files)}, "file")
