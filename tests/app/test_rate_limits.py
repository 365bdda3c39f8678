"""Classify rate limits: one bucket per team across API processes when Redis is configured, per process
(and still enforced) when Redis cannot be reached, and `must serve --workers N` runs N API processes."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _statuses(client, team, count: int) -> list[int]:
    return [client.post("/classify", headers=team.headers, json={}).status_code for _ in range(count)]


def test_two_api_processes_share_one_bucket_through_redis(make_client, team) -> None:
    # Two apps = two sets of services, as two API processes would have; the tests' broker is Redis.
    limits = {"classify_requests_per_second": 0.01, "classify_burst": 3}
    with make_client(**limits) as one, make_client(**limits) as two:
        assert _statuses(one, team, 2) == [400, 400]  # bad bodies, but each took a token
        assert _statuses(two, team, 2) == [400, 429]  # per-process buckets would have answered 400 twice
        refused = one.post("/classify", headers=team.headers, json={})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1


def test_unreachable_redis_falls_back_to_a_per_process_bucket(make_client, team) -> None:
    with make_client(
        classify_requests_per_second=0.01, classify_burst=1, rate_limit_redis_url="redis://127.0.0.1:1/0"
    ) as limited:
        assert _statuses(limited, team, 2) == [400, 429]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(part) for part in text.split()]


def test_must_serve_workers_runs_api_processes_sharing_limits(tmp_path: Path, redis_url: str) -> None:
    must = str(Path(sys.executable).with_name("must"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MUST_")},
        "MUST_DATA_DIR": str(tmp_path),
        "MUST_DEVICE": "cpu",
        "MUST_RATE_LIMIT_REDIS_URL": redis_url,
        "MUST_CLASSIFY_REQUESTS_PER_SECOND": "0.01",
        "MUST_CLASSIFY_BURST": "4",
        "MUST_LOG_LEVEL": "WARNING",
    }
    port = _free_port()
    server = subprocess.Popen(
        [must, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2", "--no-worker"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "must serve --workers 2 did not start"
            time.sleep(0.5)
        workers = [pid for pid in _children(server.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 2
        created = subprocess.run(
            [must, "admin", "create-team", f"workers-{secrets.token_hex(3)}"],
            env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
        )  # fmt: skip
        headers = {"Authorization": f"Bearer {created.stdout.strip().splitlines()[-1]}"}
        # A new connection per request: the kernel spreads them over both processes; the bucket is one.
        statuses = [httpx.post(f"{url}/classify", headers=headers, json={}, timeout=30).status_code for _ in range(6)]
        assert statuses == [400, 400, 400, 400, 429, 429]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
