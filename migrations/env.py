"""Alembic environment: one code path for Postgres and SQLite.

The URL comes from ``config.attributes["settings"]`` (set by ``service.migrate``) or from the
PROSPECT_* environment; engines are built by ``service.db.make_engine`` so SQLite gets WAL
and the busy timeout here too. SQLite uses batch mode for ALTERs.
"""

from __future__ import annotations

from alembic import context

from service.db import make_engine
from service.models import Base
from service.settings import Settings

config = context.config
target_metadata = Base.metadata


def _settings() -> Settings:
    settings = config.attributes.get("settings")
    return settings if settings is not None else Settings()


def run_migrations_offline() -> None:
    settings = _settings()
    context.configure(
        url=settings.database_url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=settings.is_sqlite,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    settings = _settings()
    engine = make_engine(settings)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
