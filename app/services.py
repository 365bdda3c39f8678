"""The long-lived clients of one API process, built once by the app factory."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.db.session import create_db_engine, create_session_factory
from app.gallery import GalleryImages
from app.limits import RateLimiter, create_rate_limiter
from app.metrics import ServiceMetrics
from app.predictors import PredictorCache
from app.queue import create_celery_app
from app.settings import Settings
from app.storage import ObjectStore, create_store
from app.weights import WeightsFetcher


@dataclass
class Services:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    store: ObjectStore
    gallery: GalleryImages
    celery: Celery
    predictors: PredictorCache
    classify_limiter: RateLimiter
    metrics: ServiceMetrics

    @classmethod
    def create(cls, settings: Settings) -> Services:
        engine = create_db_engine(settings)
        store = create_store(settings)
        return cls(
            settings=settings,
            engine=engine,
            session_factory=create_session_factory(engine),
            store=store,
            gallery=GalleryImages(settings.gallery_dir),
            celery=create_celery_app(settings),
            predictors=PredictorCache(
                store,
                settings.cache_dir,
                capacity=settings.predictor_cache_size,
                device=settings.device,
                max_batch_images=settings.classify_batch_images,
                wait_seconds=settings.classify_batch_wait_ms / 1000,
                max_bytes=settings.predictor_cache_bytes,
                max_loads=settings.max_concurrent_model_loads,
                load_wait_seconds=settings.model_load_wait_seconds,
                fetch_weights=WeightsFetcher(store, settings),
            ),
            classify_limiter=create_rate_limiter(
                settings.shared_rate_limit_url, settings.classify_requests_per_second, settings.classify_burst
            ),
            metrics=ServiceMetrics(),
        )

    def close(self) -> None:
        self.predictors.clear()
        self.engine.dispose()
