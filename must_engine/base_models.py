"""Base models: shipped offline models, open_clip architectures with pretrained tags, or weight files.

A spec is one string so that it can travel through an API field:
- a shipped name (`proxy-cifar10-tiny`), stored in open_clip's `local-dir` layout under base_models/;
- `ARCH:TAG` (`ViT-B-16:openai`), `ARCH:/path/to/weights` or `ARCH:s3://bucket/key` for any open_clip
  architecture (object-store weights are fetched by a caller-supplied `fetch_weights`; the engine has no
  object-store client);
- open_clip's own `local-dir:/path` and `hf-hub:org/repo` schemas.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from must_engine.presets import ModelGeometry

DEFAULT_BASE_MODEL = "proxy-cifar10-tiny"
SHIPPED_DIR = Path(__file__).with_name("base_models")
_SCHEMAS = ("local-dir:", "hf-hub:")


class BaseModelError(ValueError):
    """The base model cannot be used: unknown name, or its weights are not available."""

    def __init__(self, message: str, *, code: str = "unknown_base_model") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class BaseModelSpec:
    """A parsed spec: what open_clip's factory gets as model name and `pretrained`.

    `quick_gelu` is the activation the weights were trained with: OpenAI's CLIP (and every tag whose
    open_clip pretrained config says so) used QuickGELU, and open_clip only warns when a model is built
    with nn.GELU for them, which silently costs accuracy.
    """

    spec: str
    model_name: str
    pretrained: str | None
    quick_gelu: bool = False


@dataclass
class LoadedBaseModel:
    spec: BaseModelSpec
    model: open_clip.CLIP
    tokenizer: Any
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]


def list_base_models() -> list[str]:
    return _shipped_names() + [f"{arch}:{tag}" for arch, tag in open_clip.list_pretrained()]


def is_shipped_model(name: str) -> bool:
    """A model shipped under base_models/ (a plain name; nothing outside that folder is looked at)."""
    return name in _shipped_names()


def is_architecture(name: str) -> bool:
    """An open_clip architecture name (built-in or registered), without building anything."""
    return name in open_clip.list_models()


def is_pretrained_tag(arch: str, tag: str) -> bool:
    """`tag` is one of open_clip's pretrained tags for `arch` (pure lookup, no file or network access)."""
    return bool(open_clip.get_pretrained_cfg(arch, tag))


def parse_base_model(spec: str, pretrained: str | None = None) -> BaseModelSpec:
    spec = spec.strip()
    if not spec:
        raise BaseModelError("base model name is empty")
    shipped = SHIPPED_DIR / spec
    if "/" not in spec and ":" not in spec and (shipped / "open_clip_config.json").is_file():
        return BaseModelSpec(spec, f"local-dir:{shipped}", None)
    if spec.startswith(_SCHEMAS):
        return BaseModelSpec(spec, spec, None)
    arch, sep, weights = spec.partition(":")
    if sep and pretrained:
        raise BaseModelError(f"{spec!r} already names its weights; do not also pass pretrained={pretrained!r}")
    weights = weights or (pretrained or "")
    if arch not in open_clip.list_models():
        raise BaseModelError(
            f"unknown base model {spec!r}: not a shipped model ({', '.join(_shipped_names())}) "
            "nor an open_clip architecture"
        )
    if not weights:
        raise BaseModelError(
            f"base model {arch!r} needs weights: use {arch}:TAG with one of "
            f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'no known tags'}, or {arch}:/path"
        )
    if weights.startswith("s3://"):
        bucket, _, key = weights.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise BaseModelError(f"{weights!r} is not an s3://bucket/key URI", code="weights_unavailable")
    elif not open_clip.get_pretrained_cfg(arch, weights) and not Path(weights).is_file():
        raise BaseModelError(
            f"{weights!r} is neither a pretrained tag of {arch} "
            f"({', '.join(open_clip.list_pretrained_tags_by_model(arch))}) nor an existing file",
            code="weights_unavailable",
        )
    quick_gelu = bool((open_clip.get_pretrained_cfg(arch, weights) or {}).get("quick_gelu", False))
    return BaseModelSpec(spec if sep else f"{arch}:{weights}", arch, weights, quick_gelu)


def check_base_model(spec: str, pretrained: str | None = None) -> None:
    """Cheap validation for request handlers: parses the spec and reads its config, loads no weights."""
    model_config(parse_base_model(spec, pretrained))


def model_config(spec: BaseModelSpec) -> dict[str, Any]:
    if spec.model_name.startswith("local-dir:"):
        path = Path(spec.model_name.removeprefix("local-dir:")) / "open_clip_config.json"
        try:
            return dict(json.loads(path.read_text())["model_cfg"])
        except (OSError, KeyError, ValueError) as exc:
            raise BaseModelError(f"cannot read model config {path}: {exc}") from exc
    if spec.model_name.startswith("hf-hub:"):
        raise BaseModelError("hf-hub models need the network to read their config", code="weights_unavailable")
    config = open_clip.get_model_config(spec.model_name)
    if config is None:
        raise BaseModelError(f"unknown open_clip architecture {spec.model_name!r}")
    config = dict(config)
    if spec.quick_gelu:
        config["quick_gelu"] = True  # stored with checkpoints and artifacts, so every rebuild matches
    return config


def geometry(spec: BaseModelSpec) -> ModelGeometry:
    vision = model_config(spec)["vision_cfg"]
    if "timm_model_name" in vision or isinstance(vision.get("layers"), list | tuple):
        raise BaseModelError(
            f"{spec.spec}: MUST needs a ViT image tower with a [CLS] token (open_clip's VisionTransformer)"
        )
    size = vision.get("image_size", 224)
    return ModelGeometry(
        image_size=size if isinstance(size, int) else size[0],
        patch_size=vision["patch_size"],
        large=vision.get("width", 768) >= 1024,
    )


def _shipped_names() -> list[str]:
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / "open_clip_config.json").is_file())


def _ensure_weights_reachable(spec: BaseModelSpec) -> None:
    """Fail in seconds, not after a minute of hub retries, when tagged weights cannot be had."""
    if spec.pretrained is None or spec.pretrained.startswith("s3://") or Path(spec.pretrained).is_file():
        return
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"):
        return  # open_clip downloads them, with the short timeouts above
    hub_repo = open_clip.get_pretrained_cfg(spec.model_name, spec.pretrained).get("hf_hub", "").rstrip("/")
    from huggingface_hub import hf_hub_download

    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        try:
            hf_hub_download(hub_repo, filename, local_files_only=True)
            return
        except Exception:
            continue
    raise BaseModelError(
        f"weights for {spec.spec} are not in the local cache and HF_HUB_OFFLINE is set. Download them where the "
        "network allows, or pass a local weights file as ARCH:/path/to/weights.",
        code="weights_unavailable",
    )


FetchWeights = Callable[[str], Path]


def load_base_model(
    spec: str, pretrained: str | None = None, device: str | torch.device = "cpu",
    fetch_weights: FetchWeights | None = None,
) -> LoadedBaseModel:
    """The full CLIP model (both towers) in fp32; the text tower is dropped once the head is built.

    `fetch_weights(uri)` turns an `s3://` weights URI into a local file (the service passes its
    object-store client); the spec keeps the URI, so checkpoints and artifacts name the real source.
    """
    parsed = parse_base_model(spec, pretrained)
    cfg = model_config(parsed)
    geometry(parsed)
    _ensure_weights_reachable(parsed)
    weights = parsed.pretrained
    if weights is not None and weights.startswith("s3://"):
        if fetch_weights is None:
            raise BaseModelError(f"{weights}: object-store weights need an object-store client",
                                 code="weights_unavailable")
        try:
            weights = str(fetch_weights(weights))
        except Exception as exc:
            raise BaseModelError(f"cannot fetch {parsed.pretrained}: {exc}", code="weights_unavailable") from exc
    try:
        model = open_clip.create_model(
            parsed.model_name, pretrained=weights, device=device, force_quick_gelu=parsed.quick_gelu
        )
    except Exception as exc:
        raise BaseModelError(f"cannot load {parsed.spec}: {exc}", code="weights_unavailable") from exc
    tokenizer = open_clip.get_tokenizer(parsed.model_name)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    return LoadedBaseModel(parsed, model, tokenizer, cfg, preprocess_cfg)
