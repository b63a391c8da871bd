"""Delivery: a batch's results file and zip archive, streamed; its progress as server-sent events
(docs/architecture.md, "Results out, progress pushed, the remote client")."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from enum import StrEnum
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse, ServerSentEvent

from api import queries
from api.deps import ExternalIdsDep, ReaderDep, SessionDep, authenticate, in_short_session, visible_batch
from api.report import batch_report, report_html
from api.results import ResultFilter, archive_stream, csv_stream, jsonl_stream, result_pages
from api.routes.batches import BATCH_ERRORS
from api.schemas.results import BatchReport
from core.storage import get_store
from models import ItemState, ReviewDecision, Verdict

router = APIRouter(prefix="/batches", tags=["delivery"])


class ResultFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"


MEDIA_TYPES = {ResultFormat.CSV: "text/csv; charset=utf-8", ResultFormat.JSONL: "application/x-ndjson"}
StateFilter = Annotated[list[ItemState] | None, Query(description="item states; repeatable")]
VerdictFilter = Annotated[list[Verdict] | None, Query(description="images of these QC verdicts; repeatable")]
DecisionFilter = Annotated[list[ReviewDecision] | None, Query(
    description="images with these review decisions; with verdict, either matches (verdict=pass&decision=approved: "
                "what can ship)")]


def result_filter(external_ids: ExternalIdsDep, state: StateFilter = None, verdict: VerdictFilter = None,
                  decision: DecisionFilter = None) -> ResultFilter:
    return ResultFilter(states=[s.value for s in state or ()], verdicts=[v.value for v in verdict or ()],
                        decisions=[d.value for d in decision or ()], external_ids=external_ids)


FilterDep = Annotated[ResultFilter, Depends(result_filter)]


@router.get(
    "/{batch_id}/results", response_class=StreamingResponse, responses={
        **BATCH_ERRORS, 200: {"content": {MEDIA_TYPES[ResultFormat.CSV]: {}, MEDIA_TYPES[ResultFormat.JSONL]: {}},
                                 "description": "one row per image (or per item without one); see ResultRow"}},
    summary="The batch's results, one row per image, as CSV or JSON Lines (streamed; filter by state, verdict, "
            "decision, external id)",
)
def batch_results(
    batch_id: str, request: Request, session: SessionDep, principal: ReaderDep,
    filters: FilterDep, format: ResultFormat = ResultFormat.JSONL,  # noqa: A002
) -> StreamingResponse:
    batch = visible_batch(session, principal, batch_id)
    pages = result_pages(batch.id, filters,
                         base_url=str(request.base_url))
    body = csv_stream(pages) if format is ResultFormat.CSV else jsonl_stream(pages)
    return StreamingResponse(body, media_type=MEDIA_TYPES[format], headers={
        "Content-Disposition": f'attachment; filename="batch-{batch.id}-results.{format.value}"',
        "Cache-Control": "no-store"})


@router.get(
    "/{batch_id}/archive.zip", response_class=StreamingResponse,
    responses={**BATCH_ERRORS, 200: {"content": {"application/zip": {}}}},
    summary="The batch's images named by external id, plus manifest.csv, as one zip (streamed; same filters)",
)
def batch_archive(
    batch_id: str, session: SessionDep, principal: ReaderDep,
    filters: FilterDep,
) -> StreamingResponse:
    batch = visible_batch(session, principal, batch_id)
    pages = result_pages(batch.id, filters, base_url=None)
    return StreamingResponse(archive_stream(pages, get_store()), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="batch-{batch.id}.zip"', "Cache-Control": "no-store"})


# -- progress, pushed ----------------------------------------------------------------------

PING_SECONDS = 15  # a comment line now and then keeps proxies from closing a quiet stream


@router.get(
    "/{batch_id}/events", response_class=EventSourceResponse,
    responses={**BATCH_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": (
        "`progress` events (ProgressEvent JSON) whenever the counts change, then one `completed` event when "
        "every item has ended (unless until_complete=false)")}},
    summary="The batch's progress as server-sent events: counts per state, QC verdicts, review decisions",
)
async def batch_events(
    batch_id: str, request: Request,
    interval: Annotated[float, Query(ge=0.2, le=60, description="seconds between reads of the ledger")] = 1.0,
    until_complete: Annotated[bool, Query(description="end the stream when the batch completes (false: keep "
                                                      "pushing review counts)")] = True,
    max_seconds: Annotated[float, Query(ge=0.5, le=86_400, description="end the stream after this long; a client "
                                                                      "reconnects (proxies cut long streams anyway)")]
    = 3600,
) -> EventSourceResponse:
    # No SessionDep: that would hold a database permit for the whole stream (see api/deps.py).
    def check(session: Session) -> str:
        return visible_batch(session, authenticate(request, session), batch_id).id

    await in_short_session(check)  # 401 / 404 before the stream starts
    deadline = time.monotonic() + max_seconds
    return EventSourceResponse(progress_stream(batch_id, interval, until_complete, deadline), ping=PING_SECONDS,
                               headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def progress_stream(batch_id: str, interval: float, until_complete: bool,
                          deadline: float) -> AsyncIterator[ServerSentEvent]:
    last = None
    while time.monotonic() < deadline:
        event = await in_short_session(lambda session: queries.progress_event(session, batch_id))
        if event != last:
            yield ServerSentEvent(event.model_dump_json(), event="progress")
            last = event
        if event.finished and until_complete:
            yield ServerSentEvent(event.model_dump_json(), event="completed")
            return
        await anyio.sleep(interval)


# -- the generation record -------------------------------------------------------------------

# Self-contained and printable: no script, its style inline, nothing loaded from elsewhere.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


@router.get("/{batch_id}/report.json", response_model=BatchReport, responses=BATCH_ERRORS,
            summary="The batch's generation record: submitter, models and code, parameters, outcome, reviewers, "
                    "audit range and anchor")
def batch_report_json(batch_id: str, session: SessionDep, principal: ReaderDep) -> BatchReport:
    return batch_report(session, get_store(), visible_batch(session, principal, batch_id))


# response_class=Response, as for the contact sheet: FastAPI documents a route's error responses under its
# response class's media type, and the errors are JSON (api/errors.py), not HTML.
@router.get("/{batch_id}/report", response_class=Response,
            responses={**BATCH_ERRORS, 200: {"content": {"text/html": {"schema": {"type": "string"}}}}},
            summary="The batch's generation record as a printable HTML page")
def batch_report_page(batch_id: str, session: SessionDep, principal: ReaderDep) -> HTMLResponse:
    report = batch_report(session, get_store(), visible_batch(session, principal, batch_id))
    return HTMLResponse(report_html(report), headers={
        "Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
        "Content-Disposition": f'inline; filename="batch-{batch_id}-report.html"'})
