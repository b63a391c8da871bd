"""A batch is complete when its last active item ends: counted in the ledger, not with chords.

Whoever ends an item runs :func:`complete_if_done` after committing it. The guarded UPDATE
(``finished_at IS NULL AND no queued/running item``) lets exactly one caller win, however many
workers finish items at the same time; the sweeper calls it too, as a backstop.
"""
from __future__ import annotations

import logging

from sqlalchemy import exists, update
from sqlalchemy.orm import Session, sessionmaker

from core import audit, webhooks
from core.db import ledger_now
from core.ledger import batch_status, state_counts
from core.settings import Settings
from models import Batch, BatchStatus, Item, ItemState

log = logging.getLogger(__name__)


def complete_if_done(sessions: sessionmaker[Session], batch_id: str, *, actor: str,
                     settings: Settings) -> bool:
    """Mark the batch finished if nothing of it is active any more; True when this call did it."""
    with sessions() as session:
        active_items = exists().where(Item.batch_id == Batch.id, Item.state.in_(ItemState.active()))
        won = session.execute(
            update(Batch).where(Batch.id == batch_id, Batch.finished_at.is_(None), ~active_items)
            .values(finished_at=ledger_now(session)).returning(Batch.id).execution_options(synchronize_session=False)
        ).first()
        if won is None:
            session.rollback()
            return False
        batch = session.get(Batch, batch_id)
        counts = state_counts(session, [batch_id])[batch_id]
        status = batch_status(batch, counts)
        payload = {"status": status.value, "counts": counts}
        audit.record(session, "batch.completed", actor=actor, batch_id=batch_id, payload=payload)
        webhooks.enqueue_for_batch(session, completion_event(status, counts), batch_id, {
            "name": batch.name, "finished_at": batch.finished_at.isoformat(), **payload})
        session.commit()
    return True


def completion_event(status: BatchStatus, counts: dict[str, int]) -> str:
    """``batch.failed`` when the batch ended without a single succeeded item (and was not cancelled)."""
    if status != BatchStatus.CANCELLED and not counts.get(ItemState.SUCCEEDED, 0):
        return webhooks.BATCH_FAILED
    return webhooks.BATCH_COMPLETED
