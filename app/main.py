"""The FastAPI application factory (`uvicorn --factory app.main:create_app`, or `must serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool

from app.api.deps import check_query_parameters
from app.api.routes import adaptations, classify, evaluations, health, images, models, predictions, webhooks
from app.dashboard import routes as dashboard
from app.errors import install_error_handlers
from app.limits import BodySizeLimit
from app.metrics import RequestMetrics
from app.request_context import RequestId
from app.schemas import ClassifyImages, ErrorBody, ZeroShotClassify
from app.services import Services
from app.settings import Settings, get_settings
from app.sweeper import prune_staging, run_sweeper
from app.webhooks.dispatcher import Dispatcher
from app.webhooks.signing import SecretBox

log = logging.getLogger(__name__)

# Bodies parsed by hand (their routes take multipart or JSON) are added to the OpenAPI components.
HAND_PARSED_MODELS: list[type[BaseModel]] = [
    *adaptations.OPENAPI_MODELS,
    ClassifyImages,
    ZeroShotClassify,
    ErrorBody,
]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    services = Services.create(settings)
    webhook_box = SecretBox.from_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            await run_in_threadpool(services.store.ensure_bucket)
        except Exception as exc:  # /readyz reports it; the API still answers health checks
            log.warning("object store not ready at start-up: %s", exc)
        await run_in_threadpool(prune_staging, settings.staging_dir)
        sweeper = asyncio.create_task(run_sweeper(services))
        dispatcher = app.state.webhook_dispatcher = Dispatcher(settings, services.session_factory, webhook_box)
        dispatcher.start()
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await run_in_threadpool(dispatcher.stop)
            await services.classify_limiter.aclose()
            services.close()

    app = FastAPI(
        title="MUST adaptation service",
        summary="Label-free image classifiers: CLIP zero-shot heads adapted to a team's unlabeled images.",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(check_query_parameters)],
        responses={
            "4XX": {"model": ErrorBody, "description": "Client error"},
            "5XX": {"model": ErrorBody, "description": "Server error"},
        },
    )
    app.state.services = services
    app.state.webhook_box = webhook_box
    install_error_handlers(app)
    for router in (adaptations.router, predictions.router, images.router, models.router, evaluations.router,
                   classify.router, health.router, webhooks.router, dashboard.router):
        app.include_router(router)
    app.mount(dashboard.STATIC_PATH, dashboard.static_files(), name="static")
    app.add_middleware(BodySizeLimit, limit_for_path=lambda path: _body_limit(settings, path))
    app.add_middleware(RequestMetrics, metrics=services.metrics)
    app.add_middleware(RequestId)  # outermost: every response, and every log line of a request, has its id
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _body_limit(settings: Settings, path: str) -> int:
    if path == "/adaptations" or path.endswith("/evaluations"):
        return settings.max_upload_bytes
    if path.endswith("/classify"):
        return settings.max_classify_bytes
    return settings.max_json_bytes


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        _, definitions = models_json_schema(
            [(model, "validation") for model in HAND_PARSED_MODELS], ref_template="#/components/schemas/{model}"
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
        app.openapi_schema = schema
    return app.openapi_schema
