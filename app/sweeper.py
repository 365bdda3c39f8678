"""The sweeper: a loop in the API process that re-sends jobs no live worker holds.

It covers the two ways a job can be stranded: its queue message was lost (broker restart without
persistence), or its worker died (the lease stops being renewed). Several API processes may run it at
once; each stranded job is claimed by one conditional UPDATE. It also deletes the objects of uploads
whose request died before its adaptation was committed.
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

from app.db.jobs import sweep
from app.db.models import PendingUpload, utcnow
from app.db.session import transaction
from app.intake import discard_upload
from app.queue import enqueue_adaptation
from app.services import Services

log = logging.getLogger(__name__)

STALE_STAGING_SECONDS = 24 * 3600


def sweep_once(services: Services) -> list[str]:
    """Re-send stranded jobs and delete abandoned uploads; returns the re-sent ids."""
    settings = services.settings
    with transaction(services.session_factory) as session:
        stranded = sweep(
            session, max_attempts=settings.max_attempts, requeue_after_seconds=settings.requeue_after_seconds
        )
    for adaptation_id in stranded:
        enqueue_adaptation(services.celery, adaptation_id)
    if stranded:
        log.info("re-enqueued %d stranded adaptations: %s", len(stranded), ", ".join(stranded))
    reap_abandoned_uploads(services)
    return stranded


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
