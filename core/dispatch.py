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
3. publishes pending rows in a fair order until ``DISPATCH_IN_FLIGHT`` rows of each queue are in
   flight: strict priority between the queues, teams taking turns within one (:func:`fill`).

Publishing happens after the batch commits, so a broker outage never loses a batch: the rows stay
pending and the next pass (API after each submission, a worker after each chunk, the sweeper,
``instabatch run``) publishes them. A message sent twice is harmless: the worker's claim makes
every task idempotent. Bounding what is in flight also bounds what a broker loss can strand and
what a re-send costs (docs/architecture.md, "Fair scheduling and broker loss").
"""
from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from core.broker import GENERATE_TASK, QUEUE_FOR_PRIORITY, get_celery
from core.db import ledger_now
from core.settings import Settings, get_settings
from models import Batch, Item, ItemState, Outbox
from models.base import as_utc

log = logging.getLogger(__name__)
PAGE = 500
PRIORITY_ORDER = tuple(QUEUE_FOR_PRIORITY[p] for p in ("high", "normal", "low"))
RELAY_LOCK_ID = 0x1B_D15A  # pg_advisory_xact_lock key of the relay's fill


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
    """Publish pending rows in the fair order, up to ``DISPATCH_IN_FLIGHT`` in flight per queue.

    Queues are filled in strict priority: a lower one only while no higher one has a chunk
    waiting, because workers poll their queues round-robin and would otherwise give ``high`` only
    a share. Within a queue the teams take turns, then each team's batches (:func:`fair_pick`)."""
    sent = 0
    with sessions() as session:
        try:
            lock_relay(session)  # one relay fills at a time, so the bound holds exactly
            for queue in PRIORITY_ORDER:
                room = settings.dispatch_in_flight - queue_in_flight(session, queue)
                if room > 0:
                    chosen = fair_pick(pending_heads(session, queue, room), flying_by_owner(session, queue), room)
                    sent += _publish(session, celery, [(c.id, c.item_ids, c.queue) for c in chosen], commit=False)
                if has_pending(session, queue):
                    break  # strict priority: nothing of a lower queue while this one waits
        finally:
            session.commit()
    return sent


@dataclass(frozen=True)
class Candidate:
    """A pending outbox row with the team and batch it is scheduled by."""

    id: int
    item_ids: list[str]
    queue: str
    team: str
    batch_id: str


@dataclass
class Flying:
    """What is in flight on one queue, by team and by batch."""

    teams: Counter[str] = field(default_factory=Counter)
    batches: Counter[str] = field(default_factory=Counter)


def lock_relay(session: Session) -> None:
    """PostgreSQL: a transaction-scoped advisory lock, so two relays (API, workers, sweeper) never
    count the same room twice. SQLite serialises its writers already (the embedded, one-host case)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(RELAY_LOCK_ID)))


def queue_in_flight(session: Session, queue: str) -> int:
    return session.scalar(select(func.count()).select_from(Outbox).where(Outbox.queue == queue, in_flight())) or 0


def has_pending(session: Session, queue: str) -> bool:
    return bool(session.scalar(select(exists().where(Outbox.queue == queue, Outbox.dispatched_at.is_(None)))))


def pending_heads(session: Session, queue: str, room: int) -> list[Candidate]:
    """The oldest ``room`` pending rows of each batch on the queue: all that a fair pick of
    ``room`` rows can need, however long the batches are."""
    ranked = (select(Outbox.id, Outbox.item_ids, Outbox.queue, Batch.team, Outbox.batch_id,
                     func.row_number().over(partition_by=Outbox.batch_id, order_by=Outbox.id).label("rank"))
              .join(Batch, Batch.id == Outbox.batch_id)
              .where(Outbox.queue == queue, Outbox.dispatched_at.is_(None)).subquery())
    rows = session.execute(select(ranked.c.id, ranked.c.item_ids, ranked.c.queue, ranked.c.team,
                                  ranked.c.batch_id).where(ranked.c.rank <= room).order_by(ranked.c.id))
    return [Candidate(*row) for row in rows]


def flying_by_owner(session: Session, queue: str) -> Flying:
    flying = Flying()
    rows = session.execute(select(Batch.team, Outbox.batch_id, func.count())
                           .join(Batch, Batch.id == Outbox.batch_id)
                           .where(Outbox.queue == queue, in_flight()).group_by(Batch.team, Outbox.batch_id))
    for team, batch_id, n in rows:
        flying.teams[team] += n
        flying.batches[batch_id] += n
    return flying


def fair_pick(candidates: list[Candidate], flying: Flying, room: int) -> list[Candidate]:
    """Up to ``room`` candidates, taking turns: the team with the fewest chunks in flight goes
    next (ties: the one waiting longest), and within it the batch with the fewest. A 50-image
    batch of one team is then sent as soon as there is room, however big another team's batch is."""
    waiting: dict[str, dict[str, deque[Candidate]]] = {}
    for candidate in candidates:  # oldest first
        waiting.setdefault(candidate.team, {}).setdefault(candidate.batch_id, deque()).append(candidate)
    teams, batches = Counter(flying.teams), Counter(flying.batches)
    picked: list[Candidate] = []
    while waiting and len(picked) < room:
        team = min(waiting, key=lambda t: (teams[t], min(q[0].id for q in waiting[t].values())))
        queues = waiting[team]
        batch_id = min(queues, key=lambda b: (batches[b], queues[b][0].id))
        picked.append(queues[batch_id].popleft())
        teams[team] += 1
        batches[batch_id] += 1
        if not queues[batch_id]:
            del queues[batch_id]
        if not queues:
            del waiting[team]
    return picked


def _publish(session: Session, celery: Celery, rows: list[tuple[int, list[str], str]], *, commit: bool = True) -> int:
    """Send the rows' messages and mark what went out, even when the broker fails half-way."""
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
        if commit:
            session.commit()
    return len(published)
