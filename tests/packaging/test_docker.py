"""Production packaging, checked without a Docker engine: hadolint on the Dockerfiles and
`docker-compose config` (Debian's docker-compose) on the compose file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} is required (`.ci/run` installs it; `make venv` installs hadolint)")
    return path


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile.api", "docker/Dockerfile.worker"])
def test_dockerfile_passes_hadolint(dockerfile):
    r = subprocess.run([_tool("hadolint"), "--no-color", dockerfile], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_api_image_has_no_torch_and_runs_as_non_root():
    text = (ROOT / "docker/Dockerfile.api").read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "torch" not in code and "[train]" not in code
    assert "python:3.11-slim" in text
    users = [ln.split()[1] for ln in text.splitlines() if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")


def test_worker_image_has_the_torch_the_fast_paths_need():
    """The GPU worker's base: CUDA PyTorch at least as new as the one the throughput figures
    were measured with (2.11: varlen attention, float32-output matmuls); an older base silently
    falls back to slower kernels."""
    worker = (ROOT / "docker/Dockerfile.worker").read_text()
    base = next(ln.split()[1] for ln in worker.splitlines() if ln.startswith("FROM "))
    repo, tag = base.split(":")
    assert repo == "pytorch/pytorch" and "cuda" in tag and tag.endswith("-runtime"), base
    major, minor = (int(x) for x in tag.split("-")[0].split(".")[:2])
    assert (major, minor) >= (2, 11), base


@pytest.fixture(scope="module")
def compose() -> dict:
    env = {**os.environ, "PROSPECT_USER_ID_KEY": "test-secret-key-0123456789"}
    r = subprocess.run([_tool("docker-compose"), "-f", "docker-compose.yml", "config"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def test_compose_has_the_production_shape(compose):
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "worker-default", "beat"} <= set(
        services)
    pg = services["postgres"]
    assert "healthcheck" in pg and any("/var/lib/postgresql/data" in v for v in _vols(pg))
    # One-shot migration gates the API and the workers.
    for name in ("api", "worker", "worker-default", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == \
            "service_completed_successfully", name
    # The GPU worker reserves a GPU and runs one task at a time on queue gpu.
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    assert worker["command"][:4] == ["prospect", "worker", "--queues", "gpu"]
    assert "solo" in worker["command"]
    assert services["beat"]["deploy"]["replicas"] == 1
    # Workers and the API share the artifacts volume.
    for name in ("api", "worker", "worker-default"):
        assert any(v.startswith("artifacts:") for v in _vols(services[name])), name
    assert services["api"]["environment"]["PROSPECT_BROKER_URL"].startswith("redis://")


def test_compose_refuses_to_start_without_a_user_id_key():
    env = {k: v for k, v in os.environ.items() if k != "PROSPECT_USER_ID_KEY"}
    r = subprocess.run([_tool("docker-compose"), "-f", "docker-compose.yml", "config"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "PROSPECT_USER_ID_KEY" in r.stderr


def _vols(service: dict) -> list[str]:
    out = []
    for v in service.get("volumes", []):
        out.append(v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}")
    return out
