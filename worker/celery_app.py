"""The Celery application: broker settings for long GPU jobs, and how the API enqueues one.

Messages carry only an adaptation id; the job row in the database holds the state. Run a worker with
`celery -A worker.celery_app:celery_app worker -Q training --pool=solo --concurrency=1`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from app.settings import Settings, get_settings

RUN_ADAPTATION = "must.run_adaptation"


class MustCelery(Celery):
    """A Celery app that carries the service settings its tasks run with."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__("must", **kwargs)
        self.must_settings = settings


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {"visibility_timeout": settings.broker_visibility_timeout_seconds}
    if settings.broker_url.startswith("filesystem://"):
        # One folder for both directions: the API writes messages, the embedded worker reads them.
        queue_dir = settings.broker_dir / "queue"
        processed_dir = settings.broker_dir / "processed"
        control_dir = settings.broker_dir / "control"  # kombu's default is ./control in the working directory
        for directory in (queue_dir, processed_dir, control_dir):
            directory.mkdir(parents=True, exist_ok=True)
        options |= {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "processed_folder": str(processed_dir),
            "control_folder": str(control_dir),
            "store_processed": False,
        }
    return options


def create_celery_app(settings: Settings) -> MustCelery:
    app = MustCelery(settings, broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_default_queue=settings.training_queue,
        task_routes={RUN_ADAPTATION: {"queue": settings.training_queue}},
        # A job is acknowledged only when the task returns, so a worker that dies mid-training leaves
        # its message to be redelivered; the database lease keeps the redelivery from running it twice.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


def enqueue_adaptation(app: Celery, adaptation_id: str) -> None:
    app.send_task(RUN_ADAPTATION, args=[adaptation_id])


@lru_cache
def default_celery_app() -> MustCelery:
    """The app for the settings in the environment (what the `celery` command line and `must serve` run)."""
    return create_celery_app(get_settings())


def __getattr__(name: str) -> Any:
    # `celery -A worker.celery_app:celery_app` builds the app on first use, not when this module is
    # imported, so importing the factory (as the API and the tests do) reads no environment.
    if name == "celery_app":
        return default_celery_app()
    raise AttributeError(name)
