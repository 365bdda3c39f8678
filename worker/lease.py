"""The lease a worker holds on a running job: renewed by a thread, which also notices cancel requests.

A database restart must not kill a long run, so renewal failures are waited out; only a lease that ran out
while it could not be renewed means another worker may have the job now.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from app.db.jobs import renew_lease
from app.db.session import is_database_unavailable, transaction
from app.settings import Settings
from must_engine import AdaptCancelled
from worker.periodic import Periodic

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another worker owns the job now; this one must stop without touching the row."""


class LeaseKeeper(Periodic):
    """A thread that renews the lease every poll and notices cancel requests and lost leases."""

    def __init__(
        self, session_factory: sessionmaker[Session], adaptation_id: str, owner: str, settings: Settings
    ) -> None:
        super().__init__(min(settings.cancel_poll_seconds, settings.lease_seconds / 3), name=f"lease-{adaptation_id}")
        self.session_factory = session_factory
        self.adaptation_id = adaptation_id
        self.owner = owner
        self.lease_seconds = settings.lease_seconds
        self.cancel_requested = threading.Event()
        self.lease_lost = threading.Event()
        self._last_renewed = time.monotonic()

    def should_stop(self) -> bool:
        return self.cancel_requested.is_set() or self.lease_lost.is_set()

    def check(self) -> None:
        """Between stages: raise if the job should not go on."""
        if self.lease_lost.is_set():
            raise LeaseLost(self.adaptation_id)
        if self.cancel_requested.is_set():
            raise AdaptCancelled("cancelled")

    def tick(self) -> bool:
        """Renew the lease; False (the thread ends) once it is lost."""
        try:
            with transaction(self.session_factory) as session:
                state = renew_lease(session, self.adaptation_id, self.owner, self.lease_seconds)
        except Exception as exc:
            # A database restart must not kill a long run; only a lease that ran out while we
            # could not renew it means someone else may have the job now.
            if not is_database_unavailable(exc):
                log.exception("renewing the lease of %s failed", self.adaptation_id)
            if time.monotonic() - self._last_renewed > self.lease_seconds:
                self.lease_lost.set()
                return False
            return True
        self._last_renewed = time.monotonic()
        if not state.held:
            self.lease_lost.set()
            return False
        if state.cancel_requested:
            self.cancel_requested.set()
        return True
