"""Fixtures for the fault tests: every process or server they start is stopped at the end, pass or fail."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability_support import Process, RedisServer


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Every process a test registers here is stopped at its end."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path, unused_port: int) -> Iterator[RedisServer]:
    server = RedisServer(unused_port, tmp_path)
    server.start()
    yield server
    server.kill()
