"""Migrations are the only schema source: they apply on SQLite and Postgres, and match the models exactly."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel

import loupe.storage.metadata.tables  # noqa: F401
from loupe.storage.metadata.engine import alembic_config, create_db_engine, include_object, upgrade


def test_migrations_apply_and_autogenerate_finds_no_drift(db_url: str):
    engine = create_db_engine(db_url)
    upgrade(engine)
    assert {"images", "image_tags", "image_text", "change_log", "model_versions", "alembic_version"} <= set(
        inspect(engine).get_table_names()
    )
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "render_as_batch": engine.dialect.name == "sqlite",
                "include_object": include_object,
            },
        )
        diff = compare_metadata(ctx, SQLModel.metadata)
    assert diff == [], f"models and migrations differ: {diff}"
    engine.dispose()


def test_upgrade_is_idempotent_and_downgrade_to_base_works(db_url: str):
    from alembic import command

    engine = create_db_engine(db_url)
    upgrade(engine)
    upgrade(engine)  # a second start changes nothing
    command.downgrade(alembic_config(engine), "base")
    assert "images" not in inspect(engine).get_table_names()
    upgrade(engine)
    assert "images" in inspect(engine).get_table_names()
    engine.dispose()
