"""Pure ASGI middleware: the request body limit, the request metrics and the request id of the logs."""
from __future__ import annotations

import re
import time
import uuid

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import APIError, error_response
from api.metrics import HTTP_LATENCY, HTTP_REQUESTS
from core.logs import bind_ids, clear_ids
from core.settings import get_settings


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes", details={"max_bytes": limit})


class BodySizeLimit:
    """413 for bodies over MAX_BODY_BYTES: by Content-Length up front, and by counting the stream.

    A chunked upload has no Content-Length, so the stream is counted as the app reads it; the
    error is an HTTPException so FastAPI's own body parser re-raises it unchanged.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = get_settings().max_body_bytes
        declared = _content_length(scope)
        if declared == -1:
            await error_response(400, "bad_request", "the Content-Length header is not a number")(scope, receive, send)
            return
        if declared is not None and declared > limit:
            await too_large_response(limit)(scope, receive, send)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await too_large_response(limit)(scope, receive, send)


def too_large_response(limit: int) -> JSONResponse:
    error = BodyTooLarge(limit)
    return error_response(error.status_code, error.code, error.message, error.details)


def _content_length(scope: Scope) -> int | None:
    """The declared length; None when absent, -1 when it is not a number."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


class RequestMetrics:
    """Counts requests and their latency per route template (never per raw path: ids would explode it)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        began = time.perf_counter()

        async def status_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, status_send)
        finally:
            route = route_template(scope)
            HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
            HTTP_LATENCY.labels(scope["method"], route).observe(time.perf_counter() - began)


def route_template(scope: Scope) -> str:
    """The matched route's full path template, e.g. ``/v1/batches/{batch_id}``.

    FastAPI >= 0.16x keeps included routers' routes unprefixed and records the full template in
    its effective route context; older versions put the prefixed route in ``scope["route"]``.
    """
    context = (scope.get("fastapi") or {}).get("effective_route_context")
    template = getattr(context, "path_format", None) or getattr(scope.get("route"), "path_format", None)
    return template or "unmatched"


REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    """Binds ``request_id`` (the client's X-Request-ID when it is a sane token, else a new one)
    to every log line of the request, and echoes it in the response's X-Request-ID."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", ())).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        clear_ids()
        bind_ids(request_id=request_id, method=scope["method"], path=scope["path"])
        try:
            await self.app(scope, receive, tagged_send)
        finally:
            clear_ids()
