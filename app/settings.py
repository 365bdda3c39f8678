"""Service settings, read from `MUST_*` environment variables.

Every default is the embedded mode: state under `./var` (or `MUST_DATA_DIR`), SQLite, a local object-store
directory and a file-system Celery transport, so `must serve` needs no external server. Setting
`MUST_DATABASE_URL`, `MUST_BROKER_URL` or `MUST_S3_ENDPOINT` switches that part to PostgreSQL, Redis or
MinIO/S3. Bad values fail at start-up, not on the first request.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DATABASE_SCHEMES = ("sqlite", "postgresql")
BROKER_SCHEMES = ("filesystem", "redis", "rediss", "amqp", "pyamqp", "sqla+sqlite", "sqla+postgresql")
DEVICES = ("auto", "cpu", "cuda", "mps")

MiB = 1024 * 1024
# The shipped offline proxy and the ViT CLIP models the presets (and the compose file's GPU workers) are for.
# The -quickgelu twins are the same networks with OpenAI's activation, for local files of OpenAI weights.
DEFAULT_BASE_MODEL_ARCHITECTURES = (
    "proxy-cifar10-tiny", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-B-32-quickgelu", "ViT-B-16-quickgelu",
    "ViT-L-14-quickgelu",
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MUST_", extra="ignore", validate_default=True)

    # Where the embedded defaults keep their state; made absolute at load time so a subprocess started
    # from another directory (the embedded worker) reaches the same files.
    data_dir: Path = Path("var")
    database_url: str = ""
    broker_url: str = ""
    training_queue: str = "training"

    # Object store: empty endpoint = a local directory under data_dir.
    s3_endpoint: str = ""
    s3_access_key: str = ""
    s3_secret_key: SecretStr = SecretStr("")
    s3_bucket: str = "must"
    s3_region: str = "us-east-1"
    s3_secure: bool = False
    # Buckets a team may name in `source: {bucket, prefix}`; the service's own bucket is never one of them.
    source_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)

    device: str = "auto"
    # Processes that train one job together (must_engine/launch.py: torch elastic, one GPU each, NCCL; on a
    # host without GPUs, CPU processes over gloo). The job's batch is split over them, not multiplied.
    gpus_per_job: int = Field(default=1, ge=1, le=64)
    log_level: str = "INFO"

    # Request limits.
    max_upload_bytes: int = Field(default=2048 * MiB, gt=0)
    max_classify_bytes: int = Field(default=32 * MiB, gt=0)
    max_json_bytes: int = Field(default=4 * MiB, gt=0)
    min_images: int = Field(default=16, ge=1)
    max_images: int = Field(default=50_000, ge=1)
    # Uncompressed size of an uploaded or source zip (its ratio is capped by the engine as well).
    max_extracted_bytes: int = Field(default=20 * 1024 * MiB, gt=0)
    max_class_names: int = Field(default=1000, ge=2)
    max_class_name_length: int = Field(default=200, ge=1)
    max_metadata_bytes: int = Field(default=16 * 1024, gt=0)
    max_classify_images: int = Field(default=64, ge=1)
    max_top_k: int = Field(default=100, ge=1)

    # Per-team limits.
    max_active_jobs_per_team: int = Field(default=4, ge=1)
    classify_requests_per_second: float = Field(default=20.0, gt=0)
    classify_burst: int = Field(default=40, ge=1)
    # Redis that holds the classify buckets, so every API process draws from one bucket per team. Empty:
    # the broker's URL when the broker is Redis, otherwise each process keeps its own buckets.
    rate_limit_redis_url: str = ""

    # Base models a team may name. Architectures (and shipped models) this deployment serves: anything
    # else is refused before it is built, so no request can make the API build a model it is not sized for.
    base_model_architectures: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_BASE_MODEL_ARCHITECTURES)
    )
    # Directories whose files a team may name as `ARCH:/path` weights (none by default: only pretrained
    # tags and object-store weights). Absolute paths; compared after symlinks and `..` are resolved.
    local_weights_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)

    # Serving.
    predictor_cache_size: int = Field(default=4, ge=1)
    # Estimated bytes (parameters and buffers) of all cached predictors together; least recently used go first.
    predictor_cache_bytes: int = Field(default=4096 * MiB, gt=0)
    # Models built or loaded at once by one API process (each build holds a full CLIP model in memory), and
    # how long a request waits for a free slot before it is answered 503.
    max_concurrent_model_loads: int = Field(default=2, ge=1)
    model_load_wait_seconds: float = Field(default=30.0, gt=0)
    classify_batch_images: int = Field(default=64, ge=1)
    classify_batch_wait_ms: float = Field(default=5.0, ge=0)

    # Job leases: a worker owns a job while its lease is fresh; the sweeper re-enqueues jobs whose lease
    # expired (lost worker) or whose queue message may have been lost (broker restart).
    lease_seconds: float = Field(default=60.0, gt=0)
    cancel_poll_seconds: float = Field(default=1.0, gt=0)
    sweep_interval_seconds: float = Field(default=15.0, gt=0)
    requeue_after_seconds: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    # An upload whose request has not committed after this long was abandoned; its objects are deleted.
    abandoned_upload_seconds: float = Field(default=3600.0, gt=0)
    # Longer than any job, so the broker never redelivers a message whose worker is still training.
    broker_visibility_timeout_seconds: int = Field(default=7 * 24 * 3600, gt=0)

    # Webhooks (app/webhooks/). Hosts exempt from the https and public-address rules (tests, local receivers).
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Fernet key(s) that encrypt signing secrets at rest, comma-separated (the first encrypts); empty = a key
    # file generated under data_dir. Every API process must use the same key(s).
    webhook_secret_key: SecretStr = SecretStr("")
    # Seconds between attempts (x0.8-1.2 jitter); after the last one the delivery is given up (about 28 h).
    webhook_retry_delays: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 3600.0, 10800.0, 21600.0, 21600.0, 21600.0, 21600.0]
    )
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_concurrency: int = Field(default=4, ge=1)
    webhook_poll_seconds: float = Field(default=1.0, gt=0)
    # A delivery claimed by a sender that died is sent again after this long (same webhook-id).
    webhook_claim_seconds: float = Field(default=120.0, gt=0)
    # After a rotation, deliveries are signed with the previous secret too for this long.
    webhook_previous_secret_seconds: float = Field(default=24 * 3600.0, ge=0)
    max_webhooks_per_team: int = Field(default=16, ge=1)
    # Delivered and given-up deliveries (GET /webhooks/{id}/deliveries) are deleted this long after they were
    # queued; longer than the retry schedule, so a pending one is never pruned.
    webhook_retention_seconds: float = Field(default=30 * 24 * 3600.0, gt=0)

    @field_validator("source_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("base_model_architectures", mode="before")
    @classmethod
    def _split_architectures(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("base_model_architectures")
    @classmethod
    def _check_architectures(cls, value: list[str]) -> list[str]:
        """Each entry must be a shipped model or an open_clip architecture, so a typo fails at start-up.

        The default is known good; only an operator's list pays for importing open_clip (and torch) here.
        """
        if not value:
            raise ValueError("base_model_architectures must name at least one model")
        if tuple(value) == DEFAULT_BASE_MODEL_ARCHITECTURES:
            return value
        from must_engine.base_models import is_architecture, is_shipped_model

        unknown = [name for name in value if not (is_shipped_model(name) or is_architecture(name))]
        if unknown:
            raise ValueError(f"base_model_architectures: not a shipped model nor an open_clip architecture: {unknown}")
        return value

    @field_validator("local_weights_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("local_weights_dirs")
    @classmethod
    def _check_dirs(cls, value: list[Path]) -> list[Path]:
        relative = [str(path) for path in value if not path.is_absolute()]
        if relative:
            raise ValueError(f"local_weights_dirs must be absolute paths: {relative}")
        return value

    @field_validator("webhook_allowed_hosts", "webhook_retry_delays", mode="before")
    @classmethod
    def _split_webhook_lists(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _normalise_hosts(cls, value: list[str]) -> list[str]:
        return [host.lower().strip("[]").rstrip(".") for host in value]

    @field_validator("webhook_retry_delays")
    @classmethod
    def _check_delays(cls, value: list[float]) -> list[float]:
        if any(delay <= 0 for delay in value):
            raise ValueError("webhook_retry_delays must be positive seconds")
        return value

    @field_validator("webhook_secret_key")
    @classmethod
    def _check_webhook_key(cls, value: SecretStr) -> SecretStr:
        from cryptography.fernet import Fernet

        for key in value.get_secret_value().split(","):
            if key.strip():
                try:
                    Fernet(key.strip())
                except ValueError as exc:
                    raise ValueError("webhook_secret_key must be Fernet keys (32 url-safe base64 bytes)") from exc
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value.split(":")[0] not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)} (optionally cuda:N)")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value.upper()

    @model_validator(mode="after")
    def _resolve_defaults(self) -> Self:
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'must.db'}"
        if self.database_url.split(":")[0].split("+")[0] not in DATABASE_SCHEMES:
            raise ValueError(f"database_url must start with one of {', '.join(DATABASE_SCHEMES)}")
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.broker_url.split("://")[0] not in BROKER_SCHEMES:
            raise ValueError(f"broker_url must start with one of {', '.join(s + '://' for s in BROKER_SCHEMES)}")
        if self.s3_endpoint and not (self.s3_access_key and self.s3_secret_key.get_secret_value()):
            raise ValueError("s3_endpoint needs s3_access_key and s3_secret_key")
        if self.s3_bucket in self.source_buckets:
            raise ValueError("the service bucket cannot be a source bucket (it holds every team's data)")
        if self.rate_limit_redis_url.split("://")[0] not in ("", "redis", "rediss"):
            raise ValueError("rate_limit_redis_url must start with redis:// or rediss://")
        if self.min_images > self.max_images:
            raise ValueError("min_images must not exceed max_images")
        return self

    @property
    def shared_rate_limit_url(self) -> str:
        """Where the classify buckets live: empty means in each API process."""
        if self.rate_limit_redis_url:
            return self.rate_limit_redis_url
        return self.broker_url if self.broker_url.split("://")[0] in ("redis", "rediss") else ""

    @property
    def uses_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def uses_s3(self) -> bool:
        return bool(self.s3_endpoint)

    @property
    def objects_dir(self) -> Path:
        """Root of the local object store (one sub-directory per bucket)."""
        return self.data_dir / "objects"

    @property
    def broker_dir(self) -> Path:
        """Message folders of the file-system broker transport."""
        return self.data_dir / "broker"

    @property
    def cache_dir(self) -> Path:
        """Local copies of model artifacts loaded by the predictor cache."""
        return self.data_dir / "cache"

    @property
    def gallery_dir(self) -> Path:
        """Local copies of uploaded zips the dashboard's gallery reads thumbnails from (app.gallery)."""
        return self.data_dir / "gallery"

    @property
    def staging_dir(self) -> Path:
        """Uploads in flight, before validation; emptied by each request and at start-up."""
        return self.data_dir / "staging"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings from the environment (tests build their own `Settings`)."""
    return Settings()
