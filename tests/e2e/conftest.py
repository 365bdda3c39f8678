"""Fixtures of the dashboard's browser tests: the app served over real HTTP on a loopback port, and a headless
Chromium that downloads into a folder of its own. Module-scoped: each browser test file gets one of each."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_support import CHROMEDRIVER, CHROMIUM


@pytest.fixture(scope="module")
def live_url(stack, unused_port_module: int) -> Iterator[str]:
    """The app on the stack's services, served over real HTTP by uvicorn in a thread."""
    import uvicorn

    from app.main import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(stack.settings), host="127.0.0.1", port=unused_port_module,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="dashboard-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{unused_port_module}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def unused_port_module() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[Any]:
    """Headless Chromium. Missing, it fails the run (scripts/setup.sh installs it): never a silent skip."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        pytest.fail(f"the browser test needs {missing}: run scripts/setup.sh (it installs chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads),
        "download.prompt_for_download": False,
        "safebrowsing.enabled": False,
    })
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()
