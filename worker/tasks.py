"""The Celery tasks: run an adaptation job, or an audit, by id (all state lives in its database row)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from celery import Task, shared_task
from sqlalchemy.orm import Session, sessionmaker

from app.db.session import create_db_engine, create_session_factory
from app.queue import RUN_ADAPTATION, RUN_EVALUATION, MustCelery
from app.storage import ObjectStore, create_store
from worker.evaluations import EvaluationRunner
from worker.runner import AdaptationRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerResources:
    session_factory: sessionmaker[Session]
    store: ObjectStore


_resources: dict[int, WorkerResources] = {}


def resources_for(app: MustCelery) -> WorkerResources:
    """Database and object-store clients, created once per worker process on first use."""
    key = id(app)
    if key not in _resources:
        settings = app.must_settings
        store = create_store(settings)
        store.ensure_bucket()
        _resources[key] = WorkerResources(create_session_factory(create_db_engine(settings)), store)
    return _resources[key]


@shared_task(bind=True, name=RUN_ADAPTATION, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_adaptation(self: Task, adaptation_id: str) -> str:
    app = self.app
    assert isinstance(app, MustCelery), "run_adaptation needs the app from worker.celery_app"
    resources = resources_for(app)
    outcome = AdaptationRunner(app.must_settings, resources.session_factory, resources.store, adaptation_id).run()
    log.info("adaptation %s: %s", adaptation_id, outcome)
    return outcome


@shared_task(bind=True, name=RUN_EVALUATION, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_evaluation(self: Task, evaluation_id: str) -> str:
    app = self.app
    assert isinstance(app, MustCelery), "run_evaluation needs the app from worker.celery_app"
    resources = resources_for(app)
    outcome = EvaluationRunner(app.must_settings, resources.session_factory, resources.store, evaluation_id).run()
    log.info("evaluation %s: %s", evaluation_id, outcome)
    return outcome
