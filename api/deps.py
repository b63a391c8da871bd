"""FastAPI dependencies: a ledger session per request, the calling principal, role and team checks.

Routes declare what they need with the ``Annotated`` aliases at the bottom::

    def route(session: SessionDep, principal: SubmitterDep): ...
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from api.errors import APIError, not_found
from core import keys
from core.db import get_engine, session_factory
from core.keys import Principal
from models import Batch, Image, Item, Role

ALL_ROLES = tuple(Role)
UUID_PATTERN = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
BEARER = "bearer"


def get_session() -> Iterator[Session]:
    """One session per request; routes commit what they change, anything uncommitted is rolled back."""
    session = session_factory(get_engine())()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def unauthorized(message: str) -> APIError:
    return APIError(401, message, headers={"WWW-Authenticate": "Bearer"})


def current_principal(request: Request, session: SessionDep) -> Principal:
    """The principal of ``Authorization: Bearer <key>``; 401 for a missing, unknown or revoked key."""
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
    return row[0], row[1]
