"""Alembic environment: runs on the engine Loupe hands over (SQLite in batch mode, or Postgres)."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import loupe.storage.metadata.tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from loupe.storage.metadata.engine import include_object

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        from loupe.config import Settings
        from loupe.storage.metadata.engine import create_db_engine

        engine = create_db_engine(
            config.get_main_option("sqlalchemy.url") or Settings().effective_database_url
        )
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
            include_object=include_object,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run `loupe db upgrade`")
run_migrations_online()
