"""QA review: the queue, decisions, the review page and the batch contact sheet.

``router`` carries every route with its full path (``/v1/...`` and the page at ``/review``), so
``api/main.py`` includes it with one line.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.deps import (
    ReaderDep, ReviewerDep, SessionDep, UUID_PATTERN, require_json_body, require_roles, visible_batch,
    visible_image,
)
from api.errors import APIError, not_found
from api.queries import bad_cursor, decode_cursor, encode_cursor
from api.routes.batches import ERROR_RESPONSES
from api.schemas.items import ReviewOut
from api.schemas.review import (
    REASON_CODE_PATTERN, Finding, QueueEntry, QueuePage, RegenerationOut, ReviewIn, ReviewResult,
)
from api.signing import object_url
from core import review as ledger_review
from core.broker import get_celery
from core.keys import Principal
from core.storage import get_store
from models import Image, QcResult, Role, Verdict
from qc.contact_sheet import batch_contact_sheet, png_bytes

log = logging.getLogger(__name__)

QueueReaderDep = Annotated[Principal, Depends(require_roles(Role.REVIEWER, Role.AUDITOR))]
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PAGE_ASSETS = {"review.js": "text/javascript", "review.css": "text/css"}
# The page loads its own script and style; images may come from S3 presigned URLs on another host.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: http: https:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
CURSOR_KIND = "r"
REVIEW_RESPONSES = {**ERROR_RESPONSES, 404: {"description": "no such image (or another team's)"},
                    409: {"description": "the image already has a decision"}}

# The headline metric of each scorer, shown on every queue entry ("scorer.metric").
HEADLINE_METRICS = {
    "black": ("luma_p99",), "blank": ("entropy_bits",), "exposure": ("luma_mean",),
    "contrast": ("rms_contrast",), "sharpness": ("laplacian_ratio",),
    "duplicate": ("nearest_distance", "nearest_colour_distance"), "nsfw_detector": ("nsfw_prob",),
    "attribute_alignment": ("score",), "clip_alignment": ("score",),
}

api = APIRouter(prefix="/v1", tags=["review"])
page = APIRouter(tags=["review page"])


# -- the queue ---------------------------------------------------------------------------

@api.get("/review", response_model=QueuePage, responses=ERROR_RESPONSES,
         summary="The QA queue: images with QC verdict 'review' and no decision yet, oldest first")
def review_queue(
    request: Request,
    session: SessionDep,
    principal: QueueReaderDep,
    batch_id: Annotated[str | None, Query(pattern=UUID_PATTERN.pattern)] = None,
    reason: Annotated[str | None, Query(pattern=REASON_CODE_PATTERN, description="a QC reason, e.g. blurry")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=300)] = None,
) -> QueuePage:
    filters: dict[str, Any] = {"batch_id": batch_id, "reason": reason}
    if not principal.sees_all_teams:  # only roles that see every team reach here; keep the rule anyway
        filters["team"] = principal.team
    after = _position(cursor) if cursor else None
    rows, next_position = ledger_review.queue_page(session, limit, after=after, **filters)
    entries = queue_entries(session, rows, str(request.base_url))
    return QueuePage(
        entries=entries,
        next_cursor=encode_cursor(CURSOR_KIND, next_position.encode()) if next_position else None,
        total=None if cursor else ledger_review.queue_size(session, **filters),
    )


def _position(cursor: str) -> ledger_review.QueuePosition:
    try:
        return ledger_review.QueuePosition.decode(decode_cursor(cursor, CURSOR_KIND))
    except ValueError:
        raise bad_cursor() from None


def queue_entries(session: Session, rows: list[Any], base_url: str) -> list[QueueEntry]:
    images = [row.Image for row in rows]
    results = _qc_results(session, [image.id for image in images])
    twins = {image.id: _twin_ref(results.get(image.id, [])) for image in images}
    keys = _storage_keys(session, {image.parent_image_id for image in images} | set(twins.values()))
    url = lambda image_id: object_url(keys[image_id], base_url) if image_id in keys else None  # noqa: E731
    entries = []
    for row in rows:
        image, item, batch = row.Image, row.Item, row.Batch
        twin = twins[image.id] if twins[image.id] in keys else None
        entries.append(QueueEntry(
            image_id=image.id, item_id=item.id, batch_id=batch.id, batch_name=batch.name, team=batch.team,
            external_id=item.external_id, prompt=item.prompt, seed=image.seed, index=image.index,
            width=image.width, height=image.height, verdict=image.qc_verdict, reasons=image.qc_reasons or [],
            metrics=headline_metrics(results.get(image.id, [])),
            findings=[Finding.model_validate(r) for r in results.get(image.id, []) if r.reasons],
            url=object_url(image.storage_key, base_url), parent_image_id=image.parent_image_id,
            parent_url=url(image.parent_image_id), twin_image_id=twin, twin_url=url(twin),
            created_at=image.created_at,
        ))
    return entries


def _qc_results(session: Session, image_ids: list[str]) -> dict[str, list[QcResult]]:
    grouped: dict[str, list[QcResult]] = {}
    if image_ids:
        for result in session.scalars(select(QcResult).where(QcResult.image_id.in_(image_ids)).order_by(QcResult.id)):
            grouped.setdefault(result.image_id, []).append(result)
    return grouped


def _storage_keys(session: Session, image_ids: set[str | None]) -> dict[str, str]:
    wanted = [image_id for image_id in image_ids if image_id]
    if not wanted:
        return {}
    return dict(session.execute(select(Image.id, Image.storage_key).where(Image.id.in_(wanted))).tuples())


def _twin_ref(results: list[QcResult]) -> str | None:
    # The duplicate scorer names an earlier chunk's twin by image id (the worker's known hashes).
    duplicate = next((r for r in results if r.scorer == "duplicate"), None)
    ref = (duplicate.metrics or {}).get("twin_ref") if duplicate and duplicate.reasons else None
    return ref if isinstance(ref, str) and UUID_PATTERN.match(ref) else None


def headline_metrics(results: list[QcResult]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for result in results:
        for name in HEADLINE_METRICS.get(result.scorer, ()):
            value = (result.metrics or {}).get(name)
            if value is not None:
                summary[f"{result.scorer}.{name}"] = value
    return summary


# -- decisions ---------------------------------------------------------------------------

@api.post("/images/{image_id}/review", response_model=ReviewResult, responses=REVIEW_RESPONSES,
          dependencies=[Depends(require_json_body)],
          summary="Approve, reject or regenerate an image (once); regenerate queues a new image for its item")
def review_image(image_id: str, body: ReviewIn, background: BackgroundTasks, session: SessionDep,
                 principal: ReviewerDep) -> ReviewResult:
    image, _batch = visible_image(session, principal, image_id)
    try:
        result = ledger_review.decide(session, image, body.decision, body.reason_code,
                                      reviewer=principal, comment=body.comment)
    except ledger_review.AlreadyDecided as exc:
        session.rollback()
        raise APIError(409, f"this image was already decided: {exc.status}", code="already_decided",
                       details={"review_status": exc.status}) from None
    session.commit()
    if result.regeneration is not None:
        background.add_task(publish_regeneration, result.regeneration)
    return ReviewResult(
        image_id=image.id, item_id=image.item_id, batch_id=image.batch_id, review_status=image.review_status,
        review=ReviewOut.model_validate(result.review),
        regeneration=RegenerationOut.model_validate(result.regeneration) if result.regeneration else None,
    )


def publish_regeneration(request: ledger_review.RegenerationRequest) -> None:
    """After the commit. A broker outage is only logged: the request is in the ledger and
    ``core.review.republish_pending`` (the sweeper) sends it again."""
    try:
        ledger_review.publish_regeneration(get_celery(), request)
    except Exception as exc:  # noqa: BLE001 - any broker failure leaves the request pending
        log.warning("regeneration of image %s not published, left for the sweeper: %s",
                    request.parent_image_id, exc)


# -- contact sheet -----------------------------------------------------------------------

@api.get("/batches/{batch_id}/contact-sheet.png", response_class=Response, tags=["batches"],
         responses={**ERROR_RESPONSES, 200: {"content": {"image/png": {}}}},
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


# -- the page ----------------------------------------------------------------------------

@page.get("/review", response_class=HTMLResponse,
          summary="The QA review page (asks for an API key in the browser; the data calls carry it)")
def review_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "review.html", media_type="text/html", headers=_page_headers())


@page.get("/review/assets/{name}", response_class=Response, summary="The review page's script and style")
def review_asset(name: str) -> FileResponse:
    if name not in PAGE_ASSETS:
        raise not_found("asset")
    return FileResponse(STATIC_DIR / name, media_type=PAGE_ASSETS[name], headers=_page_headers())


def _page_headers() -> dict[str, str]:
    return {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


router = APIRouter()
router.include_router(api)
router.include_router(page)
