"""API keys: every route but health needs one; malformed, unknown, wrong and revoked keys are refused."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.auth import revoke_api_key
from app.db.models import Adaptation, utcnow

PUBLIC = {"/healthz", "/readyz", "/metrics"}


def protected_routes(client: TestClient) -> list[tuple[str, str]]:
    paths = client.get("/openapi.json").json()["paths"]
    return [
        (method.upper(), path.replace("{adaptation_id}", "ada_x").replace("{model_id}", "mdl_x"))
        for path, operations in paths.items()
        if path not in PUBLIC
        for method in operations
    ]


def test_every_route_but_health_requires_a_key(client: TestClient) -> None:
    routes = protected_routes(client)
    assert len(routes) >= 11
    for method, path in routes:
        response = client.request(method, path)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    for path in PUBLIC:
        assert client.get(path).status_code == 200, path


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-key",
        "Bearer mk_0000000000000000_" + "A" * 43,  # well-formed, unknown id
    ],
)
def test_bad_keys_are_refused(client: TestClient, authorization: str) -> None:
    response = client.get("/adaptations", headers={"Authorization": authorization})
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


def test_wrong_secret_and_revoked_key(client: TestClient, team, session_factory: sessionmaker[Session]) -> None:
    assert client.get("/adaptations", headers=team.headers).status_code == 200
    prefix, key_id, secret = team.key.split("_", 2)
    tampered = f"{prefix}_{key_id}_{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}"
    assert client.get("/adaptations", headers={"Authorization": f"Bearer {tampered}"}).status_code == 401
    with session_factory.begin() as session:
        assert revoke_api_key(session, f"key_{key_id}")
    response = client.get("/adaptations", headers=team.headers)
    assert response.status_code == 401 and response.json()["error"]["message"] == "invalid or revoked API key"


def test_errors_keep_one_shape(client: TestClient, team) -> None:
    cases = [
        (client.get("/no/such/route", headers=team.headers), 404, "not_found"),
        (client.put("/adaptations", headers=team.headers), 405, "method_not_allowed"),
        (client.get("/adaptations/ada_missing", headers=team.headers), 404, "not_found"),
        (client.get("/models", headers=team.headers, params={"limit": "many"}), 400, "invalid_request"),
    ]
    for response, status, code in cases:
        assert response.status_code == status
        assert set(response.json()) == {"error"}
        assert set(response.json()["error"]) == {"code", "message", "param"}
        assert response.json()["error"]["code"] == code


def test_metrics_count_requests_by_route_and_jobs_by_status(world, world_client: TestClient, team) -> None:
    """On a database of its own, so the job counts are exactly the rows this test wrote."""
    with world.session_factory.begin() as session:
        for status in ("queued", "queued", "failed"):
            session.add(
                Adaptation(
                    team_id=team.id,
                    status=status,
                    request_sha256="0" * 64,
                    class_names=["a", "b"],
                    base_model="proxy-cifar10-tiny",
                    config_request={},
                    source_bucket="b",
                    source_prefix="p/",
                    requeue_at=utcnow() + timedelta(hours=1),
                )
            )
    for _ in range(2):
        world_client.get("/adaptations/ada_missing", headers=team.headers)
    text = world_client.get("/metrics").text
    assert 'must_http_requests_total{method="GET",route="/adaptations/{adaptation_id}",status="404"} 2.0' in text
    assert 'must_adaptations{status="queued"} 2.0' in text
    assert 'must_adaptations{status="failed"} 1.0' in text
    assert 'must_adaptations{status="running"} 0.0' in text


def test_classify_rate_limit_answers_429(make_client, team) -> None:
    with make_client(classify_requests_per_second=0.01, classify_burst=2) as limited:
        statuses = [limited.post("/classify", headers=team.headers, json={}).status_code for _ in range(3)]
        assert statuses[:2] == [400, 400]
        assert statuses[2] == 429
        response = limited.post("/classify", headers=team.headers, json={})
        assert response.json()["error"]["code"] == "rate_limited" and int(response.headers["Retry-After"]) >= 1
