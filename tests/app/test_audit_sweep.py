"""Stranded audits on PostgreSQL, and webhook deliveries past their retention, without a worker process.

The sweeper re-sends an audit whose message was lost, puts back in the queue one whose worker's heartbeat
stopped, and gives up after `max_attempts`; a worker presumed dead that comes back can neither finish the row
another worker claimed nor delete that worker's images.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.audits import sweep_audits
from app.db.models import (
    DeliveryStatus,
    Evaluation,
    EvaluationStatus,
    Model,
    Webhook,
    WebhookDelivery,
    new_id,
    utcnow,
)
from app.services import Services
from app.sweeper import sweep_once
from app.webhooks.outbox import prune_deliveries
from worker.evaluations import EvaluationRunner, Heartbeat

LEASE, REQUEUE, ATTEMPTS = 60.0, 300.0, 3


@pytest.fixture
def sessions(world) -> sessionmaker[Session]:
    return world.session_factory  # a database of its own: a sweep reads every row


@pytest.fixture
def model_id(sessions: sessionmaker[Session], team) -> str:
    with sessions.begin() as session:
        row = Model(team_id=team.id, adaptation_id=new_id("ada"), class_names=["a", "b"],
                    base_model="proxy-cifar10-tiny", artifact_prefix=f"teams/{team.id}/models/x/")
        session.add(row)
        session.flush()
        return row.id


def _audit(sessions: sessionmaker[Session], team_id: str, model_id: str, *, age: float = 0.0, **values: Any) -> str:
    evaluation_id = new_id("eva")
    with sessions.begin() as session:
        session.add(Evaluation(id=evaluation_id, team_id=team_id, model_id=model_id, n=2,
                               images_key=f"teams/{team_id}/evaluations/{evaluation_id}/images.zip", **values))
    _age(sessions, evaluation_id, age)
    return evaluation_id


def _age(sessions: sessionmaker[Session], evaluation_id: str, seconds: float) -> None:
    with sessions.begin() as session:
        session.execute(update(Evaluation).where(Evaluation.id == evaluation_id)
                        .values(updated_at=utcnow() - timedelta(seconds=seconds)))


def _row(sessions: sessionmaker[Session], evaluation_id: str) -> Evaluation:
    with sessions() as session:
        return session.get_one(Evaluation, evaluation_id)


def _sweep(sessions: sessionmaker[Session], lease: float = LEASE) -> Any:
    with sessions.begin() as session:
        return sweep_audits(session, lease_seconds=lease, requeue_after_seconds=REQUEUE, max_attempts=ATTEMPTS)


def test_a_queued_audit_whose_message_was_lost_is_resent_once_per_interval(sessions, team, model_id) -> None:
    lost = _audit(sessions, team.id, model_id, age=2 * REQUEUE)
    fresh = _audit(sessions, team.id, model_id)
    assert _sweep(sessions).resend == [lost]
    assert _sweep(sessions).resend == []  # due again only an interval later
    assert _row(sessions, lost).status == _row(sessions, fresh).status == EvaluationStatus.QUEUED


def test_a_dead_workers_audit_goes_back_to_the_queue_and_is_claimed_again(world, sessions, team, model_id) -> None:
    first = EvaluationRunner(world.settings, sessions, world.store, _audit(sessions, team.id, model_id))
    assert first._claim() is not None and first.attempt == 1
    assert _sweep(sessions).resend == []  # running, and touched within the lease
    _age(sessions, first.evaluation_id, 2 * LEASE)
    assert _sweep(sessions).resend == [first.evaluation_id]
    assert (_row(sessions, first.evaluation_id).status, _row(sessions, first.evaluation_id).attempts) == ("queued", 1)
    second = EvaluationRunner(world.settings, sessions, world.store, first.evaluation_id)
    assert second._claim() is not None and second.attempt == 2


def test_a_live_heartbeat_keeps_the_sweeper_away_and_a_stopped_one_does_not(world, sessions, team, model_id) -> None:
    runner = EvaluationRunner(world.settings, sessions, world.store, _audit(sessions, team.id, model_id))
    assert runner._claim() is not None
    with Heartbeat(runner._touch, 0.1):
        time.sleep(1.2)  # four lease periods of 0.3 s with no progress report: only the heartbeat touches it
        assert _sweep(sessions, lease=0.3).resend == []
    time.sleep(0.6)
    assert _sweep(sessions, lease=0.3).resend == [runner.evaluation_id]


@pytest.fixture
def services(world) -> Iterator[Services]:
    services = Services.create(world.settings)
    yield services
    services.close()


def test_after_max_attempts_the_audit_fails_and_its_images_are_deleted(
    services, world, sessions, team, model_id
) -> None:
    dying = _audit(sessions, team.id, model_id, status=EvaluationStatus.RUNNING, attempts=ATTEMPTS, age=2 * LEASE)
    key = _row(sessions, dying).images_key
    world.store.put_stream(key, io.BytesIO(b"zip"), 3)
    assert dying not in sweep_once(services)
    row = _row(sessions, dying)
    assert (row.status, row.error_code, row.finished_at is not None) == ("failed", "attempts_exhausted", True)
    assert world.store.list(key) == []


def test_a_worker_presumed_dead_can_neither_finish_nor_delete_what_another_claimed(
    world, sessions, team, model_id, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluation_id = _audit(sessions, team.id, model_id)
    key = _row(sessions, evaluation_id).images_key
    world.store.put_stream(key, io.BytesIO(b"zip"), 3)
    stalled = EvaluationRunner(world.settings, sessions, world.store, evaluation_id)
    other = EvaluationRunner(world.settings, sessions, world.store, evaluation_id)

    def scored_while_another_worker_took_over(images_key: str, artifact_prefix: str) -> dict[str, Any]:
        _age(sessions, evaluation_id, 2 * LEASE)  # this worker stalled past its lease ...
        assert _sweep(sessions).resend == [evaluation_id]
        assert other._claim() is not None  # ... and another one claimed the audit
        return {"n": 2}

    monkeypatch.setattr(stalled, "_score", scored_while_another_worker_took_over)
    assert stalled.run() == "abandoned: another worker claimed it"
    row = _row(sessions, evaluation_id)
    assert (row.status, row.attempts, row.results) == ("running", 2, None)
    assert world.store.list(key) != []  # the other worker's images
    assert other._finish(EvaluationStatus.SUCCEEDED, results={"n": 2})
    assert _row(sessions, evaluation_id).status == "succeeded"


def test_finished_deliveries_past_their_retention_are_pruned_and_pending_ones_kept(sessions, team) -> None:
    now = utcnow()
    with sessions.begin() as session:
        hook = Webhook(team_id=team.id, url="https://example.com/h", events=["adaptation.succeeded"],
                       secret_encrypted="x")
        session.add(hook)
        session.flush()
        ages = {"old_delivered": (DeliveryStatus.DELIVERED, 40), "old_failed": (DeliveryStatus.FAILED, 40),
                "old_pending": (DeliveryStatus.PENDING, 40), "new_delivered": (DeliveryStatus.DELIVERED, 1)}
        ids = {}
        for name, (status, days) in ages.items():
            row = WebhookDelivery(webhook_id=hook.id, event_id=new_id("msg"), event_type="adaptation.succeeded",
                                  body="{}", status=status, created_at=now - timedelta(days=days))
            session.add(row)
            session.flush()
            ids[name] = row.id
    with sessions.begin() as session:
        assert prune_deliveries(session, older_than=now - timedelta(days=30)) == 2
    with sessions() as session:
        left = set(session.scalars(select(WebhookDelivery.id)))
    assert left == {ids["old_pending"], ids["new_delivered"]}
