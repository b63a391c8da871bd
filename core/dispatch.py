"""The outbox relay: keeps a bounded number of chunks in the broker and sends again what it lost.

An outbox row is *pending* until published, then *in flight* until a worker takes the message
(``claimed_at``, set by :func:`mark_claimed` when the task starts). Each pass of
:func:`dispatch_pending`:

1. settles in-flight rows whose items are no longer queued (requeued elsewhere, cancelled);
2. sends again each in-flight row whose message the broker has probably lost: unclaimed for
   ``REDISPATCH_SECONDS`` while either a chunk sent after it on the same queue was already
   claimed (overtaken: the broker lost it, or a worker died between taking it and claiming), or
   nothing at all was claimed on the queue for as long and no item is running (the queue stalled:
   a broker restarted empty);
3. publishes pending rows, oldest first, until ``DISPATCH_IN_FLIGHT`` rows of each batch are in flight.

Publishing happens after the batch commits, so a broker outage never loses a batch: the rows stay
pending and the next pass (API after each submission, a worker after each chunk, the sweeper,
``instabatch run``) publishes them. A message sent twice is harmless: the worker's claim makes
every task idempotent. Bounding what is in flight also bounds what a broker loss can strand and
what a re-send costs (docs/architecture.md, "Bounded dispatch and broker loss").
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.broker import GENERATE_TASK, get_celery
from core.db import ledger_now
from core.settings import Settings, get_settings
from models import Item, ItemState, Outbox
from models.base import as_utc

log = logging.getLogger(__name__)
PAGE = 500


def dispatch_pending(sessions: sessionmaker[Session], celery: Celery | None = None,
                     settings: Settings | None = None) -> int:
    """One relay pass (settle, re-send lost, fill up to the bound); returns how many messages were sent."""
    celery = celery or get_celery()
    settings = settings or get_settings()
    with sessions() as session:
        settle_in_flight(session)
        session.commit()
    return resend_lost(sessions, celery, settings) + fill(sessions, celery, settings)


def mark_claimed(session: Session, outbox_id: int) -> None:
    """A worker took this chunk's message: it no longer counts as in flight."""
    session.execute(update(Outbox).where(Outbox.id == outbox_id, Outbox.claimed_at.is_(None))
                    .values(claimed_at=ledger_now(session)).execution_options(synchronize_session=False))


def in_flight() -> object:
    return and_(Outbox.dispatched_at.is_not(None), Outbox.claimed_at.is_(None))


def settle_in_flight(session: Session) -> int:
    """In-flight rows none of whose items is still queued need no message any more."""
    rows = session.execute(select(Outbox.id, Outbox.item_ids).where(in_flight())).all()
    if not rows:
        return 0
    wanted = {item_id for _, item_ids in rows for item_id in item_ids}
    queued = set(session.scalars(select(Item.id).where(Item.id.in_(wanted), Item.state == ItemState.QUEUED.value)))
    done = [outbox_id for outbox_id, item_ids in rows if not queued.intersection(item_ids)]
    if done:
        session.execute(update(Outbox).where(Outbox.id.in_(done)).values(claimed_at=ledger_now(session))
                        .execution_options(synchronize_session=False))
    return len(done)


def lost_chunks(session: Session, settings: Settings, now: datetime) -> list[tuple[int, list[str], str]]:
    """In-flight rows whose message is probably gone: unclaimed for REDISPATCH_SECONDS, and either
    overtaken on their queue or on a stalled queue (see the module docstring)."""
    cutoff = now - timedelta(seconds=settings.redispatch_seconds)
    stale = and_(in_flight(), Outbox.dispatched_at < cutoff)
    queues = session.scalars(select(Outbox.queue).where(stale).distinct()).all()
    if not queues:
        return []
    anything_running = session.scalar(select(exists().where(
        Item.state == ItemState.RUNNING.value, Item.lease_expires_at > now)))
    lost: list[tuple[int, list[str], str]] = []
    for queue in sorted(queues):
        claimed = select(Outbox.claimed_at, Outbox.dispatched_at).where(
            Outbox.queue == queue, Outbox.claimed_at.is_not(None)).subquery()
        last_claim, newest_claimed_send = session.execute(
            select(func.max(claimed.c.claimed_at), func.max(claimed.c.dispatched_at))).one()
        stalled = not anything_running and (last_claim is None or as_utc(last_claim) < cutoff)
        condition = and_(stale, Outbox.queue == queue)
        if not stalled:
            if newest_claimed_send is None:
                continue
            condition = and_(condition, Outbox.dispatched_at < newest_claimed_send)  # overtaken
        lost += [tuple(row) for row in session.execute(
            select(Outbox.id, Outbox.item_ids, Outbox.queue).where(condition).order_by(Outbox.id)
            .limit(PAGE))]
    return lost


def resend_lost(sessions: sessionmaker[Session], celery: Celery, settings: Settings) -> int:
    with sessions() as session:
        lost = lost_chunks(session, settings, ledger_now(session))
        if lost:
            log.warning("sending again %d chunks whose messages the broker lost or never delivered", len(lost))
        return _publish(session, celery, lost)


def fill(sessions: sessionmaker[Session], celery: Celery, settings: Settings) -> int:
    """Publish pending rows, oldest first, while fewer than the bound of their batch are in flight.

    The bound is per batch, so a 50,000-item batch has no more chunks waiting in the broker than
    a 50-item one, and batches submitted later interleave with it instead of queueing behind it."""
    sent = 0
    while True:
        with sessions() as session:
            flying = (select(Outbox.batch_id, func.count().label("n")).where(in_flight())
                      .group_by(Outbox.batch_id).subquery())
            ranked = select(Outbox.id, Outbox.batch_id, func.row_number().over(
                partition_by=Outbox.batch_id, order_by=Outbox.id).label("rank")
            ).where(Outbox.dispatched_at.is_(None)).subquery()
            room = settings.dispatch_in_flight - func.coalesce(flying.c.n, 0)
            chosen = session.scalars(
                select(ranked.c.id).outerjoin(flying, flying.c.batch_id == ranked.c.batch_id)
                .where(ranked.c.rank <= room).order_by(ranked.c.id).limit(PAGE)
            ).all()
            rows = session.execute(
                select(Outbox.id, Outbox.item_ids, Outbox.queue)
                .where(Outbox.id.in_(chosen), Outbox.dispatched_at.is_(None)).order_by(Outbox.id)
                .with_for_update(skip_locked=True)  # PostgreSQL: two relays never take the same rows
            ).all() if chosen else []
            published = _publish(session, celery, [tuple(row) for row in rows])
            sent += published
            if published < len(rows) or len(chosen) < PAGE:
                return sent


def _publish(session: Session, celery: Celery, rows: list[tuple[int, list[str], str]]) -> int:
    """Send the rows' messages and mark what went out, even when the broker fails half-way; commits."""
    published: list[int] = []
    try:
        for outbox_id, item_ids, queue in rows:
            celery.send_task(GENERATE_TASK, args=[item_ids], kwargs={"outbox_id": outbox_id}, queue=queue)
            published.append(outbox_id)
    finally:
        if published:
            session.execute(update(Outbox).where(Outbox.id.in_(published))
                            .values(dispatched_at=ledger_now(session), sends=Outbox.sends + 1)
                            .execution_options(synchronize_session=False))
        session.commit()
    return len(published)
