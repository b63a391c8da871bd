"""Read-side queries that turn ledger rows into response models (routes stay thin)."""
from __future__ import annotations

import base64
import binascii
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, and_, exists, func, or_, select
from sqlalchemy.orm import Session

from api.deps import UUID_PATTERN, looks_like_id
from api.errors import APIError
from api.schemas import (
    BatchOut,
    BatchPage,
    ImageDetail,
    ImageOut,
    ItemDetail,
    ItemOut,
    ItemPage,
)
from api.schemas.batches import progress_of
from api.schemas.results import ProgressEvent
from api.schemas.review import Finding, QueueEntry
from api.schemas.teams import DeliveryOut, DeliveryPage, LimitsOut, WebhookSettingsOut
from api.schemas.verify import CredentialsOut
from api.signing import object_url
from core import canary, ledger, quotas
from core.dispatch import in_flight
from core.keys import Principal
from core.review import review_counts
from core.settings import get_settings
from core.teams import team_settings
from models import Batch, BatchStatus, Image, Item, ItemState, Outbox, QcResult, Review, Verdict, WebhookDelivery

TERMINAL_STATUSES = {BatchStatus.SUCCEEDED, BatchStatus.COMPLETED_WITH_ERRORS, BatchStatus.CANCELLED}
VERDICT_SEVERITY = {Verdict.PASS: 0, Verdict.REVIEW: 1, Verdict.REJECT: 2}


# Cursors are opaque to clients: base64 of "<kind>:<position>".

def encode_cursor(kind: str, position: str | int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str, kind: str) -> str:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    found_kind, _, position = text.partition(":")
    if found_kind != kind or not position:
        raise bad_cursor()
    return position


def bad_cursor() -> APIError:
    return APIError(422, "the request is not valid", details=[{
        "field": "query.cursor", "loc": ["query", "cursor"],
        "message": "not a cursor this listing handed out", "type": "value_error",
    }])


def newest_first_page(session: Session, query: Select, model: Any, kind: str, limit: int,
                      cursor: str | None) -> tuple[list[Any], str | None]:
    """One page of ``model`` rows newest first (``created_at``, ``id``); the cursor is the last row
    seen, so pages stay stable while rows arrive."""
    if cursor:
        after_id = decode_cursor(cursor, kind)
        after = session.execute(select(model.created_at, model.id).where(model.id == after_id)).first() \
            if looks_like_id(after_id) else None
        if after is None:
            raise bad_cursor()
        query = query.where(or_(model.created_at < after.created_at,
                                and_(model.created_at == after.created_at, model.id < after.id)))
    rows = list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    return rows[:limit], encode_cursor(kind, rows[limit - 1].id) if len(rows) > limit else None


# Batches

def batch_views(session: Session, batches: Sequence[Batch]) -> list[BatchOut]:
    counts = ledger.state_counts(session, [b.id for b in batches])
    reviews = review_counts(session, [b.id for b in batches])
    statuses = {b.id: ledger.batch_status(b, counts[b.id]) for b in batches}
    ended = [b.id for b in batches if b.finished_at is None and statuses[b.id] in TERMINAL_STATUSES]
    last_finished = _last_finished(session, ended)
    # Only a canary batch runs two models: the others skip the per-model query.
    by_model = canary.compare_batches(session, [b.id for b in batches if b.canary])
    return [
        BatchOut.model_validate({
            **{column: getattr(b, column) for column in BATCH_COLUMNS},
            "status": statuses[b.id],
            "counts": counts[b.id],
            "progress": progress_of(counts[b.id]),
            "review": reviews[b.id],
            "finished_at": b.finished_at or last_finished.get(b.id),
            "by_model": by_model.get(b.id),
        })
        for b in batches
    ]


BATCH_COLUMNS = (
    "id", "name", "team", "priority", "params", "webhook_url", "idempotency_key", "submitted_by",
    "total_items", "total_images", "created_at", "cancel_requested_at", "brand_rules_version", "canary",
)


def _last_finished(session: Session, batch_ids: list[str]) -> dict[str, object]:
    # A batch whose items all ended finished when its last item did (the worker may not stamp it).
    if not batch_ids:
        return {}
    rows = session.execute(
        select(Item.batch_id, func.max(Item.finished_at)).where(Item.batch_id.in_(batch_ids)).group_by(Item.batch_id)
    )
    return {batch_id: finished for batch_id, finished in rows}


def batch_view(session: Session, batch: Batch) -> BatchOut:
    return batch_views(session, [batch])[0]


def progress_event(session: Session, batch_id: str) -> ProgressEvent:
    """A batch's progress as its events stream pushes it: counts per state, verdicts, decisions."""
    view = batch_view(session, session.get(Batch, batch_id))
    review = view.review.model_dump(by_alias=True)
    return ProgressEvent(
        batch_id=view.id, status=view.status, total_items=view.total_items,
        done_items=sum(view.counts.get(state, 0) for state in ItemState.finished()), counts=view.counts,
        review=review, awaiting_review=review.get("awaiting_review", 0),
        finished=view.status in TERMINAL_STATUSES,
    )


def page_batches(session: Session, principal: Principal, *, limit: int, cursor: str | None = None,
                 team: str | None = None) -> BatchPage:
    """Newest first; the cursor is the last batch seen, so pages stay stable while batches arrive."""
    query = select(Batch)
    if not principal.sees_all_teams:
        query = query.where(Batch.team == principal.team)
    elif team is not None:
        query = query.where(Batch.team == team)
    rows, next_cursor = newest_first_page(session, query, Batch, "b", limit, cursor)
    return BatchPage(batches=batch_views(session, rows), next_cursor=next_cursor)


# Items and images

def page_items(session: Session, batch: Batch, *, limit: int, base_url: str, cursor: str | None = None,
               states: Sequence[str] = (), verdicts: Sequence[str] = (),
               external_ids: Sequence[str] = ()) -> ItemPage:
    """Items in submission order (seq); a verdict filter keeps items with an image of that verdict."""
    query = select(Item).where(Item.batch_id == batch.id)
    if cursor:
        position = decode_cursor(cursor, "i")
        if not re.fullmatch(r"[0-9]{1,12}", position):
            raise bad_cursor()
        query = query.where(Item.seq > int(position))
    if states:
        query = query.where(Item.state.in_(states))
    if external_ids:
        query = query.where(Item.external_id.in_(external_ids))
    if verdicts:
        query = query.where(exists().where(Image.item_id == Item.id, Image.qc_verdict.in_(verdicts)))
    rows = list(session.scalars(query.order_by(Item.seq).limit(limit + 1)))
    next_cursor = encode_cursor("i", rows[limit - 1].seq) if len(rows) > limit else None
    items = rows[:limit]
    images = _images_of(session, [i.id for i in items])
    scores = _scores_of(session, [image.id for group in images.values() for image in group])
    return ItemPage(
        items=[
            _item_out(item, [_image_out(image, base_url, scores.get(image.id, {})) for image in images[item.id]])
            for item in items
        ],
        next_cursor=next_cursor,
    )


def item_detail(session: Session, item: Item, batch: Batch, base_url: str) -> ItemDetail:
    images = _images_of(session, [item.id])[item.id]
    image_ids = [image.id for image in images]
    qc = ledger.qc_results_by_image(session, image_ids)
    reviews = defaultdict(list)
    for review in session.scalars(
        select(Review).where(Review.image_id.in_(image_ids)).order_by(Review.created_at, Review.id)
    ):
        reviews[review.image_id].append(review)
    details = [
        ImageDetail.model_validate({
            **_image_out(image, base_url, {r.scorer: r.metrics for r in qc[image.id]}).model_dump(),
            "qc_results": qc[image.id], "reviews": reviews[image.id], "timings": image.timings,
        })
        for image in images
    ]
    base = _item_out(item, details).model_dump(exclude={"images"})
    return ItemDetail.model_validate({**base, "batch_name": batch.name, "team": batch.team, "images": details})


def _images_of(session: Session, item_ids: list[str]) -> dict[str, list[Image]]:
    images: dict[str, list[Image]] = {item_id: [] for item_id in item_ids}
    if item_ids:
        query = select(Image).where(Image.item_id.in_(item_ids)).order_by(Image.item_id, Image.index, Image.created_at)
        for image in session.scalars(query):
            images[image.item_id].append(image)
    return images


def _scores_of(session: Session, image_ids: list[str]) -> dict[str, dict[str, dict]]:
    return {image_id: {r.scorer: r.metrics for r in results}
            for image_id, results in ledger.qc_results_by_image(session, image_ids).items()}


IMAGE_COLUMNS = (
    "id", "index", "seed", "width", "height", "sha256", "storage_key", "model_id", "weights_sha256",
    "parent_image_id", "refine", "qc_verdict", "qc_reasons", "review_status", "created_at",
)
ITEM_COLUMNS = (
    "id", "batch_id", "seq", "external_id", "prompt", "seed", "num_images", "state", "attempts", "error",
    "created_at", "started_at", "finished_at",
)


def _image_out(image: Image, base_url: str, scores: dict[str, dict]) -> ImageOut:
    return ImageOut.model_validate({
        **{column: getattr(image, column) for column in IMAGE_COLUMNS},
        "url": object_url(image.storage_key, base_url),
        "scores": scores,
        "credentials": credentials_out(image.credentials),
    })


def credentials_out(state: dict | None) -> CredentialsOut | None:
    """The image's credential state as recorded by the worker (worker/sealing.py)."""
    if not state:
        return None
    c2pa, mark = state.get("c2pa") or {}, state.get("watermark") or {}
    return CredentialsOut(signed=bool(c2pa.get("signed")), format=c2pa.get("format"), signer=c2pa.get("signer"),
                          development_chain=bool(c2pa.get("development_chain")),
                          watermark="embedded" if mark.get("embedded") else "skipped",
                          watermark_id=mark.get("id") if mark.get("embedded") else None,
                          watermark_skipped=mark.get("skipped"))


def _item_out(item: Item, images: list[ImageOut]) -> ItemOut:
    verdicts = [image.qc_verdict for image in images if image.qc_verdict in VERDICT_SEVERITY]
    worst = max(verdicts, key=lambda v: VERDICT_SEVERITY[v]) if verdicts else None
    return ItemOut.model_validate({
        **{column: getattr(item, column) for column in ITEM_COLUMNS}, "verdict": worst, "images": images,
    })


# -- the QA queue ---------------------------------------------------------------------

# The headline metric of each scorer, shown on every queue entry ("scorer.metric").
HEADLINE_METRICS = {
    "black": ("luma_p99",), "blank": ("entropy_bits",), "exposure": ("luma_mean",),
    "contrast": ("rms_contrast",), "sharpness": ("laplacian_ratio",),
    "duplicate": ("nearest_distance", "nearest_colour_distance"), "nsfw_detector": ("nsfw_prob",),
    "attribute_alignment": ("score",), "clip_alignment": ("score",),
}


def queue_entries(session: Session, rows: list[Any], base_url: str) -> list[QueueEntry]:
    images = [row.Image for row in rows]
    results = ledger.qc_results_by_image(session, [image.id for image in images])
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
            credentials=credentials_out(image.credentials), created_at=image.created_at,
        ))
    return entries


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


# Webhook deliveries

def page_deliveries(session: Session, principal: Principal, *, limit: int, cursor: str | None = None,
                    batch_id: str | None = None, status: str | None = None) -> DeliveryPage:
    """Newest first, the principal's team only unless it sees every team; the cursor is the last seen."""
    query = select(WebhookDelivery)
    if not principal.sees_all_teams:
        query = query.where(WebhookDelivery.team == principal.team)
    if batch_id is not None:
        query = query.where(WebhookDelivery.batch_id == batch_id)
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    rows, next_cursor = newest_first_page(session, query, WebhookDelivery, "w", limit, cursor)
    return DeliveryPage(deliveries=[DeliveryOut.model_validate(row) for row in rows], next_cursor=next_cursor)


def team_limits(session: Session, team: str) -> LimitsOut:
    limits = quotas.limits_for(session, team, get_settings())
    return LimitsOut(team=team, max_queued_images=limits.max_queued_images,
                     submissions_per_minute=limits.submissions_per_minute, overrides=limits.overrides,
                     queued_images=quotas.queued_images(session, team))


def webhook_settings(session: Session, team: str) -> WebhookSettingsOut:
    row = team_settings(session, team)
    return WebhookSettingsOut(team=team, url=row.webhook_url if row else None,
                              has_secret=bool(row and row.webhook_secret),
                              secret_rotated_at=row.webhook_secret_rotated_at if row else None)


# Metrics: cheap reads of the ledger (api/metrics.py throttles them)

def item_state_counts(session: Session) -> dict[str, int]:
    return {state: n for state, n in session.execute(select(Item.state, func.count()).group_by(Item.state))}


def outbox_counts(session: Session) -> dict[tuple[str, str], int]:
    """(queue, "pending" | "in_flight") -> chunks; both filters are served by the outbox's indexes."""
    pending = select(Outbox.queue, func.count()).where(Outbox.dispatched_at.is_(None)).group_by(Outbox.queue)
    flying = select(Outbox.queue, func.count()).where(in_flight()).group_by(Outbox.queue)
    counts = {(queue, "pending"): n for queue, n in session.execute(pending)}
    counts.update({(queue, "in_flight"): n for queue, n in session.execute(flying)})
    return counts
