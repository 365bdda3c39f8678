"""Start-up step: wait for the database, then bring its schema to the latest Alembic revision.

Run as `python -m app.prestart` (the compose `migrate` service) and by `must serve` / `must admin`.
Safe to run from several processes at once: on PostgreSQL an advisory lock serialises the upgrades.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from app.db.session import create_db_engine
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

ALEMBIC_INI = Path(__file__).with_name("alembic.ini")
# Arbitrary constant identifying "schema migration in progress" among PostgreSQL advisory locks.
MIGRATION_LOCK_ID = 7_364_212


def wait_for_database(engine: Engine, timeout_seconds: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return
        except OperationalError:
            if time.monotonic() > deadline:
                raise
            log.info("database not reachable yet; retrying")
            time.sleep(1.0)


def migrate(settings: Settings, timeout_seconds: float = 60.0) -> None:
    """Wait for the database and upgrade it to `head` (a no-op when it is already there)."""
    engine = create_db_engine(settings)
    try:
        wait_for_database(engine, timeout_seconds)
        config = Config(str(ALEMBIC_INI))
        config.set_main_option("sqlalchemy.url", settings.database_url.replace("%", "%%"))
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()


def main() -> None:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    migrate(settings)
    log.info("database schema is up to date")


if __name__ == "__main__":
    main()
