"""The broker from the API's side: the Celery client, the task names, and how a job is enqueued.

Messages carry only an id; the row in the database holds the state. The API sends tasks by name and never
imports worker code; `worker/celery_app.py` builds the same app with the worker's task modules included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery

from app.settings import Settings

RUN_ADAPTATION = "must.run_adaptation"  # the worker registers its tasks under these names
RUN_EVALUATION = "must.run_evaluation"


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


def create_celery_app(settings: Settings, include: Sequence[str] = ()) -> MustCelery:
    """The app for these settings; `include` names the task modules a worker process imports."""
    app = MustCelery(settings, broker=settings.broker_url, include=list(include))
    app.conf.update(
        task_default_queue=settings.training_queue,
        task_routes={name: {"queue": settings.training_queue} for name in (RUN_ADAPTATION, RUN_EVALUATION)},
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


def enqueue_evaluation(app: Celery, evaluation_id: str) -> None:
    app.send_task(RUN_EVALUATION, args=[evaluation_id])
