"""One error shape for every 4xx/5xx: `{"detail": "<what is wrong>", "errors": [...]}`."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# PostgreSQL unreachable: a 503 to retry, not a 500.
DATABASE_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, TimeoutError)


_RETRY_AFTER_S = "5"


class ApiError(Exception):
    def __init__(
        self,
        status_code: int,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        if status_code == 503 and not any(h.lower() == "retry-after" for h in headers or {}):
            # A 503 here is a part away for a moment (PostgreSQL, Kafka, a worker) or not set
            # up yet: when to ask again is said once, not left to each route to remember
            # (several forgot it).
            headers = {**(headers or {}), "Retry-After": _RETRY_AFTER_S}
        self.headers = headers
        self.errors = errors

    def response(self) -> JSONResponse:
        content: dict[str, Any] = {"detail": self.detail}
        if self.errors is not None:
            content["errors"] = self.errors
        return JSONResponse(content, status_code=self.status_code, headers=self.headers)


def validation_errors(errors: list[Any]) -> list[dict[str, str]]:
    described = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        described.append({"field": location or "body", "message": str(error.get("msg", ""))})
    return described


def validation_failure(exc: ValidationError | RequestValidationError) -> ApiError:
    """A 400 for JSON that does not parse, a 422 naming every field that is wrong."""
    errors = list(exc.errors())
    described = validation_errors(errors)
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = error.get("ctx", {}).get("error", error.get("msg"))
            return ApiError(400, f"malformed JSON: {reason}", errors=described)
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in described[:5])
    return ApiError(422, summary, errors=described)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_failure(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, DATABASE_ERRORS):
            # PostgreSQL unreachable on a path that does not say so itself: a 503 to retry
            # (it was a 500, which clients and the SLA count as our fault).
            logger.warning("%s %s: database unavailable: %r", request.method, request.url.path, exc)
            return JSONResponse(
                {"detail": "database unavailable, retry later"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        # Never a stack trace in a response; the log has it.
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)
