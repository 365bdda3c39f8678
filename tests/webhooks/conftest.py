"""Webhook test fixtures: a real HTTP receiver on 127.0.0.1 that verifies Standard Webhooks signatures
with the `standardwebhooks` package, a service world whose dispatcher may call it, and a guard that
fails any test opening a connection to anything but loopback."""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks import Webhook as Verifier
from standardwebhooks.webhooks import WebhookVerificationError

# Fast retries and polling, and 127.0.0.1 allowed as a receiver.
WEBHOOK_SETTINGS: dict[str, Any] = {
    "webhook_allowed_hosts": ["127.0.0.1"],
    "webhook_retry_delays": [0.3] * 8,
    "webhook_poll_seconds": 0.1,
    "webhook_timeout_seconds": 2.0,
    "webhook_claim_seconds": 5.0,
    "max_webhooks_per_team": 3,
}


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Python-level connection in these tests must go to 127.0.0.1 or ::1."""
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            assert ipaddress.ip_address(address[0]).is_loopback, f"a test tried to connect to {address[0]}"
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool
    at: float

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server that answers each POST with the next of `answers` (then 200) and records it."""

    port: int
    secrets: list[str] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    redirect_to: str | None = None
    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {name.lower(): value for name, value in self.headers.items()}
                receiver.received.append(Received(headers, body, receiver.verify(body, headers), time.monotonic()))
                status = receiver.answers.pop(0) if receiver.answers else 200
                if receiver.redirect_to is not None:
                    status = 302
                self.send_response(status)
                if receiver.redirect_to is not None:
                    self.send_header("Location", receiver.redirect_to)
                payload = b"x" * 5000 if status >= 500 else b"ok"
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *_: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def verify(self, body: bytes, headers: dict[str, str]) -> bool:
        """Standard Webhooks verification, as a team's receiver would do it: any listed secret may match."""
        for secret in self.secrets:
            try:
                Verifier(secret).verify(body, headers)
                return True
            except WebhookVerificationError:
                continue
        return False

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"received {len(self.received)} of {count} deliveries"
            time.sleep(0.05)
        return self.received


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def make_receiver() -> Iterator[Callable[..., Receiver]]:
    """Receivers on free loopback ports; `start=False` leaves the port closed (a receiver that is down)."""
    made: list[Receiver] = []

    def make(*, start: bool = True, **fields: Any) -> Receiver:
        receiver = Receiver(port=free_port(), **fields)
        made.append(receiver)
        return receiver.start() if start else receiver

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture(scope="session")
def webhook_overrides() -> dict[str, Any]:
    return dict(WEBHOOK_SETTINGS)


@pytest.fixture(scope="session")
def make_webhook_settings(make_service_settings: Callable[..., Any]) -> Callable[[], Any]:
    """Each call: a world of its own (database, bucket) whose dispatchers may call 127.0.0.1 and retry fast."""
    return lambda: make_service_settings(**WEBHOOK_SETTINGS)


@pytest.fixture(scope="module")
def webhook_settings(make_webhook_settings: Callable[[], Any]) -> Any:
    return make_webhook_settings()


@pytest.fixture(scope="module")
def webhook_client(webhook_settings: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(webhook_settings)) as client:
        yield client


@pytest.fixture(scope="module")
def webhook_sessions(webhook_settings: Any) -> Iterator[Any]:
    from app.db.session import create_db_engine, create_session_factory

    engine = create_db_engine(webhook_settings)
    yield create_session_factory(engine)
    engine.dispose()


@pytest.fixture
def hook_team(webhook_sessions: Any, make_team: Callable[..., Any]) -> Any:
    return make_team(webhook_sessions)


@pytest.fixture
def hook_other_team(webhook_sessions: Any, make_team: Callable[..., Any]) -> Any:
    return make_team(webhook_sessions)
