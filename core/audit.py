"""The audit trail: an append-only hash chain in the ledger.

Each event's ``hash = sha256(prev_hash || canonical JSON of the event)``. Writers first bump the
single chain-head row, which takes the write lock (a row lock on PostgreSQL, the database lock on
SQLite) before they read the previous hash, so concurrent writers always form one linear chain.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from models import AuditChainHead, AuditEvent, utcnow

GENESIS_HASH = "0" * 64
CHAIN_HEAD_ID = 1


def _utc_naive_iso(ts: datetime) -> str:
    # SQLite hands datetimes back without a zone, PostgreSQL with one: hash the same text for both.
    if ts.tzinfo is not None:
        ts = ts.astimezone(timezone.utc).replace(tzinfo=None)
    return ts.isoformat(timespec="microseconds")


def canonical_event(event: AuditEvent) -> bytes:
    body = {
        "seq": event.seq,
        "ts": _utc_naive_iso(event.ts),
        "actor": event.actor,
        "action": event.action,
        "batch_id": event.batch_id,
        "item_id": event.item_id,
        "image_id": event.image_id,
        "payload": event.payload,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def event_hash(prev_hash: str, event: AuditEvent) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical_event(event)).hexdigest()


def to_jsonable(payload: dict[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON so the hashed payload is exactly what the database gives back."""
    return json.loads(json.dumps(payload, default=str))


def record(
    session: Session,
    action: str,
    *,
    actor: str,
    payload: dict[str, Any] | None = None,
    batch_id: str | None = None,
    item_id: str | None = None,
    image_id: str | None = None,
) -> AuditEvent:
    """Append one event to the chain inside the caller's transaction."""
    seq, prev_hash = session.execute(
        update(AuditChainHead)
        .where(AuditChainHead.id == CHAIN_HEAD_ID)
        .values(last_seq=AuditChainHead.last_seq + 1)
        .returning(AuditChainHead.last_seq, AuditChainHead.last_hash)
    ).one()
    event = AuditEvent(
        seq=seq,
        ts=utcnow(),
        actor=actor,
        action=action,
        batch_id=batch_id,
        item_id=item_id,
        image_id=image_id,
        payload=to_jsonable(payload or {}),
        prev_hash=prev_hash,
    )
    event.hash = event_hash(prev_hash, event)
    session.add(event)
    session.execute(
        update(AuditChainHead).where(AuditChainHead.id == CHAIN_HEAD_ID).values(last_hash=event.hash)
    )
    return event
