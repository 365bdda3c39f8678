"""Prometheus metrics of one API process (a registry per app, so tests can build several apps)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "must_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "must_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
        )
        self.adaptations_created = Counter(
            "must_adaptations_created_total", "Adaptations accepted", registry=self.registry
        )
        self.classified_images = Counter(
            "must_classified_images_total", "Images classified", ["kind"], registry=self.registry
        )
        self.adaptations_by_status = Gauge(
            "must_adaptations", "Adaptations in the database by status", ["status"], registry=self.registry
        )
        self.loaded_predictors = Gauge(
            "must_loaded_predictors", "Predictors held by the serving cache", registry=self.registry
        )


class RequestMetrics:
    """ASGI middleware counting requests by route template (not raw path, which would explode labels)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics = self.metrics
            metrics.requests.labels(scope["method"], route, str(status)).inc()
            metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
