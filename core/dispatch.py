"""The outbox relay: publishes committed chunks to the broker, then marks them dispatched.

Publishing happens after the batch commits, so a broker outage never loses a batch: the rows
stay pending and the next relay pass (API after each submission, the worker's periodic sweep,
``instabatch run``) publishes them. A crash between publish and mark publishes a chunk twice,
which is harmless: the worker's claim makes every task idempotent.
"""
from __future__ import annotations

import logging

from celery import Celery
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from core.broker import GENERATE_TASK, get_celery
from models import Outbox, utcnow

log = logging.getLogger(__name__)


def dispatch_pending(sessions: sessionmaker[Session], celery: Celery | None = None, limit: int = 500) -> int:
    """Publish up to ``limit`` pending chunks per pass until none is left; returns how many were sent."""
    celery = celery or get_celery()
    sent = 0
    while True:
        with sessions() as session:
            pending = session.execute(
                select(Outbox.id, Outbox.item_ids, Outbox.queue)
                .where(Outbox.dispatched_at.is_(None))
                .order_by(Outbox.id)
                .limit(limit)
                .with_for_update(skip_locked=True)  # PostgreSQL: two relays never take the same rows
            ).all()
            if not pending:
                return sent
            published: list[int] = []
            try:
                for outbox_id, item_ids, queue in pending:
                    celery.send_task(GENERATE_TASK, args=[item_ids], queue=queue)
                    published.append(outbox_id)
            finally:
                # Mark what did go out even when the broker fails half-way through the pass.
                if published:
                    session.execute(update(Outbox).where(Outbox.id.in_(published)).values(dispatched_at=utcnow()))
                    session.commit()
            sent += len(published)
