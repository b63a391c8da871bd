"""Ledger operations shared by the API, the CLI and the worker's sweeper.

The batch, its items, its outbox rows and its audit event are written in one transaction: a
committed batch always has the chunks that will wake a worker for it, and a failed submission
leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Select, func, insert, select, update
from sqlalchemy.orm import Session

from core import audit
from core.broker import QUEUE_FOR_PRIORITY
from core.canary import assign as assign_canary
from core.params import MAX_SEED
from models import Batch, BatchStatus, Item, ItemState, Outbox, QcResult, utcnow
from models.base import new_id

T = TypeVar("T")


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""

    def __init__(self, batch_id: str):
        super().__init__(f"Idempotency-Key already used for batch {batch_id} with a different request")
        self.batch_id = batch_id


@dataclass(frozen=True)
class ItemSpec:
    prompt: str
    external_id: str | None = None
    seed: int | None = None
    num_images: int = 1


@dataclass(frozen=True)
class BatchSpec:
    name: str
    items: Sequence[ItemSpec]
    params: dict[str, Any] = field(default_factory=dict)
    priority: str = "normal"
    webhook_url: str | None = None
    # The canary the items are split by (core/canary.py, ``plan``): candidate model, fraction, its params.
    canary: dict[str, Any] | None = None

    def fingerprint(self) -> str:
        """sha256 of the request's canonical JSON: what an Idempotency-Key is bound to."""
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), default=list)
        return hashlib.sha256(body.encode()).hexdigest()

    def items_sha256(self) -> str:
        rows = [[i.external_id, i.prompt, i.seed, i.num_images] for i in self.items]
        return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def submit_batch(
    session: Session,
    spec: BatchSpec,
    *,
    team: str,
    actor: str,
    submitted_by: str | None = None,
    idempotency_key: str | None = None,
    chunk_images: int = 16,
    brand_rules_version: int | None = None,
) -> tuple[Batch, bool]:
    """Record a batch with its items and outbox chunks. Returns ``(batch, created)``.

    The caller commits. A repeated Idempotency-Key with the same body returns the first batch
    (``created=False``); with another body it raises :class:`IdempotencyConflict`.
    """
    fingerprint = spec.fingerprint()
    if idempotency_key:
        existing = find_by_idempotency_key(session, team, idempotency_key)
        if existing is not None:
            if existing.request_sha256 != fingerprint:
                raise IdempotencyConflict(existing.id)
            return existing, False

    batch_id = new_id()
    candidates = set(assign_canary(batch_id, len(spec.items), spec.canary["fraction"])) if spec.canary else set()
    canary = {**spec.canary, "items": len(candidates)} if spec.canary else None
    batch = Batch(
        id=batch_id, name=spec.name, team=team, submitted_by=submitted_by, params=spec.params,
        priority=spec.priority, webhook_url=spec.webhook_url, idempotency_key=idempotency_key,
        request_sha256=fingerprint, total_items=len(spec.items),
        total_images=sum(i.num_images for i in spec.items), created_at=utcnow(),
        brand_rules_version=brand_rules_version, canary=canary,
    )
    session.add(batch)
    session.flush()
    rows = [_item_row(batch.id, seq, item, spec.canary["model"] if seq in candidates else None)
            for seq, item in enumerate(spec.items)]
    if rows:
        session.execute(insert(Item), rows)
    enqueue_chunks(session, batch, rows, chunk_images)
    audit.record(
        session, "batch.submitted", actor=actor, batch_id=batch.id,
        payload={
            "name": spec.name, "team": team, "params": spec.params, "priority": spec.priority,
            "items": len(rows), "images": batch.total_images, "items_sha256": spec.items_sha256(),
            "idempotency_key": idempotency_key, "request_sha256": fingerprint,
            "brand_rules_version": brand_rules_version,
            **({"canary": {k: v for k, v in canary.items() if k != "params"}} if canary else {}),
        },
    )
    return batch, True


def _item_row(batch_id: str, seq: int, item: ItemSpec, model: str | None = None) -> dict[str, Any]:
    seed = item.seed if item.seed is not None else secrets.randbelow(MAX_SEED)
    return {
        "id": new_id(), "batch_id": batch_id, "seq": seq, "external_id": item.external_id,
        "prompt": item.prompt, "seed": seed, "num_images": item.num_images,
        "state": ItemState.QUEUED.value, "attempts": 0, "created_at": utcnow(), "model": model,
    }


def find_by_idempotency_key(session: Session, team: str, key: str) -> Batch | None:
    return session.scalar(select(Batch).where(Batch.team == team, Batch.idempotency_key == key))


def pack_by_images(entries: Iterable[T], limit: int, images: Callable[[T], int]) -> Iterator[list[T]]:
    """Whole entries in order, at most ``limit`` images per group (a bigger entry goes alone)."""
    group: list[T] = []
    count = 0
    for entry in entries:
        if group and count + images(entry) > limit:
            yield group
            group, count = [], 0
        group.append(entry)
        count += images(entry)
    if group:
        yield group


def chunk_items(rows: Iterable[Mapping[str, Any]], chunk_images: int) -> list[list[str]]:
    """Group item ids in order so that each chunk yields at most ``chunk_images`` images, and runs one
    model: a canary's items (``model`` set) chunk apart from the batch's (core/canary.py)."""
    by_model: dict[str | None, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_model.setdefault(row.get("model"), []).append(row)
    return [[row["id"] for row in group] for same_model in by_model.values()
            for group in pack_by_images(same_model, chunk_images, lambda row: row["num_images"])]


def enqueue_chunks(session: Session, batch: Batch, rows: Sequence[dict[str, Any]], chunk_images: int) -> int:
    queue = QUEUE_FOR_PRIORITY.get(batch.priority, QUEUE_FOR_PRIORITY["normal"])
    chunks = chunk_items(rows, chunk_images)
    if chunks:
        session.execute(
            insert(Outbox),
            [{"batch_id": batch.id, "item_ids": ids, "queue": queue, "created_at": utcnow()} for ids in chunks],
        )
    return len(chunks)


def state_counts(session: Session, batch_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {batch_id: {s.value: 0 for s in ItemState} for batch_id in batch_ids}
    if not batch_ids:
        return counts
    query = (
        select(Item.batch_id, Item.state, func.count())
        .where(Item.batch_id.in_(batch_ids))
        .group_by(Item.batch_id, Item.state)
    )
    for batch_id, state, n in session.execute(query):
        counts[batch_id][state] = n
    return counts


def batch_status(batch: Batch, counts: dict[str, int]) -> BatchStatus:
    total = sum(counts.values())
    active = counts.get(ItemState.QUEUED, 0) + counts.get(ItemState.RUNNING, 0)
    if batch.cancel_requested_at is not None:
        return BatchStatus.CANCELLING if active else BatchStatus.CANCELLED
    if active == 0 and total > 0:
        troubled = counts.get(ItemState.FAILED, 0) + counts.get(ItemState.DEAD, 0)
        return BatchStatus.COMPLETED_WITH_ERRORS if troubled else BatchStatus.SUCCEEDED
    if counts.get(ItemState.QUEUED, 0) == total:
        return BatchStatus.QUEUED
    return BatchStatus.RUNNING


def cancel_batch(session: Session, batch: Batch, *, actor: str) -> int:
    """Cooperative cancel: queued items stop now; running chunks see the flag and stop between steps."""
    if batch.cancel_requested_at is None:
        batch.cancel_requested_at = utcnow()
    cancelled = session.execute(
        update(Item)
        .where(Item.batch_id == batch.id, Item.state == ItemState.QUEUED)
        .values(state=ItemState.CANCELLED, finished_at=utcnow())
    ).rowcount
    audit.record(session, "batch.cancelled", actor=actor, batch_id=batch.id, payload={"items_cancelled": cancelled})
    return cancelled


def retry_batch(session: Session, batch: Batch, *, actor: str, chunk_images: int = 16) -> int:
    """Put failed and dead items back in the queue with a fresh attempt budget."""
    retry_ids = session.scalars(
        select(Item.id)
        .where(Item.batch_id == batch.id, Item.state.in_([ItemState.FAILED, ItemState.DEAD]))
        .order_by(Item.seq)
    ).all()
    if retry_ids:
        session.execute(
            update(Item)
            .where(Item.id.in_(retry_ids))
            .values(state=ItemState.QUEUED, attempts=0, error=None, lease_owner=None,
                    lease_expires_at=None, finished_at=None)
        )
        rows = session.execute(
            select(Item.id, Item.num_images, Item.model).where(Item.id.in_(retry_ids)).order_by(Item.seq)
        ).mappings().all()
        enqueue_chunks(session, batch, rows, chunk_images)
    batch.cancel_requested_at = None if retry_ids else batch.cancel_requested_at
    batch.finished_at = None if retry_ids else batch.finished_at
    audit.record(session, "batch.retried", actor=actor, batch_id=batch.id, payload={"items_requeued": len(retry_ids)})
    return len(retry_ids)


def requeue_unclaimed(session: Session, batch_id: str, *, chunk_images: int = 16) -> int:
    """New chunks for every queued item of a batch, whose wake-up may have died with its worker.

    For a broker without redelivery (the embedded SQLAlchemy transport) when its only worker died:
    a message the worker had taken but not yet claimed is gone. A copy of a message that does
    still exist costs one empty claim."""
    rows = session.execute(
        select(Item.id, Item.num_images, Item.model)
        .where(Item.batch_id == batch_id, Item.state == ItemState.QUEUED)
        .order_by(Item.seq)
    ).mappings().all()
    batch = session.get(Batch, batch_id)
    return enqueue_chunks(session, batch, rows, chunk_images) if rows and batch else 0


def qc_results_by_image(session: Session, image_ids: Iterable[str]) -> dict[str, list[QcResult]]:
    """Each image's QC rows in the order the scorers wrote them; every asked id is a key."""
    grouped: dict[str, list[QcResult]] = {image_id: [] for image_id in image_ids}
    if grouped:
        query = select(QcResult).where(QcResult.image_id.in_(list(grouped))).order_by(QcResult.id)
        for result in session.scalars(query):
            grouped[result.image_id].append(result)
    return grouped


def cancelled_batches() -> Select[tuple[str]]:
    """The ids of batches whose cancel was requested (a subquery for item updates)."""
    return select(Batch.id).where(Batch.cancel_requested_at.is_not(None))
