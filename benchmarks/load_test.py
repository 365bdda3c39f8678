"""Bounded loopback load test: concurrent clients classifying with an adapted model and polling job status.

Self-contained by default: it starts `must serve` on embedded defaults (SQLite, local object store,
file-system broker, embedded worker) in a temporary directory on 127.0.0.1, creates a team, adapts the
shipped offline base model on a few real DTD photos, then runs the load for a fixed duration and stops
everything it started. Point it at a running service with --url/--api-key/--model-id/--adaptation-id.

Half the clients classify one image per request with the adapted model; the other half poll
`GET /adaptations/{id}`. Reported: requests/s, p50/p99 latency per kind, and every non-2xx status
(5xx must be zero). The per-team classify rate limit is raised for the self-started service, since the
point is the serving path, not the limiter (which answers 429 by design).

    python -m benchmarks.load_test --duration 60 --clients 50
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks import SHARED_DATASETS

DEFAULT_IMAGES = SHARED_DATASETS / "dtd10"
CLASS_NAMES = ["banded", "blotchy"]
TINY_JOB = {"epochs": 1, "batch_size": 8, "num_workers": 0}


@dataclass
class Target:
    url: str
    api_key: str
    model_id: str
    adaptation_id: str
    server_pid: int | None = None  # known when this script started the service

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@dataclass
class Samples:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"classify": [], "status": []})
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pick_images(root: Path, count: int) -> list[Path]:
    folders = [root / name for name in CLASS_NAMES]
    per_class = [sorted(folder.glob("*.jpg")) for folder in folders]
    picked = [images[i] for i in range(count) for images in per_class if i < len(images)][:count]
    if len(picked) < count:
        raise SystemExit(f"need {count} images under {root}/{{{','.join(CLASS_NAMES)}}}")
    return picked


@contextmanager
def embedded_service(images: Path, serve_args: list[str] | None = None, device: str = "cpu") -> Iterator[Target]:
    """`must serve` with its worker in a temporary data dir, plus a team and a freshly adapted model."""
    must = str(Path(sys.executable).with_name("must"))
    with tempfile.TemporaryDirectory(prefix="must-load-") as directory:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MUST_")},
            "MUST_DATA_DIR": directory,
            "MUST_DEVICE": device,
            "MUST_MIN_IMAGES": "8",
            "MUST_CLASSIFY_REQUESTS_PER_SECOND": "1000000",
            "MUST_CLASSIFY_BURST": "1000000",
            "MUST_LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
        }
        port = _free_port()
        log = open(Path(directory) / "serve.log", "wb")  # noqa: SIM115 (closed in finally)
        server = subprocess.Popen(
            [must, "serve", "--host", "127.0.0.1", "--port", str(port), *(serve_args or [])],
            env=env, cwd=directory, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            _wait(lambda: _healthy(url), 120, "must serve to start")
            created = subprocess.run(
                [must, "admin", "create-team", f"load-{secrets.token_hex(3)}"],
                env=env, cwd=directory, capture_output=True, text=True, check=True,
            )  # fmt: skip
            api_key = created.stdout.strip().splitlines()[-1]
            model_id, adaptation_id = _adapt(url, api_key, _pick_images(images, 16))
            yield Target(url, api_key, model_id, adaptation_id, server.pid)
        finally:
            server.send_signal(signal.SIGTERM)  # must serve stops its own worker
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def _adapt(url: str, api_key: str, paths: list[Path]) -> tuple[str, str]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index, path in enumerate(paths):
            archive.write(path, f"{index:03d}.jpg")
    headers = {"Authorization": f"Bearer {api_key}"}
    data = {"class_names": json.dumps(CLASS_NAMES), "config": json.dumps(TINY_JOB)}
    files = {"images": ("images.zip", buffer.getvalue(), "application/zip")}
    response = httpx.post(f"{url}/adaptations", headers=headers, data=data, files=files, timeout=60)
    response.raise_for_status()
    adaptation_id = response.json()["id"]
    state: dict[str, Any] = {}

    def finished() -> bool:
        state.update(httpx.get(f"{url}/adaptations/{adaptation_id}", headers=headers, timeout=10).json())
        return state["status"] in ("succeeded", "failed", "cancelled")

    _wait(finished, 600, "the adaptation to finish")
    if state["status"] != "succeeded":
        raise SystemExit(f"adaptation {adaptation_id} ended {state['status']}: {state.get('error')}")
    return str(state["model_id"]), str(adaptation_id)


async def _client(index: int, target: Target, image: bytes, stop_at: float, samples: Samples) -> None:
    kind = "classify" if index % 2 == 0 else "status"
    async with httpx.AsyncClient(base_url=target.url, headers=target.headers, timeout=30) as client:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                if kind == "classify":
                    response = await client.post(
                        f"/models/{target.model_id}/classify",
                        files={"images": ("image.jpg", image, "image/jpeg")},
                        data={"top_k": "2"},
                    )
                else:
                    response = await client.get(f"/adaptations/{target.adaptation_id}")
            except httpx.HTTPError as exc:
                samples.errors[type(exc).__name__] += 1
                continue
            samples.latencies[kind].append(time.perf_counter() - started)
            samples.statuses[(kind, response.status_code)] += 1


async def run_load(target: Target, image: bytes, clients: int, duration: float) -> tuple[Samples, float]:
    samples = Samples()
    # Warm the predictor cache so the first classify does not count the model load.
    async with httpx.AsyncClient(base_url=target.url, headers=target.headers, timeout=120) as client:
        warm = await client.post(
            f"/models/{target.model_id}/classify", files={"images": ("image.jpg", image, "image/jpeg")}
        )
        warm.raise_for_status()
    started = time.monotonic()
    await asyncio.gather(*(_client(i, target, image, started + duration, samples) for i in range(clients)))
    return samples, time.monotonic() - started


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def report(samples: Samples, elapsed: float, clients: int, command: str) -> dict[str, Any]:
    kinds = {}
    for kind, values in samples.latencies.items():
        kinds[kind] = {
            "requests": len(values),
            "throughput_rps": round(len(values) / elapsed, 1),
            "p50_ms": round(_percentile(values, 0.50) * 1000, 1),
            "p99_ms": round(_percentile(values, 0.99) * 1000, 1),
        }
    server_errors = sum(count for (_, status), count in samples.statuses.items() if status >= 500)
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "clients": clients,
        "duration_s": round(elapsed, 1),
        "total_rps": round(sum(len(v) for v in samples.latencies.values()) / elapsed, 1),
        "by_kind": kinds,
        "statuses": {f"{kind} {status}": count for (kind, status), count in sorted(samples.statuses.items())},
        "server_errors_5xx": server_errors,
        "client_errors": dict(samples.errors),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="DTD-style folder for the job")
    parser.add_argument("--url", help="a running service (default: start `must serve` on loopback)")
    parser.add_argument("--api-key")
    parser.add_argument("--model-id")
    parser.add_argument("--adaptation-id")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.duration > 3600 or not 1 <= args.clients <= 1000:
        parser.error("--duration must be in (0, 3600] and --clients in [1, 1000]")
    image = _pick_images(args.images, 1)[0].read_bytes()
    command = "python -m benchmarks.load_test " + " ".join(argv if argv is not None else sys.argv[1:])

    def load(target: Target) -> dict[str, Any]:
        samples, elapsed = asyncio.run(run_load(target, image, args.clients, args.duration))
        return report(samples, elapsed, args.clients, command)

    if args.url:
        if not (args.api_key and args.model_id and args.adaptation_id):
            parser.error("--url needs --api-key, --model-id and --adaptation-id")
        result = load(Target(args.url.rstrip("/"), args.api_key, args.model_id, args.adaptation_id))
    else:
        with embedded_service(args.images) as target:
            result = load(target)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if result["server_errors_5xx"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
