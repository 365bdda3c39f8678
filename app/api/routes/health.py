"""Liveness, readiness and Prometheus metrics (no API key needed)."""

from __future__ import annotations

from contextlib import suppress

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError

from app.api.deps import ServicesDep
from app.db.models import Adaptation, AdaptationStatus
from app.errors import error_response
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up (says nothing about its dependencies)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"description": "A dependency is down."}})
def readyz(services: ServicesDep) -> Response:
    """Ready to serve: the database answers and the object store is reachable."""
    checks: dict[str, str] = {}
    try:
        with services.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        services.store.ping()
        checks["object_store"] = "ok"
    except Exception as exc:
        checks["object_store"] = f"unavailable: {type(exc).__name__}"
    failing = sorted(name for name, state in checks.items() if state != "ok")
    if failing:
        return error_response(503, "unavailable", f"not ready: {', '.join(failing)} unavailable")
    return JSONResponse(Health(status="ok", checks=checks).model_dump())


@router.get("/metrics", response_class=Response)
def metrics(services: ServicesDep) -> Response:
    """Prometheus text format; job counts by status are read from the database at scrape time."""
    registry = services.metrics
    # The request and process metrics are still worth serving while the database is down.
    with suppress(SQLAlchemyError):
        with services.session_factory() as session:
            rows = session.execute(select(Adaptation.status, func.count()).group_by(Adaptation.status))
            counts = {status: count for status, count in rows}
        for status in AdaptationStatus:
            registry.adaptations_by_status.labels(status.value).set(counts.get(status.value, 0))
    registry.loaded_predictors.set(services.predictors.size)
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
