"""The sweeper: a loop in the API process that re-sends jobs no live worker holds.

It covers the two ways a job (an adaptation or an audit) can be stranded: its queue message was lost
(broker restart without persistence), or its worker died (the lease or heartbeat stops). Several API
processes may run it at once; each stranded job is claimed by one conditional UPDATE. It also deletes the
objects of uploads whose request died before its adaptation was committed, and webhook deliveries older
than their retention.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.db.audits import sweep_audits
from app.db.jobs import sweep
from app.db.models import PendingUpload, utcnow
from app.db.session import transaction
from app.intake import discard_upload
from app.queue import enqueue_adaptation, enqueue_evaluation
from app.services import Services
from app.webhooks.outbox import prune_deliveries

log = logging.getLogger(__name__)

STALE_STAGING_SECONDS = 24 * 3600


def sweep_once(services: Services) -> list[str]:
    """Re-send stranded jobs, delete abandoned uploads and old deliveries; returns the re-sent ids."""
    settings = services.settings
    with transaction(services.session_factory) as session:
        stranded = sweep(
            session, max_attempts=settings.max_attempts, requeue_after_seconds=settings.requeue_after_seconds
        )
    for adaptation_id in stranded:
        enqueue_adaptation(services.celery, adaptation_id)
    if stranded:
        log.info("re-enqueued %d stranded adaptations: %s", len(stranded), ", ".join(stranded))
    with transaction(services.session_factory) as session:
        audits = sweep_audits(session, lease_seconds=settings.lease_seconds,
                              requeue_after_seconds=settings.requeue_after_seconds, max_attempts=settings.max_attempts)
    for evaluation_id in audits.resend:
        enqueue_evaluation(services.celery, evaluation_id)
    for images_key in audits.given_up:
        services.store.delete_prefix(images_key)
    if audits.resend or audits.given_up:
        log.info("re-enqueued %d stranded audits, gave up on %d", len(audits.resend), len(audits.given_up))
    reap_abandoned_uploads(services)
    with transaction(services.session_factory) as session:
        pruned = prune_deliveries(session, older_than=utcnow() - timedelta(seconds=settings.webhook_retention_seconds))
    if pruned:
        log.info("deleted %d webhook deliveries past their retention", pruned)
    return [*stranded, *audits.resend]


def reap_abandoned_uploads(services: Services, batch: int = 100) -> None:
    cutoff = utcnow() - timedelta(seconds=services.settings.abandoned_upload_seconds)
    with services.session_factory() as session:
        prefixes = session.scalars(
            select(PendingUpload.prefix).where(PendingUpload.created_at < cutoff).limit(batch)
        ).all()
    for prefix in prefixes:
        discard_upload(services, prefix)
        log.info("deleted the abandoned upload %s", prefix)


async def run_sweeper(services: Services) -> None:
    """Sweep forever; an unreachable database or broker only delays the next sweep."""
    while True:
        await asyncio.sleep(services.settings.sweep_interval_seconds)
        try:
            await run_in_threadpool(sweep_once, services)
        except Exception as exc:
            log.warning("sweep failed: %s", exc)


def prune_staging(staging_dir: Path, max_age_seconds: float = STALE_STAGING_SECONDS) -> None:
    """Remove uploads left behind by a process killed mid-request (live ones are younger)."""
    if not staging_dir.is_dir():
        return
    cutoff = time.time() - max_age_seconds
    for entry in staging_dir.iterdir():
        if entry.stat().st_mtime >= cutoff:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
