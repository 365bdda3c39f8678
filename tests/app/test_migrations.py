"""The Alembic migrations build exactly the schema of app.db.models, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.db.models import Base
from app.prestart import ALEMBIC_INI, migrate
from app.settings import Settings

TABLES = {
    "teams",
    "api_keys",
    "adaptations",
    "adaptation_events",
    "models",
    "pending_uploads",
    "webhooks",
    "webhook_deliveries",
    "evaluations",
    "alembic_version",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "sqlite":
        return Settings(data_dir=tmp_path)
    create_database: Callable[[], str] = request.getfixturevalue("create_database")
    return Settings(data_dir=tmp_path, database_url=create_database())


def test_upgrade_matches_the_models_and_downgrades(settings: Settings) -> None:
    migrate(settings)
    migrate(settings)  # a second run is a no-op
    engine = create_engine(settings.database_url)
    try:
        assert set(inspect(engine).get_table_names()) == TABLES
        with engine.connect() as connection:
            differences = compare_metadata(
                MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata
            )
        assert differences == []
        config = Config(str(ALEMBIC_INI))
        config.set_main_option("sqlalchemy.url", settings.database_url)
        command.downgrade(config, "base")
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()
