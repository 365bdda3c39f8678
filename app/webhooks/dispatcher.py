"""The dispatcher: a thread in each API process that sends due outbox rows on a small pool of its own.

It never runs on the event loop or the request thread pool, and each attempt is bounded by short
timeouts, so a slow or dead receiver holds one sender thread for a while and nothing else; the training
worker never sends anything.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Webhook, WebhookDelivery, utcnow
from app.db.session import transaction
from app.settings import Settings
from app.webhooks.outbox import Outcome, claim_due, settle_attempt
from app.webhooks.sender import post
from app.webhooks.signing import SecretBox, SecretUnreadable, sign
from app.webhooks.urls import WebhookUrlError, validate_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Message:
    """What one attempt sends, read from the database before any network I/O."""

    delivery_id: str
    url: str
    event_id: str
    event_type: str
    body: str
    encrypted_secrets: tuple[str, ...]


class Dispatcher:
    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], box: SecretBox) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.box = box
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stopped = threading.Event()
        self._pool = ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="webhook-send")
        self._in_flight: set[Future[None]] = set()
        self._thread = threading.Thread(target=self._run, name="webhook-dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming; attempts in flight finish (bounded by their timeouts). Safe to call twice."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=True)

    def _run(self) -> None:
        while not self._stopped.wait(self.settings.webhook_poll_seconds):
            try:
                self.dispatch_due()
            except Exception as exc:  # the database may be away; the outbox waits for it
                log.warning("webhook dispatch failed: %s", exc)

    def dispatch_due(self) -> int:
        """Claim as many due deliveries as there are idle senders and start them; returns how many."""
        self._in_flight = {future for future in self._in_flight if not future.done()}
        free = self.settings.webhook_concurrency - len(self._in_flight)
        if free <= 0:
            return 0
        with transaction(self.session_factory) as session:
            claimed = claim_due(session, self.owner, self.settings.webhook_claim_seconds, free)
        for delivery_id in claimed:
            self._in_flight.add(self._pool.submit(self._attempt, delivery_id))
        return len(claimed)

    def _attempt(self, delivery_id: str) -> None:
        try:
            message = self._load(delivery_id)
            if message is None:
                return
            outcome = self._send(message)
            with transaction(self.session_factory) as session:
                settle_attempt(session, delivery_id, self.owner, outcome, self.settings.webhook_retry_delays)
            if outcome.delivered:
                log.info("webhook %s (%s) delivered to %s", message.event_id, message.event_type, message.url)
            else:
                log.info("webhook %s to %s failed: %s", message.event_id, message.url, outcome.error_message)
        except Exception:
            # The claim expires and another attempt follows; nothing is lost.
            log.exception("webhook delivery %s could not be attempted", delivery_id)

    def _load(self, delivery_id: str) -> Message | None:
        with self.session_factory() as session:
            delivery = session.get(WebhookDelivery, delivery_id)
            hook = session.get(Webhook, delivery.webhook_id) if delivery is not None else None
            if delivery is None or hook is None:
                return None
            encrypted = [hook.secret_encrypted]
            expires = hook.previous_secret_expires_at
            if hook.previous_secret_encrypted is not None and expires is not None and expires > utcnow():
                encrypted.append(hook.previous_secret_encrypted)
            return Message(
                delivery_id, hook.url, delivery.event_id, delivery.event_type, delivery.body, tuple(encrypted)
            )

    def _send(self, message: Message) -> Outcome:
        """Check the URL again (DNS may have changed since registration), sign, and POST once."""
        try:
            target = validate_url(message.url, self.settings.webhook_allowed_hosts)
            secrets = [self.box.decrypt(token) for token in message.encrypted_secrets]
        except WebhookUrlError as exc:
            return Outcome(error_code=exc.code, error_message=exc.message)
        except SecretUnreadable as exc:
            return Outcome(error_code="secret_unreadable", error_message=str(exc))
        timestamp = int(time.time())
        headers = {
            "webhook-id": message.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(
                sign(secret, message.event_id, timestamp, message.body) for secret in secrets
            ),
        }
        return post(target, headers, message.body, self.settings.webhook_timeout_seconds)
