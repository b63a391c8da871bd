"""Batches: submit (JSON, CSV or a catalogue), preview, list, read, items, cancel, retry."""
from __future__ import annotations

import email.message
import logging
import re
from typing import Annotated

from fastapi import (
    APIRouter,
    BackgroundTasks,
    Depends,
    Header,
    Query,
    Request,
    Response,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import catalogue, queries
from api.deps import ExternalIdsDep, ReaderDep, SessionDep, SubmitterDep, run_before_permit, visible_batch
from api.errors import KEYED, WITH_BODY, APIError, error_responses, too_many_requests
from api.intake import CSV_COLUMNS, CSV_QUERY_FIELDS, parse_batch_request
from api.metrics import BATCHES_SUBMITTED, ITEMS_SUBMITTED
from api.publish import publish_outbox
from api.schemas import (
    BatchOut,
    BatchPage,
    CancelResult,
    ItemPage,
    RetryResult,
)
from api.schemas.catalogue import BatchPreview
from core import ledger, quotas
from core.keys import MAX_TEAM_CHARS, Principal
from core.logs import bind_ids
from core.settings import get_settings
from core.storage import get_store
from models import Batch, ItemState, Verdict
from qc.contact_sheet import batch_contact_sheet, png_bytes

log = logging.getLogger(__name__)
router = APIRouter(prefix="/batches", tags=["batches"])

IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces: fits batches.idempotency_key
NO_BATCH = {404: "no such batch (or another team's)"}
SUBMIT_ERRORS = error_responses(*KEYED, *WITH_BODY, 409, 429, meanings={
    409: "Idempotency-Key reused with another body", 415: "not JSON, CSV or JSON Lines"})
PREVIEW_ERRORS = error_responses(*KEYED, *WITH_BODY, meanings={415: "not JSON, CSV or JSON Lines"})
READ_ERRORS = error_responses(*KEYED)
BATCH_ERRORS = error_responses(*KEYED, 404, meanings=NO_BATCH)
CANCEL_ERRORS = error_responses(*KEYED, 404, 409, meanings={**NO_BATCH, 409: "the batch has finished: nothing to cancel"})
BATCH_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "The batch as JSON, or a CSV with a header naming some of "
            f"{', '.join(CSV_COLUMNS)} ('prompt' required; separator ',' ';' or tab, sniffed), or JSON Lines "
            "of item objects; CSV and JSON Lines uploads take the other fields as "
            f"query parameters: {', '.join(CSV_QUERY_FIELDS)}. Without a name, the batch is named after the "
            "upload's Content-Disposition filename, else the date."
        ),
        "content": {
            "application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/BatchCreate"},
                                                      {"$ref": "#/components/schemas/CatalogueBatchCreate"}]}},
            "text/csv": {"schema": {"type": "string"},
                         "example": "prompt,external_id,seed\na red ceramic mug on a white table,sku-1,42\n"},
            "application/x-ndjson": {"schema": {"type": "string"},
                                     "example": '{"prompt": "a red ceramic mug", "external_id": "sku-1"}\n'},
        },
    }
}


async def batch_request(request: Request) -> catalogue.BatchRequest:
    """The submitted batch, parsed off the event loop (a 20 MB body takes a moment) before the request
    holds a database permit, in threads of its own (api/deps.py, run_before_permit): a catalogue when
    the JSON names a ``template``, else a list of prompts (api/intake.py)."""
    body = await request.body()
    content_type = request.headers.get("content-type")
    data = await run_before_permit(catalogue.catalogue_data, content_type, body)
    if data is not None:
        if request.query_params:
            raise APIError(422, "query parameters are for CSV uploads; put them in the JSON body")
        return await run_before_permit(catalogue.parse_catalogue, data)
    return await run_before_permit(parse_batch_request, content_type, body, request.query_params,
                                   upload_filename(request.headers.get("content-disposition")))


def upload_filename(content_disposition: str | None) -> str | None:
    """``attachment; filename="spring.csv"`` -> ``spring.csv`` (the default batch name's source)."""
    if not content_disposition:
        return None
    message = email.message.Message()
    message["content-disposition"] = content_disposition
    return message.get_filename()


async def idempotency_key(key: Annotated[str | None, Header(
        alias="Idempotency-Key", json_schema_extra={"pattern": IDEMPOTENCY_KEY.pattern})] = None) -> str | None:
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise APIError(422, "the request is not valid", details=[{
            "field": "header.Idempotency-Key", "loc": ["header", "Idempotency-Key"],
            "message": "must be 1 to 200 printable ASCII characters without spaces", "type": "value_error",
        }])
    return key


@router.post(
    "", status_code=202, response_model=BatchOut, openapi_extra=BATCH_REQUEST_BODY,
    responses={**SUBMIT_ERRORS, 200: {"model": BatchOut, "description": "an Idempotency-Key replayed: the batch it made"}},
    summary="Submit a batch (JSON or CSV); 202 when new, 200 when an Idempotency-Key replays it",
)
def create_batch(
    response: Response,
    background: BackgroundTasks,
    # Dependencies resolve in this order: the body is read and validated before the session (and
    # its database permit, api/deps.py) exists, so a slow upload holds no permit while it arrives;
    # both are async or use their own threads, so they never queue ahead of permit holders.
    batch_in: Annotated[catalogue.BatchRequest, Depends(batch_request)],
    key: Annotated[str | None, Depends(idempotency_key)],
    session: SessionDep,
    principal: SubmitterDep,
) -> BatchOut:
    plan = catalogue.plan_request(session, principal.team, batch_in)
    batch, created = submit(session, principal, catalogue.checked_spec(plan), key, plan.branded.version)
    bind_ids(batch_id=batch.id)
    log.info("batch accepted" if created else "batch replayed", extra={"items": batch.total_items})
    response.headers["Location"] = f"/v1/batches/{batch.id}"
    if created:
        BATCHES_SUBMITTED.labels(batch.priority).inc()
        ITEMS_SUBMITTED.inc(batch.total_items)
        background.add_task(publish_outbox)
    else:
        response.status_code = 200
        response.headers["Idempotency-Replayed"] = "true"
    return queries.batch_view(session, batch)


def submit(session: Session, principal: Principal, spec: ledger.BatchSpec, key: str | None,
           brand_rules_version: int | None = None) -> tuple[Batch, bool]:
    """Commit the batch; a concurrent twin with the same Idempotency-Key resolves to one batch."""
    if not (key and ledger.find_by_idempotency_key(session, principal.team, key)):  # a replay is free
        try:
            quotas.admit_submission(session, principal.team, sum(i.num_images for i in spec.items), get_settings())
        except quotas.QuotaExceeded as exc:
            raise too_many_requests(exc.code, exc.message, exc.retry_after, exc.details) from None
    for attempt in (1, 2):
        try:
            batch, created = ledger.submit_batch(
                session, spec, team=principal.team, actor=principal.actor, submitted_by=principal.key_id,
                idempotency_key=key, chunk_images=get_settings().chunk_images, brand_rules_version=brand_rules_version,
            )
            session.commit()
            return batch, created
        except ledger.IdempotencyConflict as exc:
            session.rollback()
            raise APIError(409, "this Idempotency-Key was used for another request body",
                           code="idempotency_conflict", details={"batch_id": exc.batch_id}) from None
        except IntegrityError:
            # Another request with the same key committed between our lookup and insert: look again.
            session.rollback()
            if key is None or attempt == 2:
                raise
    raise AssertionError("unreachable")


@router.post(
    ":preview", response_model=BatchPreview, responses=PREVIEW_ERRORS, openapi_extra=BATCH_REQUEST_BODY,
    summary="What a batch would be (count, first prompts, device time, every row's problem); queues nothing",
)
def preview_batch(
    batch_in: Annotated[catalogue.BatchRequest, Depends(batch_request)],  # before the session: see create_batch
    session: SessionDep,
    principal: SubmitterDep,
) -> BatchPreview:
    return catalogue.preview(catalogue.plan_request(session, principal.team, batch_in))


@router.get("", response_model=BatchPage, responses=READ_ERRORS, summary="Batches, newest first")
def list_batches(
    session: SessionDep,
    principal: ReaderDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    team: Annotated[str | None, Query(max_length=MAX_TEAM_CHARS, pattern=r"^[^\x00]+$",
                                      description="reviewers, auditors, admins: one team only")] = None,
) -> BatchPage:
    return queries.page_batches(session, principal, limit=limit, cursor=cursor, team=team)


@router.get("/{batch_id}", response_model=BatchOut, responses=BATCH_ERRORS, summary="One batch")
def get_batch(batch_id: str, session: SessionDep, principal: ReaderDep) -> BatchOut:
    return queries.batch_view(session, visible_batch(session, principal, batch_id))


@router.get("/{batch_id}/items", response_model=ItemPage, responses=BATCH_ERRORS,
            summary="A batch's items in order, with images (time-limited URLs) and QC")
def list_items(
    batch_id: str,
    request: Request,
    session: SessionDep,
    principal: ReaderDep,
    state: Annotated[list[ItemState] | None, Query(description="repeatable")] = None,
    verdict: Annotated[list[Verdict] | None, Query(description="items with an image of this QC verdict")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    external_ids: ExternalIdsDep = (),
) -> ItemPage:
    batch = visible_batch(session, principal, batch_id)
    return queries.page_items(
        session, batch, limit=limit, cursor=cursor, base_url=str(request.base_url),
        states=[s.value for s in state or ()], verdicts=[v.value for v in verdict or ()],
        external_ids=external_ids,
    )


@router.post("/{batch_id}/cancel", response_model=CancelResult, responses=CANCEL_ERRORS,
             summary="Cooperative cancel: queued items stop now, running chunks at their next check")
def cancel_batch(batch_id: str, session: SessionDep, principal: SubmitterDep) -> CancelResult:
    batch = visible_batch(session, principal, batch_id, for_update=True)
    counts = ledger.state_counts(session, [batch.id])[batch.id]
    if not counts[ItemState.QUEUED] and not counts[ItemState.RUNNING]:
        if batch.cancel_requested_at is None:
            raise APIError(409, "the batch has finished: nothing left to cancel", code="batch_finished")
        return CancelResult(batch=queries.batch_view(session, batch), items_cancelled=0)  # already cancelled
    cancelled = ledger.cancel_batch(session, batch, actor=principal.actor)
    session.commit()
    return CancelResult(batch=queries.batch_view(session, batch), items_cancelled=cancelled)


@router.post("/{batch_id}/retry", response_model=RetryResult, responses=BATCH_ERRORS,
             summary="Re-queue the failed and dead items with a fresh attempt budget")
def retry_batch(batch_id: str, background: BackgroundTasks, session: SessionDep,
                principal: SubmitterDep) -> RetryResult:
    batch = visible_batch(session, principal, batch_id, for_update=True)
    requeued = ledger.retry_batch(session, batch, actor=principal.actor, chunk_images=get_settings().chunk_images)
    session.commit()
    if requeued:
        background.add_task(publish_outbox)
    return RetryResult(batch=queries.batch_view(session, batch), items_requeued=requeued)


# -- contact sheet -----------------------------------------------------------------------

@router.get("/{batch_id}/contact-sheet.png", response_class=Response,
         responses={**BATCH_ERRORS, 200: {"content": {"image/png": {}}}},
         summary="A grid PNG of the batch's images, each badged with its QC verdict (and decision)")
def contact_sheet_png(
    batch_id: str,
    session: SessionDep,
    principal: ReaderDep,
    verdict: Annotated[list[Verdict] | None, Query(description="only these verdicts; repeatable")] = None,
    limit: Annotated[int, Query(ge=1, le=2000)] = 500,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    tile: Annotated[int, Query(ge=32, le=512, description="tile side in pixels")] = 128,
    columns: Annotated[int | None, Query(ge=1, le=64)] = None,
) -> Response:
    # A sync route: FastAPI runs it in its thread pool, so drawing hundreds of tiles never blocks the loop.
    batch = visible_batch(session, principal, batch_id)
    sheet = batch_contact_sheet(session, get_store(), batch.id, verdicts=[v.value for v in verdict or ()],
                                limit=limit, offset=offset, tile_size=tile, columns=columns)
    return Response(png_bytes(sheet), media_type="image/png", headers={
        "Content-Disposition": f'inline; filename="contact-sheet-{batch_id}.png"', "Cache-Control": "no-store",
    })
