"""Read and export audit events: filtered pages (JSON) and streamed exports (JSON Lines, CSV).

Exports stream through a server-side cursor in constant memory, whatever the number of events.
An export is itself an audited act: :func:`record_export` writes ``audit.exported`` with the
filters, and the export covers the chain up to and including that event, so what was handed out
can be reproduced later from the ledger.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, Select, select
from sqlalchemy.orm import Session

from core.audit import chain as audit
from core.audit.verify import EVENT_COLUMNS
from models import AuditEvent
from models.base import as_utc

FORMATS = ("json", "jsonl", "csv")
CSV_COLUMNS = ("seq", "ts", "actor", "action", "batch_id", "item_id", "image_id", "payload", "prev_hash", "hash")
STREAM_ROWS = 2_000
FLUSH_BYTES = 64 * 1024


@dataclass(frozen=True)
class EventFilter:
    since: datetime | None = None     # inclusive
    until: datetime | None = None     # exclusive
    batch_id: str | None = None
    actor: str | None = None
    action: str | None = None
    after_seq: int | None = None      # the JSON pages' cursor
    through_seq: int | None = None    # an export's upper bound: its own audit.exported event

    def __post_init__(self) -> None:
        # Compare in UTC on both databases (SQLite stores UTC wall time without a zone).
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_utc(value))

    def described(self) -> dict[str, Any]:
        """The filters as recorded in the export's audit event (no paging fields)."""
        body = asdict(self)
        for name in ("after_seq", "through_seq"):
            body.pop(name)
        return {name: (value.isoformat() if isinstance(value, datetime) else value)
                for name, value in body.items() if value is not None}


def event_query(f: EventFilter) -> Select:
    query = select(*EVENT_COLUMNS).order_by(AuditEvent.seq)
    if f.since is not None:
        query = query.where(AuditEvent.ts >= f.since)
    if f.until is not None:
        query = query.where(AuditEvent.ts < f.until)
    for column, value in ((AuditEvent.batch_id, f.batch_id), (AuditEvent.actor, f.actor),
                          (AuditEvent.action, f.action)):
        if value is not None:
            query = query.where(column == value)
    if f.after_seq is not None:
        query = query.where(AuditEvent.seq > f.after_seq)
    if f.through_seq is not None:
        query = query.where(AuditEvent.seq <= f.through_seq)
    return query


def utc_iso(ts: datetime) -> str:
    if ts.tzinfo is not None:
        ts = ts.astimezone(timezone.utc).replace(tzinfo=None)
    return ts.isoformat(timespec="microseconds") + "Z"


def event_dict(row: Any) -> dict[str, Any]:
    return {
        "seq": row.seq, "ts": utc_iso(row.ts), "actor": row.actor, "action": row.action,
        "batch_id": row.batch_id, "item_id": row.item_id, "image_id": row.image_id,
        "payload": row.payload, "prev_hash": row.prev_hash, "hash": row.hash,
    }


def read_page(session: Session, event_filter: EventFilter, limit: int) -> tuple[list[dict[str, Any]], int | None]:
    """One page of events after the cursor; returns the events and the next cursor (None at the end)."""
    rows = session.execute(event_query(event_filter).limit(limit + 1)).all()
    more = len(rows) > limit
    events = [event_dict(row) for row in rows[:limit]]
    return events, (events[-1]["seq"] if more else None)


def iter_rows(engine: Engine, event_filter: EventFilter) -> Iterator[Any]:
    """Matching rows on a connection of their own, fetched ``STREAM_ROWS`` at a time."""
    with engine.connect() as conn:
        yield from conn.execution_options(yield_per=STREAM_ROWS).execute(event_query(event_filter))


def stream_export(engine: Engine, event_filter: EventFilter, fmt: str) -> Iterator[bytes]:
    """The export as byte chunks of about ``FLUSH_BYTES``: JSON Lines, CSV (header first) or one
    JSON array, written as it goes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n") if fmt == "csv" else None
    if writer:
        writer.writerow(CSV_COLUMNS)
    elif fmt == "json":
        buffer.write("[")
    for n, row in enumerate(iter_rows(engine, event_filter)):
        event = event_dict(row)
        if writer:
            event["payload"] = json.dumps(event["payload"], sort_keys=True, ensure_ascii=False)
            writer.writerow([event[column] for column in CSV_COLUMNS])
        else:
            buffer.write(("" if fmt == "jsonl" or n == 0 else ",") + json.dumps(event, ensure_ascii=False) + "\n")
        if buffer.tell() >= FLUSH_BYTES:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    if fmt == "json":
        buffer.write("]\n")
    if buffer.tell():
        yield buffer.getvalue().encode()


def record_export(session: Session, *, actor: str, fmt: str, event_filter: EventFilter) -> EventFilter:
    """Write the ``audit.exported`` event; returns the filter bounded by it. The caller commits."""
    event = audit.record(session, audit.AUDIT_EXPORTED, actor=actor,
                         payload={"format": fmt, "filters": event_filter.described()})
    session.flush()
    return replace(event_filter, through_seq=event.seq)
