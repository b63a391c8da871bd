"""Helpers for the worker, CLI and end-to-end tests: a configured stack, submissions, waiting on the ledger."""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core import ledger
from core.dispatch import dispatch_pending
from core.settings import Settings, get_settings
from core.storage import ObjectStore
from models import AuditEvent, Batch, Image, Item, ItemState


@dataclass
class Stack:
    """One configured set of parts (ledger, broker, store, model) and the worker app on them."""

    settings: Settings
    app: Celery

    @property
    def sessions(self) -> sessionmaker[Session]:
        return self.app.instabatch.sessions

    @property
    def store(self) -> ObjectStore:
        return self.app.instabatch.store

    def submit(self, prompts: Sequence[str] | Sequence[ledger.ItemSpec], *, params: dict[str, Any] | None = None,
               chunk_images: int | None = None, webhook_url: str | None = None, dispatch: bool = True,
               team: str = "t", priority: str = "normal") -> str:
        items = [p if isinstance(p, ledger.ItemSpec) else ledger.ItemSpec(prompt=p, external_id=f"sku-{i}", seed=i)
                 for i, p in enumerate(prompts)]
        spec = ledger.BatchSpec(name="test", items=items, params=params or {}, webhook_url=webhook_url,
                                priority=priority)
        with self.sessions() as session:
            batch, _ = ledger.submit_batch(session, spec, team=team, actor="test",
                                           chunk_images=chunk_images or self.settings.chunk_images)
            session.commit()
        if dispatch:
            dispatch_pending(self.sessions, self.app)
        return batch.id

    def counts(self, batch_id: str) -> dict[str, int]:
        with self.sessions() as session:
            return ledger.state_counts(session, [batch_id])[batch_id]

    def wait_until_done(self, batch_id: str, timeout: float = 180.0) -> dict[str, int]:
        """Poll the ledger until no item is active and the batch is marked finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.counts(batch_id)
            if not any(counts[state] for state in ItemState.active()) and self.batch(batch_id).finished_at is not None:
                return counts
            time.sleep(0.2)
        raise TimeoutError(f"batch {batch_id} still active after {timeout}s: {self.counts(batch_id)}")

    def batch(self, batch_id: str) -> Batch:
        with self.sessions() as session:
            return session.get(Batch, batch_id)

    def items(self, batch_id: str) -> list[Item]:
        with self.sessions() as session:
            return list(session.scalars(select(Item).where(Item.batch_id == batch_id).order_by(Item.seq)))

    def images(self, batch_id: str) -> list[Image]:
        with self.sessions() as session:
            return list(session.scalars(select(Image).where(Image.batch_id == batch_id).order_by(Image.storage_key)))

    def events(self, batch_id: str, action: str | None = None) -> list[AuditEvent]:
        with self.sessions() as session:
            query = select(AuditEvent).where(AuditEvent.batch_id == batch_id).order_by(AuditEvent.seq)
            if action:
                query = query.where(AuditEvent.action == action)
            return list(session.scalars(query))


def build_stack(configure: Any, **env: str) -> Stack:
    """Apply ``env`` (plus the test defaults below), migrate the ledger and make the worker app."""
    from core.migrate import upgrade
    from worker.app import create_app

    # One torch thread: on a CPU shared with other busy processes more threads are many times slower.
    defaults = {"INSTABATCH_MICRO_BATCH": "4", "INSTABATCH_CHUNK_IMAGES": "4", "QC_ALIGNMENT": "none",
                "INSTABATCH_TORCH_THREADS": "1"}
    configure(**{**defaults, **env})
    settings = get_settings()
    if settings.uses_sqlite:
        upgrade(settings.database_url)
    return Stack(settings=settings, app=create_app(settings))


@contextmanager
def running_worker(stack: Stack, **options: Any) -> Iterator[Any]:
    """A real Celery worker (solo pool, in a thread of this process) consuming the stack's queues."""
    with start_worker(stack.app, perform_ping_check=False, shutdown_timeout=60, loglevel="WARNING",
                      **options) as worker:
        yield worker


def quiet_outbox(sessions: sessionmaker[Session]) -> None:
    """Mark every outbox row sent and claimed: the session-wide PostgreSQL ledger holds other tests'
    chunks, which a relay pass would otherwise publish or re-send beside the test's own."""
    from sqlalchemy import func, update

    from models import Outbox

    with sessions() as session:
        session.execute(update(Outbox).values(dispatched_at=func.coalesce(Outbox.dispatched_at, func.now()),
                                              claimed_at=func.coalesce(Outbox.claimed_at, func.now())))
        session.commit()


def queued_messages(client: Any, queue: str, item_ids: set[str]) -> int:
    """Generate messages in a Redis queue that carry any of these items."""
    import base64
    import json

    count = 0
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        if item_ids.intersection(json.loads(base64.b64decode(message["body"]))[0][0]):
            count += 1
    return count
