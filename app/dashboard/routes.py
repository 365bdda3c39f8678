"""`GET /`: the dashboard page, and `/static/...`: its script and style sheet.

The page is plain HTML and JavaScript that calls the JSON API of the same origin with the API key the
user typed (kept in the tab's sessionStorage). Nothing is fetched from anywhere else, and the Content
Security Policy says so to the browser too.
"""

from __future__ import annotations

import html
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from must_engine import DEFAULT_BASE_MODEL
from must_engine.base_models import list_base_models
from must_engine.presets import PRESETS

STATIC_DIR = Path(__file__).with_name("static")
STATIC_PATH = "/static"

# Only this origin; images also from blob: (thumbnails and dropped files are fetched with the key, then shown).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def _options(values: list[str], selected: str | None = None) -> str:
    return "".join(
        f'<option value="{html.escape(v)}"{" selected" if v == selected else ""}>{html.escape(v)}</option>'
        for v in values
    )


@lru_cache(maxsize=1)
def _page() -> str:
    """index.html with the shipped base models and presets filled in (they change only with a release)."""
    models = list_base_models()
    template = (STATIC_DIR / "index.html").read_text()
    filled = {
        "{{default_base_model}}": html.escape(DEFAULT_BASE_MODEL),
        "{{base_model_options}}": _options(models),
        "{{preset_options}}": _options(list(PRESETS), "auto"),
    }
    for placeholder, value in filled.items():
        template = template.replace(placeholder, value)
    return template


@router.get("/", response_class=HTMLResponse)
def dashboard() -> HTMLResponse:
    return HTMLResponse(_page(), headers=_HEADERS)


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)
