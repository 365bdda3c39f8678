"""A background thread that does one small thing every few seconds while a job runs (a lease renewal, a
heartbeat), and stops when the job's `with` block ends."""

from __future__ import annotations

import threading
from typing import Self


class Periodic:
    """Calls `tick` every `interval` seconds on a daemon thread while the `with` block runs; a tick that
    returns False ends the thread early (the block itself goes on)."""

    def __init__(self, interval: float, name: str) -> None:
        self.interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def tick(self) -> bool:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            if not self.tick():
                return
