"""The QA review workflow in the ledger: the queue, decisions, regeneration requests, counts.

Shared by the API (``api/routes/review.py``), the CLI and the worker (``worker/regenerate.py``).

* **Queue**: images whose QC verdict is ``review`` and that nobody has decided yet, oldest
  first, paged by keyset on ``(created_at, id)`` (``ix_images_review_queue`` serves it).
* **Decisions**: ``approve`` / ``reject`` / ``regenerate`` any image exactly once. The queue
  only lists ``review`` images, but a reviewer may also overrule QC explicitly (approve a
  ``reject`` false positive, reject a ``pass``); the Review row keeps the verdict it overruled.
  A second decision is refused (:class:`AlreadyDecided`), also under concurrency: the status is
  set by one guarded UPDATE.
* **Regenerate**: the decision pre-assigns the new image's id and a seed derived from the
  parent's id and its depth in the regeneration chain, and records both (Review.new_image_id,
  the audit event). The worker task ``instabatch.regenerate_image`` makes that image for the
  same item, links it with ``parent_image_id`` and runs QC on it; it is idempotent because the
  id is fixed. A request whose image has not appeared is *pending* and can be published again.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import and_, exists, func, or_, select, type_coerce, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from core import audit
from core.broker import QUEUE_FOR_PRIORITY
from core.params import MAX_SEED
from models import Batch, Image, Item, Review, ReviewDecision, Verdict, utcnow
from models.base import as_utc, new_id

log = logging.getLogger(__name__)

REGENERATE_TASK = "instabatch.regenerate_image"
# A reviewer waits for the new image: regeneration jumps the bulk queues.
REGENERATE_QUEUE = QUEUE_FOR_PRIORITY["high"]
MAX_CHAIN = 1000  # a regeneration chain longer than this is a bug, not a workflow
REVIEW_DECIDED = "review.decision"


class ReviewAction(StrEnum):
    """What a reviewer asks for; the image's ``review_status`` becomes its past tense."""

    APPROVE = "approve"
    REJECT = "reject"
    REGENERATE = "regenerate"

    @property
    def status(self) -> ReviewDecision:
        return STATUS_OF[self]


STATUS_OF = {
    ReviewAction.APPROVE: ReviewDecision.APPROVED,
    ReviewAction.REJECT: ReviewDecision.REJECTED,
    ReviewAction.REGENERATE: ReviewDecision.REGENERATED,
}


class Reviewer(Protocol):
    """Who decides: ``core.keys.Principal`` fits, and so does any object with these fields."""

    key_id: str | None
    name: str

    @property
    def actor(self) -> str: ...


class AlreadyDecided(Exception):
    def __init__(self, image_id: str, status: str | None):
        super().__init__(f"image {image_id} was already decided: {status}")
        self.image_id = image_id
        self.status = status


@dataclass(frozen=True)
class RegenerationRequest:
    parent_image_id: str
    new_image_id: str
    seed: int
    generation: int  # 1 for a regeneration of an original image, 2 for one of its regeneration, ...


@dataclass(frozen=True)
class DecisionResult:
    review: Review
    image: Image
    regeneration: RegenerationRequest | None = None


# -- decisions ---------------------------------------------------------------------------

def decide(session: Session, image: Image, decision: ReviewAction | str, reason_code: str, *,
           reviewer: Reviewer, comment: str | None = None) -> DecisionResult:
    """Record one decision on ``image``: status, Review row, audit event (and the regeneration
    request). The caller commits; :class:`AlreadyDecided` when the image has a decision."""
    decision = ReviewAction(decision)
    status = decision.status
    claimed = session.execute(
        update(Image).where(Image.id == image.id, Image.review_status.is_(None))
        .values(review_status=status.value).returning(Image.id)
        .execution_options(synchronize_session=False)
    ).first()
    if claimed is None:
        current = session.scalar(select(Image.review_status).where(Image.id == image.id))
        raise AlreadyDecided(image.id, current)
    set_committed_value(image, "review_status", status.value)  # the UPDATE above wrote it
    regeneration = regeneration_request(session, image) if decision is ReviewAction.REGENERATE else None
    review = Review(
        id=new_id(), image_id=image.id, decision=status.value, reason_code=reason_code, comment=comment,
        reviewer_key_id=reviewer.key_id, reviewer_name=reviewer.name,
        new_image_id=regeneration.new_image_id if regeneration else None, created_at=utcnow(),
    )
    session.add(review)
    audit.record(session, REVIEW_DECIDED, actor=reviewer.actor, batch_id=image.batch_id, item_id=image.item_id,
                 image_id=image.id, payload=_decision_payload(review, image, regeneration))
    session.flush()
    return DecisionResult(review=review, image=image, regeneration=regeneration)


def _decision_payload(review: Review, image: Image, regeneration: RegenerationRequest | None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "review_id": review.id, "decision": review.decision, "reason_code": review.reason_code,
        "comment": review.comment, "reviewer_key_id": review.reviewer_key_id,
        "reviewer_name": review.reviewer_name, "qc_verdict": image.qc_verdict, "qc_reasons": image.qc_reasons,
        "image_sha256": image.sha256,
    }
    if regeneration is not None:
        payload["regeneration"] = {"new_image_id": regeneration.new_image_id, "seed": regeneration.seed,
                                   "generation": regeneration.generation, "task": REGENERATE_TASK}
    return payload


# -- regeneration ------------------------------------------------------------------------

def chain_depth(session: Session, image: Image) -> int:
    """How many regenerations lie between ``image`` and the original it descends from."""
    depth, parent_id = 0, image.parent_image_id
    while parent_id is not None:
        depth += 1
        if depth > MAX_CHAIN:
            raise RuntimeError(f"regeneration chain of image {image.id} is longer than {MAX_CHAIN}")
        parent_id = session.scalar(select(Image.parent_image_id).where(Image.id == parent_id))
    return depth


def regeneration_seed(parent_image_id: str, generation: int, parent_seed: int | None = None) -> int:
    """Deterministic: the same request always gets the same seed, and never the parent's."""
    digest = hashlib.sha256(f"instabatch.regenerate:{parent_image_id}:{generation}".encode()).digest()
    seed = int.from_bytes(digest[:8], "big") % (MAX_SEED + 1)
    return (seed + 1) % (MAX_SEED + 1) if seed == parent_seed else seed


def regeneration_request(session: Session, parent: Image) -> RegenerationRequest:
    generation = chain_depth(session, parent) + 1
    return RegenerationRequest(parent_image_id=parent.id, new_image_id=new_id(),
                               seed=regeneration_seed(parent.id, generation, parent.seed), generation=generation)


def find_regeneration(session: Session, parent_image_id: str) -> RegenerationRequest | None:
    """The recorded request to regenerate this image, if a reviewer made one."""
    row = session.execute(
        select(Review.new_image_id, Image).join(Image, Image.id == Review.image_id)
        .where(Review.image_id == parent_image_id, Review.decision == ReviewDecision.REGENERATED.value)
    ).first()
    if row is None or row.new_image_id is None:
        return None
    parent = row.Image
    generation = chain_depth(session, parent) + 1
    return RegenerationRequest(parent.id, row.new_image_id, regeneration_seed(parent.id, generation, parent.seed),
                               generation)


def pending_regenerations(session: Session, older_than: timedelta = timedelta(0),
                          limit: int = 500) -> list[RegenerationRequest]:
    """Requests whose new image does not exist yet and that were last sent longer than
    ``older_than`` ago (the API sends each once as it is decided); ended ones are left alone."""
    cutoff = utcnow() - older_than
    last_sent = func.coalesce(Review.regeneration_sent_at, Review.created_at)
    parent_ids = session.scalars(
        select(Review.image_id)
        .where(Review.decision == ReviewDecision.REGENERATED.value, Review.new_image_id.is_not(None),
               Review.regeneration_error.is_(None), last_sent <= cutoff,
               ~exists().where(Image.id == Review.new_image_id))
        .order_by(Review.created_at).limit(limit)
    ).all()
    return [request for parent_id in parent_ids if (request := find_regeneration(session, parent_id))]


def publish_regeneration(celery: Any, request: RegenerationRequest) -> None:
    celery.send_task(REGENERATE_TASK, args=[request.parent_image_id, request.seed], queue=REGENERATE_QUEUE)


def republish_pending(session: Session, celery: Any, older_than: timedelta = timedelta(minutes=10)) -> int:
    """Backstop for the sweeper: publish again every request still without its image.

    Safe to repeat: the worker task does nothing when the image already exists."""
    requests = pending_regenerations(session, older_than)
    for request in requests:
        publish_regeneration(celery, request)
        session.execute(update(Review).where(Review.image_id == request.parent_image_id,
                                             Review.decision == ReviewDecision.REGENERATED.value)
                        .values(regeneration_sent_at=utcnow()).execution_options(synchronize_session=False))
    session.commit()
    return len(requests)


def count_regeneration_attempt(session: Session, parent_image_id: str, max_attempts: int) -> int | None:
    """Count one run of the regenerate task; None when the request ended or is out of attempts."""
    return session.execute(
        update(Review).where(Review.image_id == parent_image_id, Review.decision == ReviewDecision.REGENERATED.value,
                             Review.regeneration_error.is_(None), Review.regeneration_attempts < max_attempts)
        .values(regeneration_attempts=Review.regeneration_attempts + 1)
        .returning(Review.regeneration_attempts).execution_options(synchronize_session=False)
    ).scalar()


def end_regeneration(session: Session, parent_image_id: str, error: str) -> bool:
    """Mark the request ended without an image (visible on the parent's review); True if this call did."""
    return session.execute(
        update(Review).where(Review.image_id == parent_image_id, Review.decision == ReviewDecision.REGENERATED.value,
                             Review.regeneration_error.is_(None))
        .values(regeneration_error=error).execution_options(synchronize_session=False)
    ).rowcount > 0


# -- the queue ---------------------------------------------------------------------------

@dataclass(frozen=True)
class QueuePosition:
    """Keyset position: the last (created_at, id) a page ended on."""

    created_at: datetime
    image_id: str

    def encode(self) -> str:
        return f"{as_utc(self.created_at).isoformat(timespec='microseconds')}|{self.image_id}"

    @classmethod
    def decode(cls, text: str) -> "QueuePosition":
        """ValueError for anything that is not a position this module wrote."""
        stamp, sep, image_id = text.partition("|")
        if not sep or not image_id:
            raise ValueError("not a queue position")
        return cls(as_utc(datetime.fromisoformat(stamp)), image_id)


def awaiting_review() -> Any:
    return and_(Image.qc_verdict == Verdict.REVIEW.value, Image.review_status.is_(None))


def has_reason(session: Session, reason: str) -> Any:
    """``reason`` is one of the image's QC reasons (a JSON list): jsonb containment on PostgreSQL."""
    if session.get_bind().dialect.name == "postgresql":
        return type_coerce(Image.qc_reasons, JSONB).contains([reason])
    reasons = func.json_each(Image.qc_reasons).table_valued("value")
    return exists(select(1).select_from(reasons).where(reasons.c.value == reason))


def queue_conditions(session: Session, *, after: QueuePosition | None = None, batch_id: str | None = None,
                     reason: str | None = None, team: str | None = None) -> list[Any]:
    """WHERE clauses on ``images`` alone, so the planner walks ``ix_images_awaiting_review`` (migration 0003)."""
    conditions = [awaiting_review()]
    if after is not None:
        # The redundant ">=" lets the planner start the index walk at the position.
        conditions += [Image.created_at >= after.created_at, or_(
            Image.created_at > after.created_at,
            and_(Image.created_at == after.created_at, Image.id > after.image_id),
        )]
    if batch_id is not None:
        conditions.append(Image.batch_id == batch_id)
    if reason is not None:
        conditions.append(has_reason(session, reason))
    if team is not None:
        conditions.append(Image.batch_id.in_(select(Batch.id).where(Batch.team == team)))
    return conditions


def queue_page(session: Session, limit: int, **filters: Any) -> tuple[list[Any], QueuePosition | None]:
    """One page of (Image, Item, Batch) rows awaiting review, oldest first, and the position to
    continue from (None on the last page). The page's ids are chosen on ``images`` alone; only
    those rows are joined to their items and batches."""
    page_ids = (select(Image.id).where(*queue_conditions(session, **filters))
                .order_by(Image.created_at, Image.id).limit(limit + 1).subquery())
    rows = session.execute(
        select(Image, Item, Batch).join(page_ids, page_ids.c.id == Image.id)
        .join(Item, Item.id == Image.item_id).join(Batch, Batch.id == Image.batch_id)
        .order_by(Image.created_at, Image.id)
    ).all()
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1].Image if more and rows else None
    return rows, (QueuePosition(last.created_at, last.id) if last else None)


def queue_size(session: Session, **filters: Any) -> int:
    return session.scalar(select(func.count()).select_from(Image).where(*queue_conditions(session, **filters))) or 0


# -- counts ------------------------------------------------------------------------------

COUNT_KEYS = ("pass", "review", "reject", "unchecked", "awaiting_review", "approved", "rejected", "regenerated")


def review_counts(session: Session, batch_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per batch: images per QC verdict (``unchecked``: stored without QC), images still awaiting
    a decision, and the decisions made (``approved``, ``rejected``, ``regenerated``)."""
    counts = {batch_id: dict.fromkeys(COUNT_KEYS, 0) for batch_id in batch_ids}
    if not batch_ids:
        return counts
    rows = session.execute(
        select(Image.batch_id, Image.qc_verdict, Image.review_status, func.count())
        .where(Image.batch_id.in_(list(batch_ids)))
        .group_by(Image.batch_id, Image.qc_verdict, Image.review_status)
    )
    for batch_id, verdict, status, n in rows:
        row = counts[batch_id]
        row[verdict if verdict in row else "unchecked"] += n
        if status in row:
            row[status] += n
        elif verdict == Verdict.REVIEW.value:
            row["awaiting_review"] += n
    return counts
