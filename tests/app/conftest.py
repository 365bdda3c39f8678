"""API test helpers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def upload(client: TestClient, dtd_images: Any, base_model: str) -> Callable[..., httpx.Response]:
    """POST /adaptations with one zip of `count` real DTD images and the given form fields."""

    def post(
        team: Any,
        *,
        count: int = 10,
        headers: dict[str, str] | None = None,
        via: TestClient | None = None,
        **fields: str,
    ) -> httpx.Response:
        data = {"class_names": json.dumps(["banded", "blotchy"]), "base_model": base_model, **fields}
        files = {"images": ("textures.zip", dtd_images.zip(dtd_images.paths(count)), "application/zip")}
        return (via or client).post("/adaptations", headers={**team.headers, **(headers or {})}, data=data, files=files)

    return post
