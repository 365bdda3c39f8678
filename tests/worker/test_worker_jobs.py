"""The worker's orchestration on real components: leases, duplicate deliveries, cancellation, resume,
bucket sources and validation in the `validating` stage. Training is real, on tiny jobs."""

from __future__ import annotations

import contextlib
import io
import time
from datetime import timedelta

from sqlalchemy import func, select, update

from app.db.models import Adaptation, AdaptationEvent, Model, utcnow
from app.queue import enqueue_adaptation
from app.storage import object_key
from must_engine import AdaptCancelled, adapt, resolve_job_config
from worker.runner import CHECKPOINT_FILE


def _statuses(events: list[dict]) -> list[str]:
    return [event["data"]["status"] for event in events if event["type"] == "status"]


def test_job_succeeds_and_records_everything(stack, team, dtd_images) -> None:
    created = stack.submit(team, dtd_images.zip(dtd_images.paths(16)))
    done = stack.wait_final(team, created["id"])
    assert done["status"] == "succeeded", done
    assert done["model_id"] and done["started_at"] and done["finished_at"]
    assert done["progress"]["step"] == done["progress"]["total_steps"] == 2
    assert done["progress"]["fraction"] == 1.0
    assert {"loss", "loss_st", "loss_fair", "teacher_confidence"} <= set(done["metrics"])
    assert done["config"]["batch_size"] == 8 and done["attempts"] == 1

    events = stack.events(team, created["id"])
    assert _statuses(events) == ["queued", "validating", "running", "succeeded"]
    assert [event["id"] for event in events] == sorted(event["id"] for event in events)
    assert any(event["type"] == "progress" and event["data"]["step"] == 2 for event in events)

    artifact = stack.store.list(f"teams/{team.id}/models/{done['model_id']}/")
    assert sorted(info.key.rsplit("/", 1)[1] for info in artifact) == ["metadata.json", "model.safetensors"]
    checkpoint = object_key("teams", team.id, "adaptations", created["id"], "checkpoint", CHECKPOINT_FILE)
    assert not stack.store.exists(checkpoint), "the checkpoint of a finished job is deleted"
    model = stack.client.get(f"/models/{done['model_id']}", headers=team.headers).json()
    assert model["adaptation_id"] == created["id"] and model["class_names"] == ["banded", "blotchy"]
    assert model["artifact_bytes"] == sum(info.size for info in artifact)


def test_a_class_prior_by_name_reaches_the_engine_through_the_worker(stack, team, dtd_images, tiny_config) -> None:
    """The worker resolves the stored request again with the job's class names, so a prior given by name
    balances the exported model to it, and the model's report balances to it too."""
    config = {**tiny_config, "class_prior": {"Blotchy": 1, "banded": 3}}
    created = stack.submit(team, dtd_images.zip(dtd_images.paths(16)), config=config)
    done = stack.wait_final(team, created["id"])
    assert done["status"] == "succeeded", done
    assert done["config"]["class_prior"] == [0.75, 0.25] and done["config"]["balance_classes"]
    model = stack.client.get(f"/models/{done['model_id']}", headers=team.headers).json()
    assert model["report"]["beyond_balancing"]["target"] == "class_prior"
    histogram = model["report"]["class_histogram"]["adapted"]
    assert histogram["banded"] > histogram["blotchy"]  # 16 images balanced to 3:1


def test_duplicate_deliveries_run_the_job_once(stack, team, dtd_images) -> None:
    created = stack.submit(team, dtd_images.zip(dtd_images.paths(16)))
    for _ in range(3):  # a broker redelivery, a sweeper re-send, a client retry...
        enqueue_adaptation(stack.celery, created["id"])
    done = stack.wait_final(team, created["id"])
    time.sleep(2)  # let the extra deliveries reach the worker and find the job taken
    assert done["status"] == "succeeded" and done["attempts"] == 1
    with stack.session_factory() as session:
        models = session.scalar(select(func.count()).select_from(Model).where(Model.adaptation_id == created["id"]))
        assert models == 1
        row = session.get_one(Adaptation, created["id"])
        assert row.attempts == 1 and row.status == "succeeded"
    assert _statuses(stack.events(team, created["id"])) == ["queued", "validating", "running", "succeeded"]


def test_cancel_stops_a_running_job_within_seconds(stack, team, dtd_images, tiny_config) -> None:
    long_job = {**tiny_config, "epochs": 200, "checkpoint_every": 5}
    created = stack.submit(team, dtd_images.zip(dtd_images.paths(16)), config=long_job)
    stack.wait_for(team, created["id"], lambda body: body["status"] == "running" and body["progress"]["step"] > 0)
    asked = time.monotonic()
    response = stack.client.post(f"/adaptations/{created['id']}/cancel", headers=team.headers)
    assert response.status_code == 200 and response.json()["cancel_requested"] is True
    done = stack.wait_final(team, created["id"], timeout=30)
    assert done["status"] == "cancelled" and done["model_id"] is None
    assert time.monotonic() - asked < 15
    assert stack.client.post(f"/adaptations/{created['id']}/cancel", headers=team.headers).status_code == 409
    assert stack.store.list(f"teams/{team.id}/models/") == []
    assert stack.store.list(f"teams/{team.id}/adaptations/{created['id']}/checkpoint/") == []


def test_lost_worker_job_is_swept_and_resumes_from_its_checkpoint(
    stack, team, dtd_images, tmp_path, tiny_config
) -> None:
    """A job whose worker vanished (lease expired) is re-sent by the sweeper and resumes, not restarts."""
    paths = dtd_images.paths(16)
    config = {**tiny_config, "epochs": 2}
    created = stack.submit(team, dtd_images.zip(paths), config=config)
    stack.wait_final(team, created["id"])  # let the first run finish, then replay a crash after step 1:
    names = ["banded", "blotchy"]
    resolved = resolve_job_config("auto", config, num_images=16, num_classes=2, base_model=stack.base_model)
    work = tmp_path / "work"
    steps = iter(range(100))
    with contextlib.suppress(AdaptCancelled):
        adapt(
            paths,
            names,
            tmp_path / "out",
            base_model=stack.base_model,
            config=resolved,
            device="cpu",
            work_dir=work,
            should_stop=lambda: next(steps) >= 1,
        )
    checkpoint_key = object_key("teams", team.id, "adaptations", created["id"], "checkpoint", CHECKPOINT_FILE)
    stack.store.put_file(checkpoint_key, work / CHECKPOINT_FILE)
    with stack.session_factory.begin() as session:  # the state a SIGKILLed worker leaves behind
        session.execute(
            update(Adaptation)
            .where(Adaptation.id == created["id"])
            .values(
                status="running",
                model_id=None,
                finished_at=None,
                lease_owner="ghost:1:dead",
                lease_expires_at=utcnow() - timedelta(seconds=1),
                requeue_at=utcnow() - timedelta(seconds=1),
            )
        )
        session.execute(Model.__table__.delete().where(Model.adaptation_id == created["id"]))

    done = stack.wait_final(team, created["id"], timeout=120)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    messages = [event["message"] or "" for event in stack.events(team, created["id"])]
    assert any(message.startswith("re-enqueued: its worker stopped renewing the lease") for message in messages)
    assert any("resumed from checkpoint at step 1" in message for message in messages)
    assert any("attempt 2" in message and "resuming" in message for message in messages)


def test_source_bucket_job_validates_in_the_worker(stack, team, dtd_images, source_bucket: str, tiny_config) -> None:
    source = stack.store.for_bucket(source_bucket)
    good, bad = f"{team.id}/good/", f"{team.id}/bad/"
    for index, path in enumerate(dtd_images.paths(16)):
        source.put_stream(f"{good}{index:03d}.jpg", io.BytesIO(path.read_bytes()), path.stat().st_size)
        source.put_stream(f"{bad}{index:03d}.jpg", io.BytesIO(path.read_bytes()), path.stat().st_size)
    source.put_stream(f"{bad}zzz.jpg", io.BytesIO(b"not an image"), 12)

    def start(prefix: str) -> str:
        body = {
            "class_names": ["banded", "blotchy"],
            "base_model": stack.base_model,
            "source": {"bucket": source_bucket, "prefix": prefix},
            "config": tiny_config,
        }
        response = stack.client.post("/adaptations", headers=team.headers, json=body)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    failing, working = start(bad), start(good)
    failed = stack.wait_final(team, failing)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] in ("unsupported_format", "corrupt_image")
    assert "zzz.jpg" in failed["error"]["message"]
    events = stack.events(team, failing)
    assert _statuses(events) == ["queued", "validating", "failed"]
    assert [event["data"]["code"] for event in events if event["type"] == "error"] == [failed["error"]["code"]]

    succeeded = stack.wait_final(team, working)
    assert succeeded["status"] == "succeeded" and succeeded["num_images"] == 16


def test_events_are_per_adaptation(stack, team, other_team) -> None:
    with stack.session_factory() as session:
        leaked = session.scalar(
            select(func.count())
            .select_from(AdaptationEvent)
            .join(Adaptation, Adaptation.id == AdaptationEvent.adaptation_id)
            .where(Adaptation.team_id == other_team.id)
        )
    assert leaked == 0
    assert stack.client.get("/adaptations", headers=other_team.headers).json()["data"] == []


def test_a_missing_source_bucket_fails_the_job(stack, team) -> None:
    with stack.session_factory.begin() as session:
        row = Adaptation(
            team_id=team.id,
            request_sha256="0" * 64,
            class_names=["a", "b"],
            base_model=stack.base_model,
            config_request={},
            source_bucket="no-such-bucket-here",
            source_prefix="",
        )
        session.add(row)
        session.flush()
        adaptation_id = row.id
    enqueue_adaptation(stack.celery, adaptation_id)
    done = stack.wait_final(team, adaptation_id, timeout=60)
    assert done["status"] == "failed" and done["error"]["code"] == "source_unavailable"


def test_failure_summary_names_the_error_but_not_its_text() -> None:
    from worker.runner import failure_summary

    def said(name: str) -> str:
        return f"training failed with {name}; the worker log has the details"

    assert failure_summary(ValueError("/srv/secret/path is bad")) == said("ValueError")
    assert failure_summary(RuntimeError()) == said("RuntimeError")
    loader_error = ValueError(
        "Caught KeyError in DataLoader worker process 1.\nTraceback...\n  File x\nKeyError: /srv/secret"
    )
    assert failure_summary(loader_error) == said("KeyError")
    assert failure_summary(RuntimeError("line one\n/srv/secret: not a type")) == said("RuntimeError")


def test_the_worker_refuses_a_forbidden_base_model_before_reading_anything(stack, team, monkeypatch) -> None:
    """A row written around the API (or before the policy tightened) still cannot make the worker read a file."""
    import open_clip
    import torch

    built: list[str] = []
    monkeypatch.setattr(open_clip, "create_model", lambda *args, **kwargs: built.append("create_model"))
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: built.append("torch.load"))
    with stack.session_factory.begin() as session:
        row = Adaptation(
            team_id=team.id,
            request_sha256="0" * 64,
            class_names=["a", "b"],
            base_model="ViT-B-32:/proc/self/environ",
            config_request={},
            source_bucket="no-such-bucket-here",  # would fail as source_unavailable if the images came first
            source_prefix="",
        )
        session.add(row)
        session.flush()
        adaptation_id = row.id
    enqueue_adaptation(stack.celery, adaptation_id)
    done = stack.wait_final(team, adaptation_id, timeout=60)
    assert done["status"] == "failed" and done["error"]["code"] == "weights_not_allowed", done
    assert "environ" not in done["error"]["message"]
    assert built == []


def test_a_killed_training_rank_releases_the_job_for_a_resumed_attempt() -> None:
    """A rank killed outright (OOM killer, lost GPU) says nothing about the job: retry it, as for an outage."""
    from must_engine.launch import RankFailed
    from worker.runner import is_transient

    assert is_transient(RankFailed("rank 1 of 4 was killed by a signal"))
    assert not is_transient(RuntimeError("a bug in a rank"))
