"""Serving throughput: the in-process predictor against HTTP single-image requests, in one run.

Why: the HTTP path should deliver close to what the model can do. This starts `must serve` on embedded
defaults (loopback, temporary directory, as benchmarks/load_test.py does), adapts the shipped offline
model on a few DTD photos, downloads the artifact and then measures, on the same machine and artifact:

1. in process: `Predictor.load(artifact)` classifying the benchmark's JPEG bytes (`open_image` decode
   included) in batches of `--batch` images, with the server idle;
2. over HTTP: each of `--clients` (default 16, 64, 256) concurrent clients sends one image per
   `POST /models/{id}/classify` for `--duration` seconds; images/s, p50, p99, 429/503 answers and any
   other error; and the ratio HTTP / in-process.

The load generator runs on the same cores as the server (loopback), so HTTP figures include its cost.
The classify rate limit is raised for the self-started service (the limiter answers 429 by design).

    python -m benchmarks.serving --duration 20 --clients 16,64,256 [--workers 2] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sys
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.load_test import DEFAULT_IMAGES, Target, _percentile, _pick_images, embedded_service


@dataclass
class Run:
    clients: int
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    exceptions: Counter[str] = field(default_factory=Counter)


class InProcess:
    """The engine's Predictor on the served artifact, classifying JPEG bytes `batch` at a time."""

    def __init__(self, target: Target, jpegs: list[bytes], batch: int, device: str) -> None:
        from must_engine.predictor import Predictor

        response = httpx.get(f"{target.url}/models/{target.model_id}/artifact", headers=target.headers, timeout=60)
        response.raise_for_status()
        with tempfile.TemporaryDirectory(prefix="serving-bench-") as directory:
            with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
                archive.extractall(directory)
            self.predictor = Predictor.load(Path(directory) / target.model_id, device=device)
        self.images = [jpegs[i % len(jpegs)] for i in range(batch)]
        self.batch = batch
        for _ in range(2):
            self._call()

    def _call(self) -> None:
        from must_engine.images import open_image

        self.predictor.classify([open_image(data, filename="image.jpg") for data in self.images], top_k=2)

    def measure(self, seconds: float) -> tuple[float, float]:
        """(images/s, CPU ms per image) over about `seconds`, the server idle."""
        calls, started, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds:
            self._call()
            calls += 1
        images = calls * self.batch
        return images / (time.perf_counter() - started), (time.process_time() - cpu) * 1000 / images


def server_cpu_seconds(pid: int) -> float:
    """CPU time of the API process and its API workers (`--workers`), not of the embedded Celery worker."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if (entry.name == str(pid) or int(fields[1]) == pid) and b"celery" not in command:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def multipart_request(target: Target, image: bytes) -> bytes:
    """One keep-alive `POST /models/{id}/classify` with a single JPEG, encoded once up front."""
    boundary = "benchmark-boundary-7d1f"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n2\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="image.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode() + image + f"\r\n--{boundary}--\r\n".encode()
    host = target.url.split("://", 1)[1]
    head = (
        f"POST /models/{target.model_id}/classify HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {target.api_key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request on an open connection and read its whole answer; returns the status."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    await reader.readexactly(int(headers.get("content-length", "0")))
    if headers.get("connection", "").lower() == "close":
        raise ConnectionResetError("server closed the connection")
    return int(lines[0].split()[1])


async def _client(target: Target, requests: list[bytes], offset: int, stop_at: float, run: Run) -> None:
    """A keep-alive client on a raw socket: a few microseconds of client CPU per request, where httpx takes
    about a millisecond, which on a shared 2-core machine would be taken from the server."""
    host, port = target.url.split("://", 1)[1].rsplit(":", 1)
    index = offset
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        try:
            if connection is None:
                connection = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 60)
            status = await asyncio.wait_for(_exchange(*connection, requests[index % len(requests)]), 60)
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            run.exceptions[type(exc).__name__] += 1
            if connection is not None:
                connection[1].close()
            connection = None
            continue
        index += 1
        run.statuses[status] += 1
        if status == 200:
            run.latencies.append(time.perf_counter() - started)
    if connection is not None:
        connection[1].close()


async def http_run(target: Target, requests: list[bytes], clients: int, duration: float) -> tuple[Run, float]:
    run = Run(clients)
    started = time.monotonic()
    await asyncio.gather(*(_client(target, requests, i, started + duration, run) for i in range(clients)))
    return run, time.monotonic() - started


def summarise(run: Run, elapsed: float, reference: float, server_cpu_ms: float | None) -> dict[str, Any]:
    rate = len(run.latencies) / elapsed
    deliberate = run.statuses.get(429, 0) + run.statuses.get(503, 0)
    other = sum(count for status, count in run.statuses.items() if status not in (200, 429, 503))
    return {
        "clients": run.clients,
        "images_per_s": round(rate, 1),
        "p50_ms": round(_percentile(run.latencies, 0.50) * 1000, 1),
        "p99_ms": round(_percentile(run.latencies, 0.99) * 1000, 1),
        "ok": len(run.latencies),
        "refused_429_503": deliberate,
        "errors": other + sum(run.exceptions.values()),
        "error_kinds": {**{str(s): c for s, c in run.statuses.items() if s != 200}, **run.exceptions},
        "in_process_images_per_s": round(reference, 1),
        "http_over_in_process": round(rate / reference, 2) if reference else None,
        "server_cpu_ms_per_image": None if server_cpu_ms is None else round(server_cpu_ms, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per client count (default 20)")
    parser.add_argument("--clients", default="16,64,256", help="comma-separated client counts")
    parser.add_argument("--batch", type=int, default=32, help="images per in-process call (default 32)")
    parser.add_argument("--in-process-seconds", type=float, default=6.0, help="before each HTTP run (default 6)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--jpegs", type=int, default=32, help="distinct JPEGs the clients cycle through")
    parser.add_argument("--workers", type=int, default=1, help="`must serve --workers` (default 1)")
    parser.add_argument("--device", default="cpu", help="the server's MUST_DEVICE and the in-process device")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    counts = [int(part) for part in args.clients.split(",")]
    if args.duration <= 0 or not all(1 <= n <= 1024 for n in counts):
        parser.error("--duration must be positive and each client count in [1, 1024]")
    jpegs = [path.read_bytes() for path in _pick_images(args.images, args.jpegs)]
    extra = ["--workers", str(args.workers)] if args.workers != 1 else []
    rows = []
    with embedded_service(args.images, serve_args=extra, device=args.device) as target:
        requests = [multipart_request(target, image) for image in jpegs]
        reference = InProcess(target, jpegs, args.batch, args.device)
        asyncio.run(http_run(target, requests, 8, 3.0))  # warm every worker's predictor cache
        for clients in counts:
            # Measured right before each HTTP run: the CPU is shared, so a rate from minutes earlier would
            # not be comparable.
            rate, cpu_ms = reference.measure(args.in_process_seconds)
            print(f"# in process: {rate:.1f} images/s, {cpu_ms:.2f} CPU ms/image (batches of {args.batch}, "
                  f"JPEG bytes)", flush=True)
            cpu_before = server_cpu_seconds(target.server_pid) if target.server_pid else None
            run, elapsed = asyncio.run(http_run(target, requests, clients, args.duration))
            server_ms = None
            if cpu_before is not None and run.latencies and target.server_pid:
                server_ms = (server_cpu_seconds(target.server_pid) - cpu_before) * 1000 / len(run.latencies)
            rows.append({**summarise(run, elapsed, rate, server_ms), "in_process_cpu_ms_per_image": round(cpu_ms, 2)})
            print(f"# {clients} clients: {json.dumps(rows[-1])}", flush=True)
    print("| clients | images/s | p50 ms | p99 ms | 429/503 | errors | in-process images/s | HTTP / in-process "
          "| server CPU ms/image | in-process CPU ms/image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['clients']} | {row['images_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
              f"{row['refused_429_503']} | {row['errors']} | {row['in_process_images_per_s']} | "
              f"{row['http_over_in_process']} | {row['server_cpu_ms_per_image']} | "
              f"{row['in_process_cpu_ms_per_image']} |")
    result = {
        "command": "python -m benchmarks.serving " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end (the CPU is shared)",
        "http": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if any(row["errors"] for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
