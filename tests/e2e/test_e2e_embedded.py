"""The embedded mode end to end, as a user runs it: `must admin create-team` and `must serve` from one
directory (state in its ./var: SQLite, a local object store, a file-system broker, a worker subprocess),
then an adaptation and a classification over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

MUST = str(Path(sys.executable).with_name("must"))


def _environment() -> dict[str, str]:
    """The caller's environment without any MUST_* setting: embedded defaults only."""
    return {name: value for name, value in os.environ.items() if not name.startswith("MUST_")}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@contextmanager
def _serving(workdir: Path, port: int, settings: dict[str, str] | None = None) -> Iterator[str]:
    """`must serve` from workdir on embedded defaults (plus `settings`), until it is ready; stopped with Ctrl-C."""
    log = (workdir / "serve.log").open("wb")
    process = subprocess.Popen(
        [MUST, "serve", "--port", str(port)],
        cwd=workdir,
        env={**_environment(), **(settings or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (workdir / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "must serve did not become ready"
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(timeout=60) == 0, (workdir / "serve.log").read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
            log.close()


@pytest.fixture
def server(workdir: Path, unused_port: int) -> Iterator[str]:
    with _serving(workdir, unused_port) as url:
        yield url


def _create_team(workdir: Path) -> dict[str, str]:
    created = subprocess.run(
        [MUST, "admin", "create-team", "embedded-team"],
        cwd=workdir,
        env=_environment(),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("mk_")
    return {"Authorization": f"Bearer {key}"}


def test_embedded_service_adapts_and_classifies(
    server: str, workdir: Path, dtd_images, base_model: str, tiny_config: dict
) -> None:
    headers = _create_team(workdir)
    assert (workdir / "var" / "must.db").is_file(), "admin and serve share ./var"

    with httpx.Client(base_url=server, headers=headers, timeout=60) as client:
        response = client.post(
            "/adaptations",
            data={
                "class_names": json.dumps(["banded", "blotchy"]),
                "base_model": base_model,
                "config": json.dumps(tiny_config),
            },
            files={"images": ("textures.zip", dtd_images.zip(dtd_images.paths(16)), "application/zip")},
        )
        assert response.status_code == 202, response.text
        adaptation_id = response.json()["id"]

        deadline = time.monotonic() + 300
        while (body := client.get(f"/adaptations/{adaptation_id}").json())["status"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            assert time.monotonic() < deadline, body
            time.sleep(1)
        assert body["status"] == "succeeded", (body, (workdir / "serve.log").read_text()[-3000:])

        image = dtd_images.paths(1)[0]
        classified = client.post(
            f"/models/{body['model_id']}/classify", files=[("images", (image.name, image.read_bytes(), "image/jpeg"))]
        )
        assert classified.status_code == 200, classified.text
        labels = [p["label"] for p in classified.json()["results"][0]["predictions"]]
        assert sorted(labels) == ["banded", "blotchy"]

        # Evidence: labels for the whole bucket, the report, an audit (SQLite, local store, file broker).
        streamed = client.get(f"/adaptations/{adaptation_id}/predictions", params={"format": "jsonl"})
        rows = [json.loads(line) for line in streamed.text.splitlines()]
        assert sorted(row["image"] for row in rows) == sorted(f"{p.parent.name}/{p.name}" for p in dtd_images.paths(16))
        # The dashboard and its gallery's thumbnails, on the local object store (the zip copied under ./var).
        assert "<title>MUST dashboard</title>" in client.get("/").text
        thumb = client.get(f"/adaptations/{adaptation_id}/images", params={"name": rows[0]["image"], "size": 64})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg", thumb.text
        assert (workdir / "var" / "gallery").is_dir()
        report = client.get(f"/models/{body['model_id']}").json()["report"]
        assert report["num_images"] == 16 and report["estimated_top1"]["measured_error"]["mae_points"] > 0
        audit = client.post(f"/models/{body['model_id']}/evaluations",
                            files={"images": ("audit.zip", dtd_images.zip(dtd_images.paths(6)), "application/zip")})
        assert audit.status_code == 202, audit.text
        while (scored := client.get(f"/models/{body['model_id']}/evaluations/{audit.json()['id']}").json())[
            "status"
        ] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, scored
            time.sleep(1)
        assert scored["status"] == "succeeded" and scored["n"] == 6, scored
        assert 0 <= scored["adapted"]["top1"] <= 1 and scored["zero_shot"]["n"] == 6

    objects = workdir / "var" / "objects"
    assert sorted(path.name for path in objects.rglob("*") if path.is_file() and "models" in path.parts) == [
        "metadata.json",
        "model.safetensors",
    ]
    assert not any(path.is_file() for path in objects.rglob("*") if "evaluations" in path.parts)
    assert sorted(p.name for p in workdir.iterdir() if p.is_dir()) == ["var"], "all state lives under ./var"


def test_the_embedded_worker_trains_a_job_on_two_processes(
    workdir: Path, unused_port: int, dtd_images, base_model: str, tiny_config: dict
) -> None:
    """MUST_GPUS_PER_JOB=2 on a host without GPUs: two gloo ranks train one job, the worker records it once;
    a job whose batch does not split over two trains on one instead of failing."""
    headers = _create_team(workdir)
    with _serving(workdir, unused_port, {"MUST_GPUS_PER_JOB": "2"}) as url, \
            httpx.Client(base_url=url, headers=headers, timeout=60) as client:

        def adapt(config: dict) -> tuple[dict, list[dict]]:
            response = client.post(
                "/adaptations",
                data={"class_names": json.dumps(["banded", "blotchy"]), "base_model": base_model,
                      "config": json.dumps(config)},
                files={"images": ("textures.zip", dtd_images.zip(dtd_images.paths(16)), "application/zip")},
            )
            assert response.status_code == 202, response.text
            adaptation_id = response.json()["id"]
            deadline = time.monotonic() + 300
            while (body := client.get(f"/adaptations/{adaptation_id}").json())["status"] not in (
                "succeeded", "failed", "cancelled",
            ):
                assert time.monotonic() < deadline, body
                time.sleep(1)
            assert body["status"] == "succeeded", (body, (workdir / "serve.log").read_text()[-3000:])
            events = client.get(f"/adaptations/{adaptation_id}/events", params={"limit": 1000}).json()["data"]
            return body, events

        body, events = adapt({**tiny_config, "epochs": 2})
        assert body["progress"]["step"] == body["progress"]["total_steps"] == 4 and body["attempts"] == 1
        messages = [event["message"] or "" for event in events]
        assert any("4 steps of 8 images on 2 x cpu (gloo)" in message for message in messages), messages
        assert not any("does not split" in message for message in messages), messages
        progress = [event["data"]["step"] for event in events if "step" in (event["data"] or {})
                    and event["type"] == "progress"]
        assert progress == sorted(progress) and progress[-1] == 4  # rank 0's reports only, each step once
        assert len(progress) == len(set(progress))
        rows = client.get(f"/adaptations/{body['id']}/predictions", params={"format": "jsonl"}).text.splitlines()
        assert len(rows) == 16

        body, events = adapt({**tiny_config, "batch_size": 5})
        messages = [event["message"] or "" for event in events]
        assert "batch_size 5 does not split over 2 processes; training on 1" in messages, messages
        assert any("steps of 5 images on cpu" in message for message in messages), messages
    models = [path for path in (workdir / "var" / "objects").rglob("model.safetensors") if "models" in path.parts]
    assert len(models) == 2


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(child) for task in tasks.iterdir() for child in (task / "children").read_text().split()]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL])
def test_the_embedded_worker_never_outlives_must_serve(workdir: Path, unused_port: int, stop_signal: int) -> None:
    """uvicorn re-raises SIGTERM after shutdown (skipping `finally`) and SIGKILL skips everything: the worker
    must still go, or it keeps training (and holding the broker's messages) with no service in front."""
    process = subprocess.Popen([MUST, "serve", "--port", str(unused_port)], cwd=workdir, env=_environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (workers := _children(process.pid)):
            assert process.poll() is None and time.monotonic() < deadline, "must serve started no worker"
            time.sleep(0.5)
        process.send_signal(stop_signal)
        process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{workers[0]}").exists() and Path(f"/proc/{workers[0]}/stat").read_text().split()[2] != "Z":
            assert time.monotonic() < deadline, f"worker {workers[0]} outlived must serve"
            time.sleep(0.5)
    finally:
        if process.poll() is None:
            process.kill()
