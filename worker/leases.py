"""The lease: how a worker takes items, keeps them and gives them back, each in one guarded UPDATE.

An item is claimable when it is ``queued``, or ``running`` under a lease that has expired or
that an abandoned run of this very task holds: the broker redelivers a task under the same id
when the run that held it died (``task_reject_on_worker_lost``) or outlasted the visibility
timeout; :func:`reclaimable_owners` tells a dead run (its process is gone from this host, or its
heartbeat stopped) from one still at work. Every claim counts an attempt; an item whose
attempts reach ``max_attempts`` without a result is ``dead`` instead of claimed, so a prompt
that kills the worker every time cannot be redelivered forever.

While a chunk runs, :class:`Heartbeat` renews the lease of everything its run holds, so a lease
can be short and a dead worker's items run again soon (docs/architecture.md, "Leases and
heartbeats").
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Sequence

from sqlalchemy import and_, func, literal, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from core.db import ledger_now
from core.ledger import cancelled_batches, enqueue_chunks
from models import Batch, Item, ItemState
from models.base import as_utc

log = logging.getLogger(__name__)
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
    model: str | None = None  # a canary's candidate (items.model); None: the batch's params.model


@dataclass(frozen=True)
class Settled:
    """Items a claim ended without running them: (item id, batch id) pairs."""

    cancelled: list[tuple[str, str]]
    dead: list[tuple[str, str]]


def lease_owner(worker: str, task_id: str) -> str:
    return f"{worker}:{task_id}"


def _claimable(item_ids: Sequence[str], reclaim: Sequence[str], now: datetime) -> ColumnElement[bool]:
    abandoned = or_(Item.lease_expires_at.is_(None), Item.lease_expires_at < now, Item.lease_owner.in_(list(reclaim)))
    return and_(Item.id.in_(list(item_ids)), or_(Item.state == QUEUED, and_(Item.state == RUNNING, abandoned)))


def reclaimable_owners(session: Session, item_ids: Sequence[str], *, task_id: str, owner: str, now: datetime,
                       lease_seconds: float, heartbeat_seconds: float) -> list[str]:
    """Owners from earlier runs of this task that hold some of these items and are dead: their
    process is gone from this host, or they missed two heartbeats. This very run (``owner``) too."""
    rows = session.execute(
        select(Item.lease_owner, func.max(Item.lease_expires_at))
        .where(Item.id.in_(list(item_ids)), Item.state == RUNNING,
               Item.lease_owner.endswith(f":{task_id}", autoescape=True))
        .group_by(Item.lease_owner)
    ).all()
    silent_since = now + timedelta(seconds=lease_seconds - 2 * heartbeat_seconds)
    return [holder for holder, expires in rows
            if holder == owner or not owner_alive(holder) or as_utc(expires) < silent_since]


def owner_alive(owner: str) -> bool:
    """False when ``host:pid:task`` names a process of this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid = rest.split(":", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another host: only its heartbeat can tell
    return pid_alive(int(pid))


def pid_alive(pid: int) -> bool:
    """Whether a process of this host still runs under ``pid`` (this process always does)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_error(max_attempts: int) -> str:
    return (
        f"dead after {max_attempts} attempts: every attempt ended without a result "
        "(the worker process died, was killed or timed out while generating this item)"
    )


def dead_error_with_last(max_attempts: int) -> ColumnElement[str]:
    """The dead error, followed by what the last attempt left in the error column (if anything)."""
    return literal(dead_error(max_attempts)) + func.coalesce(literal("; last: ") + Item.error, literal(""))


def settle_unclaimable(session: Session, item_ids: Sequence[str], reclaim: Sequence[str], max_attempts: int,
                       now: datetime) -> Settled:
    """End the claimable items that must not run: those of cancelled batches, those out of attempts."""
    claimable = _claimable(item_ids, reclaim, now)
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


def claim(session: Session, item_ids: Sequence[str], *, owner: str, lease_seconds: int, max_attempts: int,
          now: datetime, reclaim: Sequence[str] = (), count_attempt: bool = True) -> list[ClaimedItem]:
    """Take the claimable items in ONE UPDATE; a duplicate delivery finds nothing and gets [].

    ``reclaim``: dead owners whose items may be taken before their lease expires
    (:func:`reclaimable_owners`). ``count_attempt=False`` holds the items without counting an
    attempt yet (see count_attempt).
    """
    rows = session.execute(
        update(Item)
        .where(_claimable(item_ids, reclaim, now), Item.attempts < max_attempts,
               Item.batch_id.not_in(cancelled_batches()))
        .values(state=RUNNING, attempts=Item.attempts + int(count_attempt), lease_owner=owner,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                started_at=func.coalesce(Item.started_at, now), error=None)
        .returning(Item.id, Item.batch_id, Item.seq, Item.external_id, Item.prompt, Item.seed,
                   Item.num_images, Item.attempts, Item.model)
        .execution_options(**NO_SYNC)
    ).all()
    return sorted((ClaimedItem(*row) for row in rows), key=lambda item: (item.batch_id, item.seq))


def count_attempt(session: Session, item_id: str, *, owner: str) -> int | None:
    """Count one attempt on an item this worker holds, right before generating it; its new count."""
    return session.execute(
        update(Item).where(Item.id == item_id, Item.state == RUNNING, Item.lease_owner == owner)
        .values(attempts=Item.attempts + 1).returning(Item.attempts).execution_options(**NO_SYNC)
    ).scalar()


def renew(session: Session, *, owner: str, lease_seconds: float, now: datetime) -> int:
    """Push the lease of every item this run still holds further out."""
    return session.execute(
        update(Item).where(Item.state == RUNNING, Item.lease_owner == owner)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds)).execution_options(**NO_SYNC)
    ).rowcount


class Heartbeat:
    """Renews a run's leases every ``every`` seconds from a thread of its own, beside the work
    (a forward pass or an upload retry can take longer than the lease)::

        with Heartbeat(sessions, owner, lease_seconds=60, every=15):
            ...  # generate
    """

    def __init__(self, sessions: Any, owner: str, *, lease_seconds: float, every: float):
        self.sessions, self.owner, self.lease_seconds, self.every = sessions, owner, lease_seconds, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat-{owner}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                with self.sessions() as session:
                    renew(session, owner=self.owner, lease_seconds=self.lease_seconds, now=ledger_now(session))
                    session.commit()
            except Exception as error:  # a database blink: the lease outlasts two missed beats
                log.warning("lease heartbeat of %s failed: %s", self.owner, error)


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
            reason: str | None = None, refund: Sequence[str] = ()) -> list[str]:
    """Give back the items this worker holds but did not finish (time limit, storage outage).

    ``refund``: items whose attempt this run counted and that failed for the infrastructure's
    sake, not their own: the attempt is given back too, so an outage never makes an item dead."""
    if not item_ids:
        return []
    held = and_(Item.id.in_(list(item_ids)), Item.lease_owner == owner)
    if refund:
        session.execute(update(Item).where(held, Item.id.in_(list(refund)), Item.state == RUNNING, Item.attempts > 0)
                        .values(attempts=Item.attempts - 1).execution_options(**NO_SYNC))
    return requeue(session, held, chunk_images=chunk_images, note=reason)
