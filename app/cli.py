"""`must serve` and `must admin ...`, plugged into the engine's `must` command (entry point group
`must.commands`). Both read the same settings, so run from one directory they share `./var`.

The service modules are imported inside the handlers: every `must` invocation builds this parser, and
`must adapt` should not pay for importing the web stack.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from app.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

WORKER_STOP_SECONDS = 10.0
WORKER_RESTART_SECONDS = 5.0
PR_SET_PDEATHSIG = 1  # prctl(2)


def add_serve_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP API and a training worker",
        description="Run the API and a worker. With no MUST_* settings everything is embedded: SQLite, a "
        "local object store and a file-system broker under ./var (or MUST_DATA_DIR).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-worker", action="store_true", help="API only; workers run elsewhere")
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="API processes on this port (default 1); each keeps its own predictor cache and sweeper, and "
        "they share rate limits through Redis when Redis is configured",
    )
    parser.set_defaults(handler=serve)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_admin_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("admin", help="manage teams and API keys")
    commands = parser.add_subparsers(dest="admin_command", required=True)
    create_team = commands.add_parser("create-team", help="create a team and print its first API key")
    create_team.add_argument("name")
    create_team.set_defaults(handler=admin_create_team)
    create_key = commands.add_parser("create-key", help="print a new API key for an existing team")
    create_key.add_argument("team")
    create_key.set_defaults(handler=admin_create_key)
    revoke_key = commands.add_parser("revoke-key", help="revoke an API key by its id (key_...)")
    revoke_key.add_argument("key_id")
    revoke_key.set_defaults(handler=admin_revoke_key)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app
    from app.prestart import migrate

    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    migrate(settings)
    worker = None if args.no_worker else EmbeddedWorker(settings)
    if worker is not None:
        worker.start()
    options: dict[str, Any] = {"host": args.host, "port": args.port, "log_level": settings.log_level.lower()}
    try:
        if args.workers == 1:
            uvicorn.run(create_app(settings), **options)
        else:  # each process builds its own app from the same MUST_* environment
            # A spawned worker imports torch before it can answer uvicorn's health ping (5 s by default):
            # on a busy machine that is slower, and the supervisor would kill and respawn it forever.
            uvicorn.run(
                "app.main:create_app", factory=True, workers=args.workers, timeout_worker_healthcheck=120, **options
            )
    finally:
        if worker is not None:
            worker.stop()
    return 0


def _terminate_with_parent() -> None:
    """Linux: SIGTERM the worker when `must serve` dies, however it dies.

    uvicorn re-raises SIGTERM after its graceful shutdown, which ends the process before `finally` can stop
    the worker, and SIGKILL skips everything; without this the worker would outlive the service.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedWorker:
    """A Celery worker in a child process, restarted if it dies; it inherits the serve settings.

    A separate process keeps training off the API's interpreter (and its GIL). A job interrupted by a
    restart resumes from its last checkpoint once the sweeper re-sends it.
    """

    def __init__(self, settings: Settings) -> None:
        self.command = [
            sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
            "-Q", settings.training_queue, "--pool=solo", "--concurrency=1",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", settings.log_level, "--hostname", f"embedded-{os.getpid()}@{socket.gethostname()}",
        ]  # fmt: skip
        self.environment = {**os.environ, "MUST_DATA_DIR": str(settings.data_dir)}
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="embedded-worker", daemon=True)

    def start(self) -> None:
        self._spawn()
        self._supervisor.start()

    def _spawn(self) -> None:
        # A session of its own: Ctrl-C reaches `must serve`, which then stops the worker deliberately.
        self._process = subprocess.Popen(
            self.command, env=self.environment, start_new_session=True, preexec_fn=_terminate_with_parent
        )

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            assert self._process is not None
            code = self._process.wait()
            if self._stopping.wait(WORKER_RESTART_SECONDS):
                return
            log.warning("embedded worker exited with %s; restarting it", code)
            self._spawn()

    def stop(self) -> None:
        self._stopping.set()
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _admin_session() -> AbstractContextManager[Session]:
    from app.db.session import create_db_engine, create_session_factory, transaction
    from app.prestart import migrate

    settings = get_settings()
    migrate(settings)
    return transaction(create_session_factory(create_db_engine(settings)))


def admin_create_team(args: argparse.Namespace) -> int:
    from app.auth import TeamError, create_team

    try:
        with _admin_session() as session:
            team, key = create_team(session, args.name)
    except TeamError as exc:
        print(f"must admin: {exc}", file=sys.stderr)
        return 1
    print(f"created team {team.name!r} ({team.id})")
    print("API key (stored hashed, shown only now):")
    print(key)
    return 0


def admin_create_key(args: argparse.Namespace) -> int:
    from app.auth import TeamError, find_team, issue_api_key

    try:
        with _admin_session() as session:
            team = find_team(session, args.team)
            key = issue_api_key(session, team)
    except TeamError as exc:
        print(f"must admin: {exc}", file=sys.stderr)
        return 1
    print(f"new API key for team {team.name!r} (stored hashed, shown only now):")
    print(key)
    return 0


def admin_revoke_key(args: argparse.Namespace) -> int:
    from app.auth import revoke_api_key

    with _admin_session() as session:
        revoked = revoke_api_key(session, args.key_id)
    if not revoked:
        print(f"must admin: no active key {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0
