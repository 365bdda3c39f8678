"""Which base models a team may name: the service's policy, checked before the engine parses anything.

The engine (and the operator's `must` CLI) accepts any open_clip architecture and any local file. A team's
`base_model` field is hostile input: it must not make the API build a model the deployment is not sized for,
nor open, or even reveal the existence of, a file on the server. So a spec is classified by its text alone:

- a shipped name or `ARCH:TAG`: the architecture must be in `MUST_BASE_MODEL_ARCHITECTURES`;
- `ARCH:s3://bucket/key`: the object-store rules of `app.weights`;
- `ARCH:<anything path-like>`: only an absolute path whose real location (symlinks and `..` resolved, by
  `os.path.realpath`, which reads links but opens no file) lies in a `MUST_LOCAL_WEIGHTS_DIRS` directory.
  Anything else is `weights_not_allowed` with one message, whether or not the file exists; only after the
  containment check passes is the file stat'ed (never opened) to require a regular file;
- open_clip's `local-dir:` and `hf-hub:` schemas read arbitrary directories or need the network: refused.
"""

from __future__ import annotations

import os
import stat

from app.settings import Settings
from app.weights import WeightsUnavailable, check_weights_uri
from must_engine.base_models import is_architecture, is_pretrained_tag, is_shipped_model

# Longer than any architecture name plus a deep absolute path; bounds what is parsed and echoed.
MAX_SPEC_LENGTH = 1024
# What an error message quotes of a name the team sent.
_QUOTE_LIMIT = 64
_SCHEMAS = ("local-dir:", "hf-hub:")
WEIGHTS_NOT_ALLOWED = (
    "local weights files are only read from the directories the operator lists in MUST_LOCAL_WEIGHTS_DIRS "
    "(absolute paths); use ARCH:TAG, ARCH:s3://bucket/key or a shipped model"
)


class BaseModelRefused(ValueError):
    """The spec is not one this deployment serves; `code` is the API's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _quoted(text: str) -> str:
    return repr(text if len(text) <= _QUOTE_LIMIT else text[:_QUOTE_LIMIT] + "...")


def _looks_like_path(weights: str) -> bool:
    """Pretrained tags are plain words; anything with a separator, `~`, `.` or a scheme names a file."""
    return "/" in weights or "\\" in weights or weights.startswith(("~", ".")) or "://" in weights


def check_policy(spec: str, settings: Settings) -> str:
    """Raise BaseModelRefused unless this deployment serves `spec`; returns the spec to use (real path resolved)."""
    spec = spec.strip()
    if not spec:
        raise BaseModelRefused("unknown_base_model", "base_model is empty")
    if len(spec) > MAX_SPEC_LENGTH or not spec.isprintable():
        raise BaseModelRefused(
            "unknown_base_model", f"base_model must be at most {MAX_SPEC_LENGTH} printable characters"
        )
    if spec.startswith(_SCHEMAS):
        raise BaseModelRefused(
            "base_model_not_allowed", "open_clip's local-dir: and hf-hub: schemas are not served"
        )
    arch, sep, weights = spec.partition(":")
    served = ", ".join(settings.base_model_architectures)
    if not (is_architecture(arch) or (not sep and is_shipped_model(arch))):
        raise BaseModelRefused(
            "unknown_base_model",
            f"unknown base model {_quoted(arch)}: this deployment serves {served}",
        )
    if arch not in settings.base_model_architectures:
        raise BaseModelRefused(
            "base_model_not_allowed",
            f"{arch} is not served by this deployment (MUST_BASE_MODEL_ARCHITECTURES: {served})",
        )
    if not weights or is_pretrained_tag(arch, weights):
        return spec  # the engine explains a missing tag; a known one is open_clip's to fetch
    if weights.startswith("s3://"):
        try:
            check_weights_uri(weights, settings)
        except WeightsUnavailable as exc:
            raise BaseModelRefused("weights_unavailable", str(exc)) from exc
        return spec
    if _looks_like_path(weights):
        return f"{arch}:{allowed_weights_file(weights, settings)}"
    raise BaseModelRefused(
        "weights_unavailable",
        f"{_quoted(weights)} is not a pretrained tag of {arch} (open_clip.list_pretrained() lists them); "
        "weights files are named by absolute path",
    )


def allowed_weights_file(weights: str, settings: Settings) -> str:
    """The real path of `weights` if it lies in an allowed directory and is a regular file; nothing is opened."""
    if not os.path.isabs(weights) or "\x00" in weights:
        raise BaseModelRefused("weights_not_allowed", WEIGHTS_NOT_ALLOWED)
    real = os.path.realpath(weights)
    roots = [os.path.realpath(directory) for directory in settings.local_weights_dirs]
    if not any(os.path.commonpath([real, root]) == root for root in roots):
        raise BaseModelRefused("weights_not_allowed", WEIGHTS_NOT_ALLOWED)
    try:
        mode = os.stat(real).st_mode
    except OSError:
        mode = 0
    if not stat.S_ISREG(mode):
        raise BaseModelRefused("weights_unavailable", f"no weights file at {weights}")
    return real
