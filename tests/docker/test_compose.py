"""No Docker engine runs here, so the deployment files are checked against the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from app.cli import build_parser
from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SETTING_VARS = {f"LETHE_{name.upper()}" for name in Settings.model_fields}


def subcommands(parser) -> dict:
    return next(a for a in parser._actions if a.dest == "command").choices


@pytest.mark.parametrize("name", ["api", "worker"])
def test_commands_name_real_entrypoints(name):
    command = SERVICES[name]["command"]
    assert command[0] == "lethe"
    # argparse exits on an unknown sub-command or flag: this is the real CLI's check.
    args = build_parser().parse_args(command[1:])
    assert args.command in subcommands(build_parser())
    dockerfile = ROOT / SERVICES[name]["build"]["dockerfile"]
    assert dockerfile.is_file()
    assert '"lethe"' in dockerfile.read_text()  # the image's own CMD uses the same entrypoint


@pytest.mark.parametrize("name", ["api", "worker"])
def test_environment_is_what_the_code_reads(name):
    env = SERVICES[name]["environment"]
    lethe_vars = {k for k in env if k.startswith("LETHE_")}
    assert lethe_vars <= SETTING_VARS, lethe_vars - SETTING_VARS
    assert {"LETHE_HOME", "LETHE_REDIS_URL"} <= lethe_vars
    assert env["LETHE_REDIS_URL"].startswith("redis://redis:")
    # LETHE_HOME is the mount point of the shared named volume.
    mounts = {v.split(":")[0]: v.split(":")[1] for v in SERVICES[name]["volumes"]}
    assert mounts["lethe-home"] == env["LETHE_HOME"]


def test_volumes_are_declared():
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in COMPOSE["volumes"], source


def test_redis_persists_and_is_health_checked():
    redis = SERVICES["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert "redis-cli" in redis["healthcheck"]["test"]
    for name in ("api", "worker"):
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_scales_and_reserves_a_gpu():
    worker = SERVICES["worker"]
    # `--scale worker=N` needs no fixed name and no published port.
    assert "container_name" not in worker and "ports" not in worker
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_api_image_has_no_torch():
    text = (ROOT / "docker/api.Dockerfile").read_text()
    assert "torch" not in re.sub(r"#.*", "", text) and "[worker]" not in text
    assert "torch==" in (ROOT / "docker/worker.Dockerfile").read_text()


def test_the_worker_image_carries_the_shipped_demo_models():
    # The worker image installs the package non-editable: the weights must be package data.
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = data["package-data"]["worker.domains.shapes"]
    package = ROOT / "worker" / "domains" / "shapes"
    shipped = [p for p in (package / "models").rglob("*") if p.is_file()]
    assert len(shipped) > 10
    covered = {p for pat in patterns for p in package.glob(pat) if p.is_file()}
    assert set(shipped) <= covered, set(shipped) - covered


def test_the_object_store_is_optional_and_the_services_can_point_at_it():
    store = SERVICES["s3"]
    assert store["profiles"] == ["s3"]  # started only with --profile s3
    assert "-s3" in store["command"] and "-s3.port=8333" in store["command"]
    for name in ("api", "worker"):
        env = SERVICES[name]["environment"]
        assert env["LETHE_STORAGE_URL"] == "${LETHE_STORAGE_URL:-}"  # off unless asked
        assert env["LETHE_S3_ENDPOINT_URL"].endswith("http://s3:8333}")
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} <= set(env)
