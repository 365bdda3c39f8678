"""Schema-driven fuzzing of every operation in the OpenAPI document (schemathesis + hypothesis):
valid-looking and deliberately invalid requests, with a real team key; none may answer 5xx.

Bounded: a fixed number of examples per operation and mode, and a wall-clock budget for the whole run.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from app.webhooks import urls

EXAMPLES_PER_OPERATION = 20
BUDGET_SECONDS = 50.0


def test_no_operation_answers_5xx(world_client, team, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a world of its own: the adaptations the fuzzer gets accepted stay out of the shared database."""
    # Fuzzed webhook URLs are never resolved (no DNS query leaves the machine) and so never registered.
    def unresolvable(host: str, port: int) -> list:
        raise urls.WebhookUrlError("webhook_url_unresolvable", f"{host} is not resolved in this test")

    monkeypatch.setattr(urls, "resolve", unresolvable)
    schema = schemathesis.openapi.from_asgi("/openapi.json", world_client.app)
    started = time.monotonic()
    failures: list[str] = []
    calls = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [operation.label for operation in operations]

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for operation in operations:
            if time.monotonic() - started > BUDGET_SECONDS:
                break

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def fuzz(case: Any) -> None:
                nonlocal calls
                calls += 1
                headers = {**(case.headers or {}), **team.headers}
                response = case.call(headers=headers)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text}")

            try:
                fuzz()
            except Unsatisfiable:
                # Negative mode has nothing to break in an operation without inputs (GET /healthz).
                assert mode is GenerationMode.NEGATIVE, operation.label

    elapsed = time.monotonic() - started
    assert not failures, "\n".join(failures[:10])
    assert calls >= 100, f"only {calls} requests in {elapsed:.0f}s"
    assert elapsed < 60
