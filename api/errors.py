"""One error shape for every failure: ``{"error": {"code", "message", "details"}}``.

Bad input is always a 4xx with a code a client can branch on; anything unexpected is a 500 in
the same shape, logged here with its traceback and never sent to the client. Infrastructure
faults are not the request's fault: a database that does not answer (down, restarting, no
connection within DB_POOL_TIMEOUT) is a 503 ``database_unavailable`` with Retry-After, and the
pool's pre-ping reconnects once it is back.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api.schemas.common import ErrorOut

log = logging.getLogger(__name__)

CODE_FOR_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


class APIError(StarletteHTTPException):
    """An error with its own code and details. An HTTPException, so FastAPI's body parser re-raises it."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(status_code=status_code, detail=message, headers=dict(headers) if headers else None)
        self.code = code or CODE_FOR_STATUS.get(status_code, "error")
        self.message = message
        self.details = details


# What each error status means, for the OpenAPI schema. Routes declare the statuses they really
# answer with ``error_responses`` (schemathesis holds the live API to them, tests/test_api_schema.py).
ERROR_MEANINGS = {
    400: "malformed JSON or CSV",
    401: "no valid API key",
    403: "the key's role may not do this",
    404: "no such resource (or another team's)",
    409: "conflicts with the resource's state",
    413: "body larger than MAX_BODY_BYTES",
    415: "unsupported Content-Type",
    422: "invalid fields, query parameters, headers or cursor",
    429: "over the team's queued images or submissions per minute: retry after Retry-After seconds",
    503: "the database (or another dependency) is not answering, or the API is at its database capacity: "
         "retry after Retry-After seconds",
}
# Every route behind an API key: unauthenticated, wrong role, bad parameters, database unavailable.
KEYED = (401, 403, 422, 503)
# Every route that reads a request body besides.
WITH_BODY = (400, 413, 415)


def error_responses(*statuses: int, meanings: Mapping[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status with the error shape as its schema::

        @router.get("/{id}", responses=error_responses(*KEYED, 404, meanings={404: "no such batch"}))
    """
    meanings = {**ERROR_MEANINGS, **(meanings or {})}
    return {status: {"model": ErrorOut, "description": meanings[status]} for status in sorted(set(statuses))}


def not_found(what: str) -> APIError:
    return APIError(404, f"{what} not found")


DATABASE_RETRY_AFTER_S = 2


def service_unavailable(message: str, *, code: str = "unavailable", retry_after: int = DATABASE_RETRY_AFTER_S,
                        details: Any = None) -> APIError:
    """A 503 telling the client when to try again: the fault is ours and passing, not the request's."""
    return APIError(503, message, code=code, details={"retry_after_s": retry_after, **(details or {})},
                    headers={"Retry-After": str(retry_after)})


def too_many_requests(code: str, message: str, retry_after: int, details: Any = None) -> APIError:
    """A 429 over a quota or rate limit, telling the client when trying again makes sense."""
    return APIError(429, message, code=code, details=details, headers={"Retry-After": str(retry_after)})


def is_database_unavailable(exc: BaseException) -> bool:
    """The database did not answer (refused, dropped, restarting, pool exhausted), as opposed to a
    statement it refused (an IntegrityError, a bad query): those stay bugs, answered 500."""
    if isinstance(exc, sa_exc.TimeoutError):  # no pooled connection within DB_POOL_TIMEOUT
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError))
    return False


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def field_errors(errors: Iterable[Mapping[str, Any]], loc_prefix: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Pydantic errors as ``{"field", "loc", "message", "type"}``, without echoing the input back.

    A 100k-character prompt must not come back in the error, and pydantic's ``ctx`` may hold
    exception objects that JSON cannot carry.
    """
    details = []
    for error in errors:
        loc = loc_prefix + tuple(error.get("loc", ()))
        details.append({
            "field": ".".join(str(part) for part in loc),
            "loc": list(loc),
            "message": _clean_message(error.get("msg", "invalid value")),
            "type": error.get("type", "value_error"),
        })
    return details


def _clean_message(message: str) -> str:
    # Errors raised inside our validators come as "Value error, <our message>".
    return message.removeprefix("Value error, ")


def validation_error(errors: Iterable[Mapping[str, Any]], loc_prefix: tuple[Any, ...] = (),
                     message: str = "the request is not valid") -> APIError:
    return APIError(422, message, details=field_errors(errors, loc_prefix))


def from_pydantic(exc: ValidationError, loc_prefix: tuple[Any, ...] = ("body",)) -> APIError:
    return validation_error(exc.errors(include_input=False, include_url=False), loc_prefix)


async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, APIError):
        return await _api_error(request, exc)
    code = CODE_FOR_STATUS.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and message == "Not Found":
        message = "no such route"
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
    return error_response(exc.status_code, code, message, None, headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method the request's path answers to. Starlette's 405 names only the first route that
    matched the path, but GET and POST /v1/batches are two routes: ``Allow`` must list both."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _request_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        return error_response(400, "bad_json", "the request body is not valid JSON")
    return error_response(422, "validation_error", "the request is not valid", field_errors(errors))


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if not is_database_unavailable(exc):
        raise exc  # a bug, not an outage: the 500 handler logs it (and a test client re-raises it)
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
    error = service_unavailable("the database is not answering: retry shortly", code="database_unavailable")
    return await _api_error(request, error)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(sa_exc.DBAPIError, _database_error)
    app.add_exception_handler(sa_exc.TimeoutError, _database_error)
    app.add_exception_handler(Exception, _unexpected_error)
