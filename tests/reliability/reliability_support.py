"""Real processes for the fault tests: Celery workers, `must serve`, a private redis-server and a TCP
proxy in front of PostgreSQL, each started and killed by the test (by pid, never by name)."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from app.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]


def service_env(settings: Settings) -> dict[str, str]:
    """The `MUST_*` environment that makes a subprocess use exactly these settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MUST_")}
    for name, value in settings.model_dump().items():
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, list):
            value = ",".join(str(item) for item in value)
        env[f"MUST_{name.upper()}"] = str(value)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(interval)


class Process:
    """A child in its own session with its output in a log file; `kill()` is SIGKILL to its pid only."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._sink = log.open("ab")
        self.process = subprocess.Popen(
            command, env=env, cwd=REPO_ROOT, stdout=self._sink, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._sink.close()

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self.kill()


def start_worker(settings: Settings, log: Path, name: str) -> Process:
    """A real Celery worker process (as deployed: solo pool, one job at a time), ready to consume."""
    command = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
        "-Q", settings.training_queue, "--pool=solo", "--concurrency=1",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel", "INFO", "--hostname", f"{name}@reliability",
    ]  # fmt: skip
    worker = Process(command, service_env(settings), log)
    wait_until(lambda: " ready." in worker.output() or not worker.alive(), 90, f"worker {name} to start")
    assert worker.alive(), worker.output()[-3000:]
    return worker


def start_api(settings: Settings, port: int, log: Path) -> Process:
    """`must serve --no-worker` on loopback, up when /healthz answers."""
    command = [str(Path(sys.executable).with_name("must")), "serve", "--no-worker", "--host", "127.0.0.1"]
    api = Process([*command, "--port", str(port)], service_env(settings), log)

    def healthy() -> bool:
        if not api.alive():
            return True
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        return False

    wait_until(healthy, 60, "the API to start", interval=0.2)
    assert api.alive(), api.output()[-3000:]
    return api


class RedisServer:
    """A private, non-persistent redis-server on its own port: restarting it disturbs nobody."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.directory),
        ]  # fmt: skip
        self.process = Process(command, dict(os.environ), self.directory / "redis.log")

        def up() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
            return False

        wait_until(up, 20, "redis-server")

    def kill(self) -> None:
        """SIGKILL: no persistence, so every queued message is gone, as after a crash of a cache node."""
        if self.process is not None:
            self.process.kill()
            self.process = None


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; `down()` closes the listener and every open connection,
    which is what clients see when the database host goes away; `up()` listens again on the same port."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self.target = target
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._running = threading.Event()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._running.set()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        self._running.clear()
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept() (close alone does not)
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while self._running.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if not self._running.is_set():
                client.close()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(a, selectors.EVENT_READ, b)
        selector.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in selector.select(timeout=1):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            selector.close()
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
