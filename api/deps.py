"""FastAPI dependencies: a ledger session per request, the calling principal, role and team checks.

Routes declare what they need with the ``Annotated`` aliases at the bottom::

    def route(session: SessionDep, principal: SubmitterDep): ...

Database concurrency is sized from one setting, ``DB_POOL_SIZE``, so the pool cannot deadlock.
A request takes a permit (an async semaphore of that size, waited for without a thread) before
its session exists and keeps it until its background tasks are done; the session closes before
the response is sent, so the outbox publish that follows checks out a connection of its own
rather than a second one: each request holds at most one connection at a time, hence a
permit always finds a free one. The thread limiter gets the same size (more threads would only
wait), and a permit not granted within ``DB_POOL_TIMEOUT`` is a 503 with Retry-After, not a hang.
Before, 15+ submissions each held a connection in their session while their publish waited for
a second one: every connection held, every holder waiting, until the 30 s pool timeout.
"""
from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Annotated, Any

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from fastapi import Depends, Query, Request
from prometheus_client import Counter
from pydantic import Field
from sqlalchemy import Select, event, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool

from api.errors import APIError, not_found, service_unavailable
from api.metrics import REGISTRY
from api.schemas.batches import MAX_NAME_CHARS
from core import keys
from core.db import get_engine, session_factory
from core.keys import Principal
from core.logs import bind_ids
from core.settings import get_settings
from core.text import Text
from models import Batch, Image, Item, Role

log = logging.getLogger(__name__)

ALL_ROLES = tuple(Role)
UUID_PATTERN = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
BEARER = "bearer"


# -- database concurrency (see the module docstring) ------------------------------------------

DB_BUSY = Counter("instabatch_db_permit_timeouts_total",
                  "Requests answered 503 because no database permit came within DB_POOL_TIMEOUT", registry=REGISTRY)
NESTED_CHECKOUTS = Counter("instabatch_db_nested_checkouts_total",
                           "Connections checked out by a request that already held one (should stay 0)",
                           registry=REGISTRY)
BUSY_RETRY_AFTER_S = 1

# Per event loop (uvicorn has one; each TestClient call its own), like anyio's thread limiter.
_permits: RunVar[anyio.Semaphore] = RunVar("instabatch_db_permits")


class _RequestConnections:
    """How many pooled connections the current request holds right now."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0


_request_connections: ContextVar[_RequestConnections | None] = ContextVar("instabatch_request_connections",
                                                                           default=None)


def db_permits() -> anyio.Semaphore:
    """This event loop's permits, and its thread limiter sized with them (set on first use)."""
    try:
        return _permits.get()
    except LookupError:
        size = get_settings().db_pool_size
        anyio.to_thread.current_default_thread_limiter().total_tokens = size
        permits = anyio.Semaphore(size)
        _permits.set(permits)
        return permits


async def db_permit() -> AsyncIterator[None]:
    """Admission to the database: held from before the session until the background tasks end."""
    permits = db_permits()
    with anyio.move_on_after(get_settings().db_pool_timeout) as waited:
        await permits.acquire()
    if waited.cancelled_caught:
        DB_BUSY.inc()
        raise service_unavailable("the API is at its database capacity: retry shortly", code="busy",
                                  retry_after=BUSY_RETRY_AFTER_S)
    token = _request_connections.set(_RequestConnections())
    try:
        yield
    finally:
        try:
            _request_connections.reset(token)
        except ValueError:  # exited in another context than it was entered in
            _request_connections.set(None)
        permits.release()


# Blocking work a request does before it holds a permit (parsing an upload, see create_batch)
# runs in threads of its own: on the shared limiter, sized for the permit holders, every pending
# parse would queue ahead of the holders' session work and slow the requests that hold permits.
PARSE_THREADS = 2  # parsing is CPU-bound Python: more threads only contend for the GIL
_parse_threads: RunVar[anyio.CapacityLimiter] = RunVar("instabatch_parse_threads")


async def run_before_permit(func: Callable[..., Any], *args: Any) -> Any:
    try:
        limiter = _parse_threads.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(PARSE_THREADS)
        _parse_threads.set(limiter)
    return await anyio.to_thread.run_sync(func, *args, limiter=limiter)


@event.listens_for(Pool, "checkout")
def _count_checkout(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    holder = _request_connections.get()
    if holder is None:
        return
    if holder.held:
        NESTED_CHECKOUTS.inc()
        log.warning("a request checked out a second database connection while holding one")
    holder.held += 1
    record.info["instabatch_request"] = holder


@event.listens_for(Pool, "checkin")
def _count_checkin(_dbapi_connection: Any, record: Any) -> None:
    holder = record.info.pop("instabatch_request", None) if record is not None else None
    if holder is not None:
        holder.held -= 1


def get_session(_permit: Annotated[None, Depends(db_permit)]) -> Iterator[Session]:
    """One session per request; routes commit what they change, anything uncommitted is rolled back.

    Closed when the route function returns (``scope="function"``), before the response is sent
    and its background tasks run, so a background task never waits for a second connection.
    """
    session = session_factory(get_engine())()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def unauthorized(message: str) -> APIError:
    return APIError(401, message, headers={"WWW-Authenticate": "Bearer"})


def current_principal(request: Request, session: SessionDep) -> Principal:
    """The principal of ``Authorization: Bearer <key>``; 401 for a missing, unknown or revoked key."""
    return authenticate(request, session)


def authenticate(request: Request, session: Session) -> Principal:
    header = request.headers.get("authorization")
    if not header:
        raise unauthorized("missing Authorization: Bearer <api key>")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != BEARER or not token:
        raise unauthorized("the Authorization header must be 'Bearer <api key>'")
    principal = keys.authenticate(session, token)
    if principal is None:
        raise unauthorized("unknown or revoked API key")
    request.state.principal = principal
    return principal


# A long-lived stream (server-sent events) must not hold a database permit while it waits between
# reads, or a handful of open progress bars would take the API's whole capacity: it takes a permit
# for each read instead.
short_permit = asynccontextmanager(db_permit)


async def in_short_session(work: Callable[[Session], Any]) -> Any:
    """Run ``work(session)`` in a thread with a permit and a session of its own, both let go after."""
    async with short_permit():
        return await anyio.to_thread.run_sync(_with_session, work)


def _with_session(work: Callable[[Session], Any]) -> Any:
    with session_factory(get_engine())() as session:
        return work(session)


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def require_roles(*roles: Role) -> Callable[[Principal], Principal]:
    """A dependency that lets only these roles through (admin always); 403 for the others."""
    allowed = frozenset(roles) | {Role.ADMIN}

    def check(principal: PrincipalDep) -> Principal:
        if principal.role not in allowed:
            names = ", ".join(sorted(role.value for role in allowed))
            raise APIError(403, f"role {principal.role.value!r} may not do this (needs one of: {names})")
        return principal

    return check


SubmitterDep = Annotated[Principal, Depends(require_roles(Role.SUBMITTER))]
ReaderDep = Annotated[Principal, Depends(require_roles(*ALL_ROLES))]
ReviewerDep = Annotated[Principal, Depends(require_roles(Role.REVIEWER))]
AuditorDep = Annotated[Principal, Depends(require_roles(Role.AUDITOR))]
AdminDep = Annotated[Principal, Depends(require_roles(Role.ADMIN))]


def media_type(content_type: str | None) -> str:
    """``text/csv; charset=utf-8`` -> ``text/csv``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def require_json_body(request: Request) -> None:
    """415 unless the body is declared JSON (for routes whose body FastAPI parses itself)::

        @router.post("/things", dependencies=[Depends(require_json_body)])
    """
    content_type = media_type(request.headers.get("content-type"))
    if content_type != "application/json":
        raise APIError(415, f"unsupported Content-Type {content_type or '(none)'!r}: send application/json",
                       details={"supported": ["application/json"]})


# Team scoping: another team's resource is 404, so its existence does not leak.

def scope_to_team(query: Select, principal: Principal) -> Select:
    """Restrict a query that selects from ``batches`` to what the principal may see."""
    return query if principal.sees_all_teams else query.where(Batch.team == principal.team)


def looks_like_id(value: str) -> bool:
    """Ids are UUIDs; anything else (a NUL byte, say, which PostgreSQL refuses) cannot name a row."""
    return bool(UUID_PATTERN.match(value))


def visible_batch(session: Session, principal: Principal, batch_id: str, *, for_update: bool = False) -> Batch:
    if not looks_like_id(batch_id):
        raise not_found("batch")
    query = select(Batch).where(Batch.id == batch_id)
    if for_update:
        query = query.with_for_update()
    batch = session.scalar(query)
    if batch is None or not principal.can_see_team(batch.team):
        raise not_found("batch")
    bind_ids(batch_id=batch.id)
    return batch


def visible_image(session: Session, principal: Principal, image_id: str) -> tuple[Image, Batch]:
    return _visible_in_batch(session, principal, Image, image_id, "image")


def visible_item(session: Session, principal: Principal, item_id: str) -> tuple[Item, Batch]:
    return _visible_in_batch(session, principal, Item, item_id, "item")


def _visible_in_batch(session: Session, principal: Principal, model: Any, row_id: str, name: str) -> tuple[Any, Batch]:
    """A row that belongs to a batch, with its batch; another team's row is a 404, like a missing one."""
    if not looks_like_id(row_id):
        raise not_found(name)
    row = session.execute(select(model, Batch).join(Batch, Batch.id == model.batch_id).where(model.id == row_id)).first()
    if row is None or not principal.can_see_team(row[1].team):
        raise not_found(name)
    bind_ids(batch_id=row[1].id, **{f"{name}_id": row[0].id})
    return row[0], row[1]


# Lookup by the submitter's own ids (SKUs) within a batch: ?external_id=sku-1&external_id=sku-2

MAX_EXTERNAL_ID_FILTERS = 100
# One external id as items store it (api/schemas/batches.py): never empty (an empty one is stored as none,
# so it matches nothing), no NUL (PostgreSQL refuses it). The schema states both limits, so FastAPI
# refuses a 101st value or an empty one with the usual 422, and schemathesis generates neither as valid.
ExternalId = Annotated[Text, Field(min_length=1, max_length=MAX_NAME_CHARS)]


def external_id_filter(
    external_id: Annotated[list[ExternalId] | None, Query(
        max_length=MAX_EXTERNAL_ID_FILTERS,
        description=f"items with these external ids; repeatable, at most {MAX_EXTERNAL_ID_FILTERS}",
    )] = None,
) -> list[str]:
    return external_id or []


ExternalIdsDep = Annotated[list[str], Depends(external_id_filter)]
