"""The worker's Celery application: the API's broker settings (app/queue.py) with the task modules included.

Run a worker with `celery -A worker.celery_app:celery_app worker -Q training --pool=solo --concurrency=1`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from app.queue import MustCelery, create_celery_app
from app.settings import Settings, get_settings

TASK_MODULES = ("worker.tasks",)


def create_worker_app(settings: Settings) -> MustCelery:
    return create_celery_app(settings, include=TASK_MODULES)


@lru_cache
def default_celery_app() -> MustCelery:
    """The app for the settings in the environment (what the `celery` command line and `must serve` run)."""
    return create_worker_app(get_settings())


def __getattr__(name: str) -> Any:
    # `celery -A worker.celery_app:celery_app` builds the app on first use, not when this module is
    # imported, so importing the factory (as the tests do) reads no environment.
    if name == "celery_app":
        return default_celery_app()
    raise AttributeError(name)
