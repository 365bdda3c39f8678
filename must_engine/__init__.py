"""MUST (Masked Unsupervised Self-Training) on open_clip models: the method, with no web code."""

from collections.abc import Sequence

from must_engine.base_models import (
    DEFAULT_BASE_MODEL,
    BaseModelError,
    check_base_model,
    list_base_models,
    parse_base_model,
)
from must_engine.checkpoint import ResumeMismatchError
from must_engine.config import ConfigError, MustConfig, normalize_class_names, resolve_config
from must_engine.data import NoImagesError, collect_images
from must_engine.evaluate import EvalResult, evaluate
from must_engine.images import (
    IMAGE_EXTENSIONS,
    ArchiveError,
    ArchiveLimits,
    ImageError,
    extract_zip,
    find_images,
    open_image,
)
from must_engine.predictor import Predictor
from must_engine.presets import PRESETS, ModelGeometry
from must_engine.train import AdaptCancelled, AdaptResult, Progress, TrainingDiverged, adapt
from must_engine.version import ENGINE_VERSION


def resolve_job_config(
    preset: str, overrides: dict | None, *, num_images: int, num_classes: int, base_model: str = DEFAULT_BASE_MODEL,
    class_names: Sequence[str] | None = None,
) -> MustConfig:
    """resolve_config with the geometry read from the base model (what a service needs in one call)."""
    from must_engine.base_models import geometry

    shape = geometry(parse_base_model(base_model))
    return resolve_config(preset, overrides, num_images=num_images, num_classes=num_classes, geometry=shape,
                          class_names=class_names)


__all__ = [
    "DEFAULT_BASE_MODEL", "ENGINE_VERSION", "IMAGE_EXTENSIONS", "PRESETS", "AdaptCancelled", "AdaptResult",
    "ArchiveError", "ArchiveLimits", "BaseModelError", "ConfigError", "EvalResult", "ImageError", "ModelGeometry",
    "MustConfig", "NoImagesError", "Predictor", "Progress", "ResumeMismatchError", "TrainingDiverged", "adapt",
    "check_base_model", "collect_images", "evaluate", "extract_zip", "find_images", "list_base_models",
    "normalize_class_names", "open_image", "parse_base_model", "resolve_config", "resolve_job_config",
]
