"""The audit trail for compliance (auditor, admin): events with filters, streamed exports, verify."""
from __future__ import annotations

from dataclasses import replace
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from api.deps import AuditorDep, SessionDep
from api.errors import KEYED, APIError, error_responses
from api.queries import bad_cursor, decode_cursor, encode_cursor
from api.schemas.common import QueryDatetime
from core.audit.anchors import load_anchors
from core.audit.export import EventFilter, read_page, record_export, stream_export
from core.audit.verify import MAX_PROBLEMS, verify_chain
from core.storage import get_store

router = APIRouter(prefix="/audit", tags=["audit"])

CURSOR_KIND = "audit"
NO_NUL = r"^[^\x00]*$"
MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}
ERROR_RESPONSES = error_responses(*KEYED, meanings={
    403: "role may not read the audit trail", 422: "invalid filters or cursor",
    503: "the database or the object storage is not answering (anchors cannot be checked)"})


class ExportFormat(StrEnum):
    JSON = "json"
    JSONL = "jsonl"
    CSV = "csv"


class AuditEventOut(BaseModel):
    seq: int
    ts: str = Field(description="UTC, ISO 8601")
    actor: str
    action: str
    batch_id: str | None
    item_id: str | None
    image_id: str | None
    payload: dict[str, Any]
    prev_hash: str
    hash: str


class AuditEventPage(BaseModel):
    events: list[AuditEventOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")


class ChainProblem(BaseModel):
    seq: int
    kind: str = Field(description="edited | deleted | inserted | reordered | anchor_mismatch | anchor_missing")
    detail: str
    last_seq: int | None = None


class VerifyOut(BaseModel):
    ok: bool
    events: int
    head: str
    head_seq: int
    anchors: int = Field(description="anchors in object storage checked against the chain")
    problems: list[ChainProblem] = Field(description=f"the first problems found (at most {MAX_PROBLEMS})")
    problems_total: int


@router.get(
    "/events", response_model=AuditEventPage, responses={
        **ERROR_RESPONSES,
        200: {"description": "a JSON page, or the whole export streamed as JSON Lines / CSV",
              "content": {"application/x-ndjson": {}, "text/csv": {}}},
    },
    summary="Audit events by seq; format=jsonl|csv streams every match and is itself audited",
)
def list_events(
    session: SessionDep,
    principal: AuditorDep,
    format: ExportFormat = ExportFormat.JSON,
    since: Annotated[QueryDatetime | None, Query(description="ts >= since")] = None,
    until: Annotated[QueryDatetime | None, Query(description="ts < until")] = None,
    batch_id: Annotated[str | None, Query(max_length=36, pattern=NO_NUL)] = None,
    actor: Annotated[str | None, Query(max_length=200, pattern=NO_NUL)] = None,
    action: Annotated[str | None, Query(max_length=100, pattern=NO_NUL)] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="JSON page size")] = 100,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Any:
    event_filter = EventFilter(since=since, until=until, batch_id=batch_id, actor=actor, action=action)
    if format == ExportFormat.JSON:
        if cursor:  # an empty cursor is the first page, as in every other listing
            event_filter = replace(event_filter, after_seq=_cursor_seq(cursor))
        events, next_seq = read_page(session, event_filter, limit)
        return AuditEventPage.model_validate({
            "events": events, "next_cursor": encode_cursor(CURSOR_KIND, next_seq) if next_seq is not None else None,
        })
    bounded = record_export(session, actor=principal.actor, fmt=format.value, event_filter=event_filter)
    session.commit()
    filename = f"audit-events-through-{bounded.through_seq}.{format.value}"
    return StreamingResponse(
        stream_export(session.get_bind(), bounded, format.value), media_type=MEDIA_TYPES[format.value],
        headers={"Content-Disposition": f'attachment; filename="{filename}"',
                 "X-Audit-Through-Seq": str(bounded.through_seq)},
    )


def _cursor_seq(cursor: str) -> int:
    position = decode_cursor(cursor, CURSOR_KIND)
    if not position.isdigit():
        raise bad_cursor()
    return int(position)


@router.get("/verify", response_model=VerifyOut, responses=ERROR_RESPONSES,
            summary="Recompute the hash chain and check it against the chain head and the anchors")
def verify(session: SessionDep, principal: AuditorDep) -> VerifyOut:
    try:
        anchors = load_anchors(get_store())
    except Exception as exc:  # noqa: BLE001 - any storage failure means the anchors cannot be checked
        raise APIError(503, f"cannot read the chain anchors from object storage: {type(exc).__name__}") from None
    result = verify_chain(session.get_bind(), anchors)
    return VerifyOut.model_validate(result.as_dict())
