"""Every error leaves the API as `{"error": {"code", "message", "param"}}` with a 4xx/5xx status."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db.session import is_database_unavailable
from app.predictors import ModelLoadsBusy
from app.request_context import current_request_id
from app.storage import StorageError
from app.validation import InputError

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers


def bad_request(code: str, message: str, param: str | None = None) -> ApiError:
    return ApiError(400, code, message, param)


def not_found(what: str, param: str | None = None) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found", param)


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


_HTTP_CODES = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def _param_of(location: tuple[Any, ...]) -> str | None:
    names = [str(part) for part in location if part not in ("body", "query", "path", "header")]
    return ".".join(names) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)

    @app.exception_handler(InputError)
    async def _input_error(_: Request, exc: InputError) -> JSONResponse:
        return error_response(400, exc.code, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, "malformed_json", "the request body is not valid JSON")
        param = _param_of(tuple(first.get("loc", ())))
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, "invalid_request", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(SQLAlchemyTimeoutError)
    async def _database_error(_: Request, exc: Exception) -> JSONResponse:
        if not is_database_unavailable(exc):
            log.exception("database error", exc_info=exc)
            return error_response(500, "internal_error", "an unexpected error occurred")
        log.warning("database unavailable: %s", exc)
        return error_response(
            503, "unavailable", "the database is unavailable; retry shortly", headers={"Retry-After": "5"}
        )

    @app.exception_handler(StorageError)
    async def _storage_down(_: Request, exc: StorageError) -> JSONResponse:
        log.warning("object store unavailable: %s", exc)
        return error_response(
            503, "unavailable", "the object store is unavailable; retry shortly", headers={"Retry-After": "5"}
        )

    @app.exception_handler(ModelLoadsBusy)
    async def _loads_busy(_: Request, exc: ModelLoadsBusy) -> JSONResponse:
        log.warning("model loads busy (request %s): %s", current_request_id(), exc)
        return error_response(
            503, "busy", "the service is loading other models; retry shortly", headers={"Retry-After": "5"}
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        request_id = current_request_id()
        log.exception("unhandled error (request %s)", request_id, exc_info=exc)
        return error_response(500, "internal_error", f"an unexpected error occurred (request id {request_id})")
