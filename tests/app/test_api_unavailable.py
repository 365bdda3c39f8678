"""With the database unreachable the API answers 503 `unavailable` (and /readyz says so), never 500."""

from __future__ import annotations


def test_database_down_is_503(make_client, unused_port: int) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{unused_port}/nothing"
    with make_client(database_url=url) as down:
        response = down.get("/adaptations", headers={"Authorization": "Bearer mk_0123456789abcdef_" + "A" * 43})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "unavailable"
        assert int(response.headers["Retry-After"]) > 0
        ready = down.get("/readyz")
        assert ready.status_code == 503 and "database" in ready.json()["error"]["message"]
        assert down.get("/healthz").status_code == 200
        assert down.get("/metrics").status_code == 200
