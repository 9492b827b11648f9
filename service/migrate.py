"""Run Alembic migrations from code (CLI, demo, tests) with explicit settings."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from service.settings import Settings

#: migrations/ beside the service package: a checkout, or an editable install of one.
BESIDE_PACKAGE = Path(__file__).resolve().parent.parent / "migrations"


class MigrationsNotFound(RuntimeError):
    pass


def migrations_dir(settings: Settings) -> Path:
    """PROSPECT_MIGRATIONS_DIR, else the checkout's folder, else ./migrations. A regular
    (non-editable) install has no migrations beside its package: the images copy them to their
    working directory, and anything else must say where they are."""
    tried = [Path(settings.migrations_dir)] if settings.migrations_dir else [BESIDE_PACKAGE,
                                                                               Path.cwd() / "migrations"]
    for path in tried:
        if (path / "env.py").is_file() and (path / "versions").is_dir():
            return path.resolve()
    raise MigrationsNotFound(
        "no Alembic migrations folder (env.py and versions/) at " + ", ".join(str(p) for p in tried)
        + "; set PROSPECT_MIGRATIONS_DIR to the repository's migrations/ folder")


def alembic_config(settings: Settings) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir(settings)))
    cfg.attributes["settings"] = settings
    return cfg


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` on ``settings.database_url``."""
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: Settings, revision: str) -> None:
    command.downgrade(alembic_config(settings), revision)
