"""The lease: how a worker takes items, keeps them and gives them back, each in one guarded UPDATE.

An item is claimable when it is ``queued``, or ``running`` under a lease that has expired or
that this very task took before (the broker redelivers a task under the same id only after the
run that held it died: a crash with ``task_reject_on_worker_lost``, or the visibility timeout,
which is longer than the hard time limit). Every claim counts an attempt; an item whose
attempts reach ``max_attempts`` without a result is ``dead`` instead of claimed, so a prompt
that kills the worker every time cannot be redelivered forever.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Sequence

from sqlalchemy import and_, func, literal, or_, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from core.ledger import cancelled_batches, enqueue_chunks
from models import Batch, Item, ItemState

QUEUED, RUNNING = ItemState.QUEUED.value, ItemState.RUNNING.value
NO_SYNC = {"synchronize_session": False}


@dataclass(frozen=True)
class ClaimedItem:
    id: str
    batch_id: str
    seq: int
    external_id: str | None
    prompt: str
    seed: int
    num_images: int
    attempts: int


@dataclass(frozen=True)
class Settled:
    """Items a claim ended without running them: (item id, batch id) pairs."""

    cancelled: list[tuple[str, str]]
    dead: list[tuple[str, str]]


def lease_owner(worker: str, task_id: str) -> str:
    return f"{worker}:{task_id}"


def _claimable(item_ids: Sequence[str], task_id: str, now: datetime) -> ColumnElement[bool]:
    abandoned = or_(
        Item.lease_expires_at.is_(None),
        Item.lease_expires_at < now,
        Item.lease_owner.endswith(f":{task_id}", autoescape=True),
    )
    return and_(Item.id.in_(list(item_ids)), or_(Item.state == QUEUED, and_(Item.state == RUNNING, abandoned)))


def dead_error(max_attempts: int) -> str:
    return (
        f"dead after {max_attempts} attempts: every attempt ended without a result "
        "(the worker process died, was killed or timed out while generating this item)"
    )


def dead_error_with_last(max_attempts: int) -> ColumnElement[str]:
    """The dead error, followed by what the last attempt left in the error column (if anything)."""
    return literal(dead_error(max_attempts)) + func.coalesce(literal("; last: ") + Item.error, literal(""))


def settle_unclaimable(session: Session, item_ids: Sequence[str], task_id: str, max_attempts: int,
                       now: datetime) -> Settled:
    """End the claimable items that must not run: those of cancelled batches, those out of attempts."""
    claimable = _claimable(item_ids, task_id, now)
    cancelled = session.execute(
        update(Item).where(claimable, Item.batch_id.in_(cancelled_batches()))
        .values(state=ItemState.CANCELLED.value, finished_at=now, lease_owner=None, lease_expires_at=None)
        .returning(Item.id, Item.batch_id).execution_options(**NO_SYNC)
    ).all()
    dead = session.execute(
        update(Item).where(claimable, Item.attempts >= max_attempts)
        .values(state=ItemState.DEAD.value, finished_at=now, error=dead_error_with_last(max_attempts),
                lease_owner=None, lease_expires_at=None)
        .returning(Item.id, Item.batch_id).execution_options(**NO_SYNC)
    ).all()
    return Settled(cancelled=[tuple(row) for row in cancelled], dead=[tuple(row) for row in dead])


def claim(session: Session, item_ids: Sequence[str], *, owner: str, task_id: str, lease_seconds: int,
          max_attempts: int, now: datetime, count_attempt: bool = True) -> list[ClaimedItem]:
    """Take the claimable items in ONE UPDATE; a duplicate delivery finds nothing and gets [].

    ``count_attempt=False`` holds the items without counting an attempt yet (see count_attempt).
    """
    rows = session.execute(
        update(Item)
        .where(_claimable(item_ids, task_id, now), Item.attempts < max_attempts,
               Item.batch_id.not_in(cancelled_batches()))
        .values(state=RUNNING, attempts=Item.attempts + int(count_attempt), lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                started_at=func.coalesce(Item.started_at, now), error=None)
        .returning(Item.id, Item.batch_id, Item.seq, Item.external_id, Item.prompt, Item.seed,
                   Item.num_images, Item.attempts)
        .execution_options(**NO_SYNC)
    ).all()
    return sorted((ClaimedItem(*row) for row in rows), key=lambda item: (item.batch_id, item.seq))


def count_attempt(session: Session, item_id: str, *, owner: str) -> int | None:
    """Count one attempt on an item this worker holds, right before generating it; its new count."""
    return session.execute(
        update(Item).where(Item.id == item_id, Item.state == RUNNING, Item.lease_owner == owner)
        .values(attempts=Item.attempts + 1).returning(Item.attempts).execution_options(**NO_SYNC)
    ).scalar()


def renew(session: Session, item_ids: Sequence[str], *, owner: str, lease_seconds: int, now: datetime) -> int:
    """Push the lease of the items this worker still holds further out (between micro-batches)."""
    return session.execute(
        update(Item).where(Item.id.in_(list(item_ids)), Item.state == RUNNING, Item.lease_owner == owner)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds)).execution_options(**NO_SYNC)
    ).rowcount


def finish(session: Session, item_ids: Sequence[str], *, owner: str, state: ItemState, now: datetime,
           error: str | None = None) -> set[str]:
    """End items, but only those this worker still holds; returns their ids.

    A worker that lost its lease (it ran past it and another worker took the items) changes
    nothing: the new holder finishes them.
    """
    if not item_ids:
        return set()
    rows = session.execute(
        update(Item).where(Item.id.in_(list(item_ids)), Item.state == RUNNING, Item.lease_owner == owner)
        .values(state=state.value, finished_at=now, error=error, lease_owner=None, lease_expires_at=None)
        .returning(Item.id).execution_options(**NO_SYNC)
    ).scalars().all()
    return set(rows)


def requeue(session: Session, condition: ColumnElement[bool], *, chunk_images: int,
            note: str | None = None) -> list[str]:
    """Put running items matching ``condition`` back in the queue, with fresh outbox chunks.

    ``note`` (why) stays in the item's error column while it waits, and ends up in the dead
    error if the item never gets further.
    """
    rows = session.execute(
        update(Item).where(condition, Item.state == RUNNING)
        .values(state=QUEUED, lease_owner=None, lease_expires_at=None, error=note)
        .returning(Item.id, Item.batch_id, Item.seq, Item.num_images).execution_options(**NO_SYNC)
    ).all()
    by_batch: dict[str, list[dict[str, Any]]] = {}
    for item_id, batch_id, seq, num_images in sorted(rows, key=lambda row: (row[1], row[2])):
        by_batch.setdefault(batch_id, []).append({"id": item_id, "num_images": num_images})
    for batch_id, items in by_batch.items():
        enqueue_chunks(session, session.get(Batch, batch_id), items, chunk_images)
    return [row[0] for row in rows]


def release(session: Session, item_ids: Sequence[str], *, owner: str, chunk_images: int,
            reason: str | None = None) -> list[str]:
    """Give back the items this worker holds but did not finish (time limit, storage outage)."""
    if not item_ids:
        return []
    held = and_(Item.id.in_(list(item_ids)), Item.lease_owner == owner)
    return requeue(session, held, chunk_images=chunk_images, note=reason)
