"""Data flows one way: the API sends Celery tasks by name and never imports worker code (docs/DESIGN.md)."""

from __future__ import annotations

import subprocess
import sys


def test_the_api_imports_no_worker_module() -> None:
    probe = (
        "import sys, app.main, app.cli, app.queue\n"
        "loaded = sorted(m for m in sys.modules if m == 'worker' or m.startswith('worker.'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "", f"the API imported worker modules: {result.stdout.strip()}"


def test_the_worker_app_registers_the_task_names_the_api_sends() -> None:
    probe = (
        "from app.queue import RUN_ADAPTATION, RUN_EVALUATION\n"
        "from app.settings import Settings\n"
        "from worker.celery_app import create_worker_app\n"
        "app = create_worker_app(Settings())\n"
        "app.loader.import_default_modules()\n"
        "print(RUN_ADAPTATION in app.tasks, RUN_EVALUATION in app.tasks)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]
