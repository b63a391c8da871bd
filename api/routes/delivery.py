"""Delivery: a batch's results file and zip archive, streamed (docs/architecture.md, "Delivery")."""
from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import ExternalIdsDep, ReaderDep, SessionDep, visible_batch
from api.results import ResultFilter, archive_stream, csv_stream, jsonl_stream, result_pages
from api.routes.batches import ERROR_RESPONSES
from core.storage import get_store
from models import ItemState, ReviewDecision, Verdict

router = APIRouter(prefix="/batches", tags=["delivery"])


class ResultFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"


MEDIA_TYPES = {ResultFormat.CSV: "text/csv; charset=utf-8", ResultFormat.JSONL: "application/x-ndjson"}
StateFilter = Annotated[list[ItemState] | None, Query(description="item states; repeatable")]
VerdictFilter = Annotated[list[Verdict] | None, Query(description="images of these QC verdicts; repeatable")]
DecisionFilter = Annotated[list[ReviewDecision] | None, Query(description="images with these review decisions")]


def result_filter(external_ids: ExternalIdsDep, state: StateFilter = None, verdict: VerdictFilter = None,
                  decision: DecisionFilter = None) -> ResultFilter:
    return ResultFilter(states=[s.value for s in state or ()], verdicts=[v.value for v in verdict or ()],
                        decisions=[d.value for d in decision or ()], external_ids=external_ids)


FilterDep = Annotated[ResultFilter, Depends(result_filter)]


@router.get(
    "/{batch_id}/results", response_class=StreamingResponse, responses={
        **ERROR_RESPONSES, 200: {"content": {MEDIA_TYPES[ResultFormat.CSV]: {}, MEDIA_TYPES[ResultFormat.JSONL]: {}},
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
    responses={**ERROR_RESPONSES, 200: {"content": {"application/zip": {}}}},
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
