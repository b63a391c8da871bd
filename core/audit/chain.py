"""The audit trail: an append-only hash chain in the ledger.

Each event's ``hash = sha256(prev_hash || canonical JSON of the event)``. Writers first bump the
single chain-head row, which takes the write lock (a row lock on PostgreSQL, the database lock on
SQLite) before they read the previous hash, so concurrent writers always form one linear chain.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any, Protocol

from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from models import AuditChainHead, AuditEvent, utcnow

GENESIS_HASH = "0" * 64
CHAIN_HEAD_ID = 1
BULK_INSERT_ROWS = 5_000


# The writers name their own actions (docs/compliance.md lists them); this module writes only this one.
AUDIT_EXPORTED = "audit.exported"


class EventFields(Protocol):
    """What the hash covers; an ORM ``AuditEvent`` and a Core result row both qualify."""
    seq: int
    ts: datetime
    actor: str
    action: str
    batch_id: str | None
    item_id: str | None
    image_id: str | None
    payload: Any


def _utc_naive_iso(ts: datetime) -> str:
    # SQLite hands datetimes back without a zone, PostgreSQL with one: hash the same text for both.
    if ts.tzinfo is not None:
        ts = ts.astimezone(timezone.utc).replace(tzinfo=None)
    return ts.isoformat(timespec="microseconds")


def canonical_event(event: EventFields, seq: int | None = None) -> bytes:
    """The bytes the hash covers. ``seq`` overrides the event's own (the verifier uses it to find
    where a renumbered row was first recorded)."""
    body = {
        "seq": event.seq if seq is None else seq,
        "ts": _utc_naive_iso(event.ts),
        "actor": event.actor,
        "action": event.action,
        "batch_id": event.batch_id,
        "item_id": event.item_id,
        "image_id": event.image_id,
        "payload": canonical_numbers(event.payload),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def canonical_numbers(value: Any) -> Any:
    """Floats with an integral value become ints (3.0 -> 3, 1e20 -> 100000000000000000000, -0.0 -> 0).

    PostgreSQL's jsonb keeps numbers as decimals and gives 1e20 back as 100000000000000000000 and
    -0.0 as 0.0, so the hash must not depend on how an integral number was spelled. Other floats
    come back as the same double (jsonb keeps the shortest round-trip decimal that Python writes).
    """
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {key: canonical_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [canonical_numbers(item) for item in value]
    return value


def event_hash(prev_hash: str, event: EventFields, seq: int | None = None) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical_event(event, seq)).hexdigest()


def to_jsonable(payload: dict[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON so the hashed payload is what the database gives back. NaN and the
    infinities, which JSON (and jsonb) cannot hold, become the strings "NaN", "Infinity", "-Infinity"."""
    return json.loads(json.dumps(payload, default=str), parse_constant=str)


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
    seq, prev_hash = _reserve(session, 1)
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
    _set_head_hash(session, event.hash)
    return event


def record_many(session: Session, events: Iterable[Mapping[str, Any]]) -> int:
    """Append many events in one transaction with one chain-head lock and bulk inserts.

    Each mapping has ``action``, ``actor`` and optionally ``payload``, ``batch_id``, ``item_id``,
    ``image_id`` and ``ts``. Returns how many were written.
    """
    pending = list(events)
    if not pending:
        return 0
    last_seq, prev_hash = _reserve(session, len(pending))
    seq = last_seq - len(pending)
    rows: list[dict[str, Any]] = []
    for event in pending:
        seq += 1
        row = {
            "seq": seq, "ts": event.get("ts") or utcnow(), "actor": event["actor"], "action": event["action"],
            "batch_id": event.get("batch_id"), "item_id": event.get("item_id"),
            "image_id": event.get("image_id"), "payload": to_jsonable(event.get("payload") or {}),
            "prev_hash": prev_hash,
        }
        row["hash"] = prev_hash = _hash_mapping(row)
        rows.append(row)
        if len(rows) == BULK_INSERT_ROWS:
            session.execute(insert(AuditEvent), rows)
            rows = []
    if rows:
        session.execute(insert(AuditEvent), rows)
    _set_head_hash(session, prev_hash)
    return len(pending)


def _hash_mapping(row: Mapping[str, Any]) -> str:
    return event_hash(row["prev_hash"], SimpleNamespace(**row))  # type: ignore[arg-type]


def _reserve(session: Session, count: int) -> tuple[int, str]:
    """Bump the chain head by ``count`` seqs; returns (last reserved seq, hash before them).

    The UPDATE takes the row lock (PostgreSQL) or the write lock (SQLite) until commit, which is
    what serializes writers.
    """
    last_seq, prev_hash = session.execute(
        update(AuditChainHead)
        .where(AuditChainHead.id == CHAIN_HEAD_ID)
        .values(last_seq=AuditChainHead.last_seq + count)
        .returning(AuditChainHead.last_seq, AuditChainHead.last_hash)
    ).one()
    return last_seq, prev_hash


def _set_head_hash(session: Session, head_hash: str) -> None:
    session.execute(update(AuditChainHead).where(AuditChainHead.id == CHAIN_HEAD_ID).values(last_hash=head_hash))
