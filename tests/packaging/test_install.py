"""A regular (non-editable) install, as the images make one: `prospect db upgrade` must find the
migrations, which the wheel does not carry. Before PROSPECT_MIGRATIONS_DIR it looked only beside
the installed package, so the compose file's `migrate` step failed and nothing else started."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("service", "worker"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (site / "service" / "migrate.py").is_file() and not (site / "migrations").exists()
    return site


def _upgrade(site: Path, cwd: Path, db: Path, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PROSPECT_")}
    e.update(PYTHONPATH=str(site), PROSPECT_DATABASE_URL=f"sqlite:///{db}", **env)
    return subprocess.run([sys.executable, "-c", "from service.cli import app; app()", "db", "upgrade"],
                          cwd=cwd, env=e, capture_output=True, text=True, timeout=300)


def _head(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def _latest_revision() -> str:
    return sorted(p.name.split("_")[0] for p in (ROOT / "migrations" / "versions").glob("[0-9]*.py"))[-1]


def test_without_migrations_the_error_says_where_it_looked(installed, tmp_path):
    r = _upgrade(installed, tmp_path, tmp_path / "a.db")
    assert r.returncode != 0
    out = " ".join((r.stdout + r.stderr).split())
    assert "PROSPECT_MIGRATIONS_DIR" in out and str(tmp_path / "migrations") in out, out
    assert "Traceback" not in out


def test_the_images_layout_migrates_from_its_working_directory(installed, tmp_path):
    app = tmp_path / "app"
    shutil.copytree(ROOT / "migrations", app / "migrations", ignore=shutil.ignore_patterns("__pycache__"))
    r = _upgrade(installed, app, tmp_path / "b.db")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _head(tmp_path / "b.db").startswith(_latest_revision())
    r = _upgrade(installed, tmp_path, tmp_path / "c.db", PROSPECT_MIGRATIONS_DIR=str(app / "migrations"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert _head(tmp_path / "c.db").startswith(_latest_revision())


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile.api", "docker/Dockerfile.worker"])
def test_images_point_prospect_migrations_dir_at_the_folder_they_copy(dockerfile):
    lines = (ROOT / dockerfile).read_text().splitlines()
    env = " ".join(ln for ln in lines if ln.startswith("ENV "))
    assert "PROSPECT_MIGRATIONS_DIR=/app/migrations" in env
    final_stage = lines[max(i for i, ln in enumerate(lines) if ln.startswith("FROM ")):]
    assert "WORKDIR /app" in final_stage
    assert any(ln.startswith("COPY") and ln.split()[-1] == "./migrations" for ln in final_stage)
