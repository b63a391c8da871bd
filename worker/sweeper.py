"""The backstop: items whose lease expired go back to the queue (or to ``dead`` past the cap).

A worker that dies mid-chunk leaves its items ``running`` under a lease nobody renews. Once the
lease expires the sweeper requeues them with a new outbox chunk, then relays pending chunks to
the broker. It runs as a beat task, once at worker start and inside ``instabatch run``'s loop.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta

from celery import Celery
from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from core import audit, webhooks
from core.broker import get_celery
from core.db import ledger_now
from core.dispatch import dispatch_pending
from core.ledger import cancelled_batches
from core.review import republish_pending
from core.settings import Settings, get_settings
from models import Batch, Item, ItemState
from worker import leases
from worker.completion import complete_if_done

log = logging.getLogger(__name__)
ACTOR = "sweeper"
REQUEUE_NOTE = "requeued by the sweeper: the worker holding it died or stopped renewing its lease"


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    dispatched: int = 0
    completed_batches: list[str] = field(default_factory=list)


def sweep(sessions: sessionmaker[Session], celery: Celery | None = None, settings: Settings | None = None,
          *, abandoned_by: str | None = None, reclaim_dead_local: bool = False) -> SweepReport:
    """Requeue expired leases, and those of dead workers, then relay pending chunks and close finished batches.

    ``abandoned_by``: a ``host:pid`` known to be dead (``instabatch run`` saw its worker exit).
    ``reclaim_dead_local``: also the leases of this host's processes that no longer exist, and of
    this very process, which holds nothing yet (for a worker starting up). Only where every worker
    sharing the ledger runs on this host in one process namespace: the embedded setup.
    """
    settings = settings or get_settings()
    with sessions() as session:  # the clock every host's leases were written with
        now = ledger_now(session)
    dead_owners = [abandoned_by] if abandoned_by else []
    if reclaim_dead_local:
        dead_owners += dead_local_workers(sessions)
    stale = Item.lease_expires_at < now
    for owner in dead_owners:
        stale = stale | Item.lease_owner.startswith(f"{owner}:", autoescape=True)
    report = SweepReport()
    with sessions() as session:
        report.cancelled = _end(session, and_(stale, Item.batch_id.in_(cancelled_batches())), ItemState.CANCELLED, now)
        report.dead = _end(session, and_(stale, Item.attempts >= settings.max_attempts), ItemState.DEAD, now,
                           error=leases.dead_error_with_last(settings.max_attempts))
        report.requeued = leases.requeue(session, stale, chunk_images=settings.chunk_images, note=REQUEUE_NOTE)
        webhooks.enqueue_items_dead(session, report.dead)
        if report.requeued or report.dead:
            audit.record(session, "items.swept", actor=ACTOR,
                         payload={"requeued": report.requeued, "dead": report.dead, "cancelled": report.cancelled})
        session.commit()
    if report.requeued or report.dead:
        log.warning("sweeper: %d expired leases requeued, %d items dead", len(report.requeued), len(report.dead))
    report.dispatched = dispatch_pending(sessions, celery, settings)
    with sessions() as session:
        # A regenerate unanswered for two leases was lost with its broker or its worker: send it again.
        report.dispatched += republish_pending(session, celery or get_celery(),
                                               older_than=timedelta(seconds=2 * settings.lease_seconds))
    report.completed_batches = complete_finished_batches(sessions, settings)
    return report


def dead_local_workers(sessions: sessionmaker[Session]) -> list[str]:
    """``host:pid`` of this host's lease holders whose process is gone (or is this process)."""
    host = socket.gethostname()
    with sessions() as session:
        owners = session.scalars(
            select(Item.lease_owner).where(Item.state == ItemState.RUNNING.value,
                                           Item.lease_owner.startswith(f"{host}:", autoescape=True)).distinct()
        ).all()
    dead = set()
    for owner in owners:
        pid_text = owner[len(host) + 1:].split(":", 1)[0]
        if pid_text.isdigit() and (int(pid_text) == os.getpid() or not leases.pid_alive(int(pid_text))):
            dead.add(f"{host}:{pid_text}")
    return sorted(dead)


def _end(session: Session, condition: ColumnElement[bool], state: ItemState, now: object,
         error: object = None) -> list[str]:
    return list(session.execute(
        update(Item).where(condition, Item.state == ItemState.RUNNING.value)
        .values(state=state.value, finished_at=now, error=error, lease_owner=None, lease_expires_at=None)
        .returning(Item.id).execution_options(synchronize_session=False)
    ).scalars())


def complete_finished_batches(sessions: sessionmaker[Session], settings: Settings) -> list[str]:
    """Batches with nothing active but no finished_at (a worker died right after its last item)."""
    with sessions() as session:
        candidates = session.scalars(select(Batch.id).where(Batch.finished_at.is_(None))).all()
    return [batch_id for batch_id in candidates
            if complete_if_done(sessions, batch_id, actor=ACTOR, settings=settings)]
