"""Cancellation racing completion: whatever wins, the state is consistent and the artifact is either
complete and referenced by exactly one model row, or absent. Real worker, real tiny training."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from app.db.models import Model

# When to send the cancel, relative to the job's progress: before training, mid-way, as it finishes
# (the artifact upload / commit window), and just after.
TRIGGERS: list[tuple[str, float]] = [("running", 0.0), ("step1", 0.0), ("last_step", 0.0), ("last_step", 0.15)]


def _reached(body: dict[str, Any], trigger: str) -> bool:
    progress = body["progress"] or {}
    if body["status"] in ("succeeded", "failed", "cancelled"):
        return True
    if trigger == "running":
        return body["status"] == "running"
    if trigger == "step1":
        return (progress.get("step") or 0) >= 1
    return bool(progress.get("total_steps")) and progress.get("step") == progress.get("total_steps")


def test_cancel_racing_completion_is_all_or_nothing(stack, team, dtd_images, tiny_config) -> None:
    images = dtd_images.zip(dtd_images.paths(16))
    outcomes = []
    for trigger, delay in TRIGGERS:
        created = stack.submit(team, images, config={**tiny_config, "epochs": 2})
        stack.wait_for(team, created["id"], lambda body, t=trigger: _reached(body, t), timeout=120)
        time.sleep(delay)
        cancel = stack.client.post(f"/adaptations/{created['id']}/cancel", headers=team.headers)
        assert cancel.status_code in (200, 409), cancel.text
        done = stack.wait_final(team, created["id"], timeout=120)
        outcomes.append((trigger, delay, cancel.status_code, done["status"]))

        with stack.session_factory() as session:
            models = session.scalars(select(Model).where(Model.adaptation_id == created["id"])).all()
        if cancel.status_code == 200:
            # An accepted cancel always wins: the worker's final commit requires that none was asked for.
            assert done["status"] == "cancelled" and done["model_id"] is None, done
            assert models == []
        else:
            assert done["status"] == "succeeded", done  # 409: it had already finished
            assert [model.id for model in models] == [done["model_id"]]
            files = stack.store.list(models[0].artifact_prefix)
            assert sorted(info.key.rsplit("/", 1)[1] for info in files) == ["metadata.json", "model.safetensors"]
            assert models[0].artifact_bytes == sum(info.size for info in files)
            artifact = stack.client.get(f"/models/{done['model_id']}/artifact", headers=team.headers)
            assert artifact.status_code in (200, 307), artifact.text
        # The worker deletes the checkpoint right after it commits the final status, so the status can be
        # seen a moment before the delete lands: the checkpoint must be gone within seconds, not at once.
        checkpoint = f"teams/{team.id}/adaptations/{created['id']}/checkpoint/"
        deadline = time.monotonic() + 15
        while stack.store.list(checkpoint) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stack.store.list(checkpoint) == [], outcomes

    # No artifact in the store without its model row: a lost race deletes what it uploaded.
    with stack.session_factory() as session:
        prefixes = set(session.scalars(select(Model.artifact_prefix).where(Model.team_id == team.id)))
    stored = {info.key.rsplit("/", 1)[0] + "/" for info in stack.store.list(f"teams/{team.id}/models/")}
    assert stored == prefixes, outcomes
    assert any(status == "cancelled" for *_, status in outcomes), outcomes
