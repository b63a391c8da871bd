"""QA review: the queue, decisions and the review page.

``router`` carries every route with its full path (``/v1/...`` and the page at ``/review``), so
``api/main.py`` includes it with one line.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from api import queries
from api.deps import (
    UUID_PATTERN,
    ReviewerDep,
    SessionDep,
    require_json_body,
    require_roles,
    visible_image,
)
from api.errors import KEYED, WITH_BODY, APIError, error_responses, not_found
from api.queries import bad_cursor, decode_cursor, encode_cursor
from api.schemas.items import ReviewOut
from api.schemas.review import (
    REASON_CODE_PATTERN,
    QueuePage,
    RegenerationOut,
    ReviewIn,
    ReviewResult,
)
from core import review as ledger_review
from core.broker import get_celery
from core.keys import Principal
from models import Role

log = logging.getLogger(__name__)

QueueReaderDep = Annotated[Principal, Depends(require_roles(Role.REVIEWER, Role.AUDITOR))]
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PAGE_ASSETS = {"review.js": "text/javascript", "review.css": "text/css"}
# The page loads its own script and style; images may come from S3 presigned URLs on another host.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: http: https:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
CURSOR_KIND = "r"
REVIEW_RESPONSES = error_responses(*KEYED, *WITH_BODY, 404, 409, meanings={
    404: "no such image (or another team's)", 409: "the image already has a decision"})

api = APIRouter(prefix="/v1", tags=["review"])
page = APIRouter(tags=["review page"])


# -- the queue ---------------------------------------------------------------------------

@api.get("/review", response_model=QueuePage, responses=error_responses(*KEYED),
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
    entries = queries.queue_entries(session, rows, str(request.base_url))
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


# -- the page ----------------------------------------------------------------------------

@page.get("/review", response_class=HTMLResponse,
          summary="The QA review page (asks for an API key in the browser; the data calls carry it)")
def review_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "review.html", media_type="text/html", headers=_page_headers())


@page.get("/review/assets/{name}", response_class=Response, responses=error_responses(404), summary="The review page's script and style")
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
