"""The job row's state machine on PostgreSQL: leases, cancellation and the sweeper, without a worker."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.jobs import (
    acquire_lease,
    finish_leased,
    renew_lease,
    request_cancel,
    succeed_leased,
    sweep,
)
from app.db.models import Adaptation, AdaptationEvent, AdaptationStatus, Model, new_id, utcnow
from app.storage import ObjectStore

MAX_ATTEMPTS = 3


@pytest.fixture
def session_factory(world) -> sessionmaker[Session]:
    """A database per test: a sweep reads every row, so rows other tests leave would decide what it returns."""
    return world.session_factory


@pytest.fixture
def store(world) -> ObjectStore:
    return world.store


def _insert_job(session_factory: sessionmaker[Session], team_id: str, requeue_at: datetime) -> str:
    with session_factory.begin() as session:
        row = Adaptation(
            team_id=team_id,
            request_sha256="0" * 64,
            class_names=["a", "b"],
            base_model="proxy-cifar10-tiny",
            config_request={},
            source_bucket="b",
            source_prefix="p/",
            requeue_at=requeue_at,
        )
        session.add(row)
        session.flush()
        return row.id


@pytest.fixture
def job(session_factory: sessionmaker[Session], team) -> str:
    """A queued adaptation row, as the API inserts it."""
    return _insert_job(session_factory, team.id, utcnow() + timedelta(hours=1))


def _row(session_factory: sessionmaker[Session], job: str) -> Adaptation:
    with session_factory() as session:
        return session.get_one(Adaptation, job)


def _expire(session_factory: sessionmaker[Session], job: str, **values: object) -> None:
    past = utcnow() - timedelta(seconds=1)
    with session_factory.begin() as session:
        session.execute(
            update(Adaptation).where(Adaptation.id == job).values(lease_expires_at=past, requeue_at=past, **values)
        )


def test_only_one_worker_holds_a_lease(session_factory: sessionmaker[Session], job: str) -> None:
    with session_factory.begin() as session:
        assert acquire_lease(session, job, "worker-a", 60)
    with session_factory.begin() as session:
        assert not acquire_lease(session, job, "worker-b", 60)  # a redelivered message
    row = _row(session_factory, job)
    assert (row.status, row.lease_owner, row.attempts) == ("validating", "worker-a", 1)
    with session_factory.begin() as session:
        assert renew_lease(session, job, "worker-a", 60).held
        assert not renew_lease(session, job, "worker-b", 60).held


def test_an_expired_lease_passes_to_the_next_worker(session_factory: sessionmaker[Session], job: str) -> None:
    with session_factory.begin() as session:
        acquire_lease(session, job, "worker-a", 60)
    _expire(session_factory, job)
    with session_factory.begin() as session:
        assert acquire_lease(session, job, "worker-b", 60)
    row = _row(session_factory, job)
    assert (row.lease_owner, row.attempts) == ("worker-b", 2)
    with session_factory.begin() as session:  # the old worker wakes up: all its writes are refused
        assert not renew_lease(session, job, "worker-a", 60).held
        assert not finish_leased(session, job, "worker-a", AdaptationStatus.FAILED, "late")


def test_cancel_a_queued_job_at_once(session_factory: sessionmaker[Session], job: str) -> None:
    with session_factory.begin() as session:
        request_cancel(session, job)
    row = _row(session_factory, job)
    assert row.status == "cancelled" and row.finished_at is not None
    with session_factory.begin() as session:
        assert not acquire_lease(session, job, "worker-a", 60)


def test_cancel_a_running_job_via_its_worker(session_factory: sessionmaker[Session], job: str) -> None:
    with session_factory.begin() as session:
        acquire_lease(session, job, "worker-a", 60)
    with session_factory.begin() as session:
        request_cancel(session, job)
    assert _row(session_factory, job).status == "validating"
    with session_factory.begin() as session:
        assert renew_lease(session, job, "worker-a", 60).cancel_requested
    with session_factory.begin() as session:  # training finished just as the cancel arrived: cancel wins
        model = Model(
            team_id=_row(session_factory, job).team_id,
            adaptation_id=job,
            class_names=["a", "b"],
            base_model="x",
            artifact_prefix="p/",
        )
        assert not succeed_leased(session, job, "worker-a", model)
    with session_factory() as session:
        assert session.scalar(select(Model).where(Model.adaptation_id == job)) is None


def test_sweeper_resends_stranded_jobs_once_per_interval(session_factory: sessionmaker[Session], job: str) -> None:
    with session_factory.begin() as session:
        assert job not in sweep(session, max_attempts=MAX_ATTEMPTS, requeue_after_seconds=60)  # not due yet
    _expire(session_factory, job)
    with session_factory.begin() as session:
        first = sweep(session, max_attempts=MAX_ATTEMPTS, requeue_after_seconds=60)
    with session_factory.begin() as session:
        second = sweep(session, max_attempts=MAX_ATTEMPTS, requeue_after_seconds=60)
    assert job in first and job not in second
    assert _row(session_factory, job).status == "queued"


def test_sweeper_reaches_new_jobs_while_old_ones_keep_coming_due(session_factory: sessionmaker[Session], team) -> None:
    """Re-sent jobs go to the back of the line: a batch smaller than the backlog still reaches every job."""
    long_ago = utcnow() - timedelta(hours=1)
    older = [_insert_job(session_factory, team.id, long_ago) for _ in range(4)]
    job = _insert_job(session_factory, team.id, utcnow() - timedelta(seconds=1))  # the newest id
    resent: list[list[str]] = []
    for _ in range(3):
        with session_factory.begin() as session:
            # requeue_after 0: what is re-sent is due again at once, as when re-sends keep failing.
            resent.append(sweep(session, max_attempts=MAX_ATTEMPTS, requeue_after_seconds=0, batch=2))
    assert resent[0] == older[:2] and resent[1] == older[2:]
    assert resent[2] == [job, older[0]], "the newest job waited behind jobs that had just been re-sent"


def test_sweeper_gives_up_after_max_attempts(session_factory: sessionmaker[Session], job: str) -> None:
    with session_factory.begin() as session:
        acquire_lease(session, job, "worker-a", 60)
    _expire(session_factory, job, attempts=MAX_ATTEMPTS)
    with session_factory.begin() as session:
        assert job not in sweep(session, max_attempts=MAX_ATTEMPTS, requeue_after_seconds=60)
    row = _row(session_factory, job)
    assert (row.status, row.error_code) == ("failed", "attempts_exhausted")
    with session_factory() as session:
        types = [
            event.type
            for event in session.scalars(
                select(AdaptationEvent).where(AdaptationEvent.adaptation_id == job).order_by(AdaptationEvent.id)
            )
        ]
    assert types[-2:] == ["error", "status"]


def test_sweeper_finishes_a_cancel_whose_worker_died(session_factory: sessionmaker[Session], job: str) -> None:
    with session_factory.begin() as session:
        acquire_lease(session, job, "worker-a", 60)
        request_cancel(session, job)
    _expire(session_factory, job)
    with session_factory.begin() as session:
        assert job not in sweep(session, max_attempts=MAX_ATTEMPTS, requeue_after_seconds=60)
    assert _row(session_factory, job).status == "cancelled"


def test_ids_sort_by_creation_time() -> None:
    ids = [new_id("ada") for _ in range(50)]
    assert all(len(value) == 32 for value in ids)
    assert [value[:16] for value in ids] == sorted(value[:16] for value in ids)


def test_abandoned_uploads_are_deleted_by_the_sweeper(
    world, session_factory: sessionmaker[Session], store, team
) -> None:
    """What an API process killed between writing objects and committing the adaptation leaves behind."""
    import io

    from app.db.models import PendingUpload
    from app.services import Services
    from app.sweeper import sweep_once

    abandoned, in_flight = (
        f"teams/{team.id}/adaptations/ada_dead/upload/",
        f"teams/{team.id}/adaptations/ada_live/upload/",
    )
    with session_factory.begin() as session:
        session.add(PendingUpload(prefix=abandoned, created_at=utcnow() - timedelta(hours=2)))
        session.add(PendingUpload(prefix=in_flight))
    for prefix in (abandoned, in_flight):
        store.put_stream(prefix + "images.zip", io.BytesIO(b"zip"), 3)
    services = Services.create(world.settings.model_copy(update={"abandoned_upload_seconds": 3600}))
    try:
        sweep_once(services)
    finally:
        services.close()
    assert store.list(abandoned) == [] and len(store.list(in_flight)) == 1
    with session_factory() as session:
        assert set(session.scalars(select(PendingUpload.prefix))) == {in_flight}
        assert session.get(PendingUpload, abandoned) is None
