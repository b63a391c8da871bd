"""What ``instabatch status`` shows, read from the broker, the workers and the ledger (read-only).

- queue depth: messages waiting in each queue, asked through kombu (``queue_declare`` passive:
  LLEN on Redis, a row count on the embedded SQLAlchemy broker), never by parsing the broker's keys;
- workers: Celery's remote control (``inspect ping`` and ``active``), answered by every worker
  that reaches the broker within the timeout, on any host;
- images/s: images of the items that succeeded over the last minute (the ledger's clock);
- the newest batches with their items by state.

Each part fails on its own: a broker that does not answer leaves the ledger's parts standing.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from celery import Celery
from kombu import Connection
from kombu.exceptions import ChannelError
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from core import ledger
from core.db import ledger_now
from models import Batch, Item, ItemState

RATE_WINDOW_SECONDS = 60
TERMINAL = tuple(state.value for state in ItemState.finished())


@dataclass(frozen=True)
class WorkerView:
    name: str
    active_tasks: int


@dataclass(frozen=True)
class BatchLine:
    id: str
    name: str
    team: str
    priority: str
    total_items: int
    counts: dict[str, int]
    finished: bool

    @property
    def done(self) -> int:
        return sum(self.counts.get(state, 0) for state in TERMINAL)


@dataclass
class Snapshot:
    queues: dict[str, int] = field(default_factory=dict)
    workers: list[WorkerView] = field(default_factory=list)
    images_per_second: float = 0.0
    batches: list[BatchLine] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # parts that did not answer, in words


def queue_depths(celery: Celery, queues: Sequence[str]) -> dict[str, int]:
    """Messages waiting (not yet taken by a worker) in each queue."""
    depths = {}
    with celery.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1)  # a status view reports a dead broker, never waits on it
        for queue in queues:
            depths[queue] = _depth(connection, queue)
    return depths


def _depth(connection: Connection, queue: str) -> int:
    # A channel per queue: an AMQP broker closes the channel a passive declare of a missing queue failed on.
    with connection.channel() as channel:
        try:
            return channel.queue_declare(queue=queue, passive=True).message_count
        except ChannelError:  # a queue nobody has declared yet: nothing waits in it
            return 0


def live_workers(celery: Celery, timeout: float = 1.0) -> list[WorkerView]:
    """Workers that answer a ping, with how many tasks each runs right now."""
    inspect = celery.control.inspect(timeout=timeout)
    pongs = inspect.ping() or {}
    active = (inspect.active() or {}) if pongs else {}
    return [WorkerView(name, len(active.get(name) or [])) for name in sorted(pongs)]


def images_per_second(session: Session, window_seconds: int = RATE_WINDOW_SECONDS) -> float:
    """Images of the items that succeeded in the window, by the ledger's clock (core.db.ledger_now:
    the one every worker, on any host, stamps ``finished_at`` with)."""
    since = ledger_now(session) - timedelta(seconds=window_seconds)
    # Only batches open in the window: items are read through ix_items_batch_state, never all of them.
    recent = select(Batch.id).where(or_(Batch.finished_at.is_(None), Batch.finished_at >= since))
    count = session.scalar(select(func.sum(Item.num_images)).where(
        Item.batch_id.in_(recent), Item.state == ItemState.SUCCEEDED.value, Item.finished_at >= since))
    return (count or 0) / window_seconds


def newest_batches(session: Session, limit: int) -> list[BatchLine]:
    batches = list(session.scalars(select(Batch).order_by(Batch.created_at.desc(), Batch.id).limit(limit)))
    counts = ledger.state_counts(session, [batch.id for batch in batches])
    return [BatchLine(batch.id, batch.name, batch.team, batch.priority, batch.total_items, counts[batch.id],
                      batch.finished_at is not None) for batch in batches]


def snapshot(session: Session, celery: Celery, queues: Sequence[str], *, batches: int = 8,
             inspect_timeout: float = 1.0) -> Snapshot:
    snap = Snapshot()
    try:
        snap.queues = queue_depths(celery, queues)
    except Exception as error:  # noqa: BLE001 - shown in the view, the other parts still are
        snap.problems.append(f"broker: {type(error).__name__}: {error}")
    if not snap.problems:  # no broker, no remote control either
        try:
            snap.workers = live_workers(celery, inspect_timeout)
        except Exception as error:  # noqa: BLE001
            snap.problems.append(f"workers: {type(error).__name__}: {error}")
    snap.images_per_second = images_per_second(session)
    snap.batches = newest_batches(session, batches)
    return snap
