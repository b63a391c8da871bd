"""Verify the audit chain: recompute every hash in seq order, in constant memory.

Detection is exact: any change to a row (content, seq, prev_hash, hash), a missing row, a forged
row or a chain head that disagrees with the rows makes the result not ok. Locating and naming the
damage is best effort, from local evidence:

- ``edited``: the row's content no longer gives its stored hash (or its hash was recomputed, so
  the next row no longer chains to it);
- ``deleted``: a gap in seq where the next row does not chain to the one before the gap, or rows
  missing at the end (the chain head records more);
- ``inserted``: a row the chain skips (the next row chains to the one before it), or a row past
  the chain head that no writer recorded;
- ``reordered``: a row whose hash verifies under another seq than the one it now has (it was
  moved or renumbered); consecutive rows moved by the same offset are reported as one range;
- ``anchor_mismatch`` / ``anchor_missing``: an anchored (seq, hash) in write-once storage that
  the chain no longer holds; this is what catches a chain rewritten with recomputed hashes.

Memory stays flat: the walk keeps the previous row, one row of lookahead, a bounded window of
recent hashes (to recognise where a moved row came from) and at most ``MAX_PROBLEMS`` problems.
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, Engine, select

from core.audit.chain import CHAIN_HEAD_ID, GENESIS_HASH, EventFields, event_hash
from models import AuditChainHead, AuditEvent

MAX_PROBLEMS = 1_000
SEQ_SEARCH = 16          # how far around its seq a moved row's original seq is searched
RECENT_HASHES = 4_096    # window used to find the original seq of a row moved backwards
STREAM_ROWS = 2_000

EVENT_COLUMNS = (
    AuditEvent.seq, AuditEvent.ts, AuditEvent.actor, AuditEvent.action, AuditEvent.batch_id,
    AuditEvent.item_id, AuditEvent.image_id, AuditEvent.payload, AuditEvent.prev_hash, AuditEvent.hash,
)


@dataclass
class Problem:
    seq: int
    kind: str
    detail: str
    last_seq: int | None = None
    offset: int | None = field(default=None, repr=False)  # for merging runs of moved rows

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"seq": self.seq, "kind": self.kind, "detail": self.detail}
        if self.last_seq is not None and self.last_seq != self.seq:
            body["last_seq"] = self.last_seq
        return body


@dataclass
class VerifyResult:
    ok: bool
    events: int
    head: str
    head_seq: int
    anchors: int
    problems: list[Problem]
    problems_total: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "events": self.events, "head": self.head, "head_seq": self.head_seq,
            "anchors": self.anchors, "problems": [p.as_dict() for p in self.problems],
            "problems_total": self.problems_total,
        }

    def summary(self) -> str:
        return (f"RESULT ok={str(self.ok).lower()} events={self.events} head={self.head} "
                f"anchors={self.anchors} problems={self.problems_total}")


@dataclass
class _Link:
    """The last row accepted into the chain: its current seq, the seq it was recorded with, its hash."""
    seq: int
    recorded_seq: int
    hash: str
    moved: bool = False


class ChainWalker:
    """Feed rows in seq order (``feed``), then ``finish``. Reusable for a segment after an anchor.

    ``head_seq=None``: the head is unknown (an exported file), so its last event is taken as the head.
    """

    def __init__(self, head_seq: int | None, head_hash: str | None, anchors: Mapping[int, str] | None = None,
                 *, start_seq: int = 0, start_hash: str = GENESIS_HASH):
        self.head_seq, self.head_hash = head_seq, head_hash
        self.anchors = dict(anchors or {})
        self.anchors_checked = 0
        self.events = 0
        self.problems: list[Problem] = []
        self.problems_total = 0
        self._prev = _Link(start_seq, start_seq, start_hash)
        self._pending: EventFields | None = None
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._started = time.perf_counter()

    def feed(self, row: EventFields) -> None:
        if self._pending is not None:
            self._judge(self._pending, row)
        self._pending = row

    def finish(self) -> VerifyResult:
        if self._pending is not None:
            self._judge(self._pending, None)
            self._pending = None
        self._check_tail()
        for seq in sorted(self.anchors):
            self._add(Problem(seq, "anchor_missing", f"anchored event seq {seq} (hash {self.anchors[seq]}) "
                                                     "is not in the chain"))
        return VerifyResult(
            ok=self.problems_total == 0, events=self.events, head=self._prev.hash, head_seq=self._prev.recorded_seq,
            anchors=self.anchors_checked + len(self.anchors), problems=self.problems,
            problems_total=self.problems_total, seconds=time.perf_counter() - self._started,
        )

    # -- judging one row, knowing the next one ------------------------------------------------

    def _judge(self, row: EventFields, following: EventFields | None) -> None:
        self.events += 1
        prev = self._prev
        recorded = self._recorded_seq(row)
        if self.head_seq is not None and (recorded if recorded is not None else row.seq) > self.head_seq:
            self._add(Problem(row.seq, "inserted", f"after the chain head (seq {self.head_seq}): "
                                                   "not written through the chain head"))
            return
        skipped = following is not None and following.prev_hash == prev.hash
        if recorded is None:
            if row.prev_hash != prev.hash and skipped:
                self._add(Problem(row.seq, "inserted", f"forged: not chained to seq {prev.seq}, "
                                                       f"and seq {following.seq} chains past it"))
                return
            self._add(Problem(row.seq, "edited", "its content no longer gives its stored hash"))
            self._accept(row, row.seq)
            return
        if recorded != row.seq:
            self._add_moved(row.seq, recorded)
            self._accept(row, recorded, moved=True)
            return
        if skipped:
            self._add(Problem(row.seq, "inserted", f"seq {following.seq} chains to seq {prev.seq}, past this row"))
            return
        if row.prev_hash != prev.hash and not prev.moved:
            self._report_broken_link(prev, row)
        self._accept(row, recorded)

    def _report_broken_link(self, prev: _Link, row: EventFields) -> None:
        if row.seq > prev.seq + 1:
            first, last = prev.seq + 1, row.seq - 1
            span = f"seq {first}" if first == last else f"seq {first}..{last}"
            self._add(Problem(first, "deleted", f"{span} missing: seq {row.seq} chains to an event that is gone",
                              last_seq=last))
        elif not self._reported(prev.seq, "edited"):
            self._add(Problem(prev.seq, "edited", f"rewritten with a recomputed hash: seq {row.seq} "
                                                  "chained to a different hash"))

    def _accept(self, row: EventFields, recorded: int, *, moved: bool = False) -> None:
        self._prev = _Link(row.seq, recorded, row.hash, moved)
        self._remember(row.hash, recorded)
        anchored = self.anchors.pop(recorded, None)
        if anchored is not None:
            self.anchors_checked += 1
            if anchored != row.hash:
                self._add(Problem(recorded, "anchor_mismatch",
                                  f"anchored hash {anchored} but the chain holds {row.hash}: "
                                  "the chain was rewritten from here or earlier"))

    # -- where a row was first recorded ----------------------------------------------------------

    def _recorded_seq(self, row: EventFields) -> int | None:
        """The seq under which the row's stored hash verifies; None if under none we try (edited)."""
        if event_hash(row.prev_hash, row) == row.hash:
            return row.seq
        for candidate in self._seq_candidates(row):
            if candidate >= 1 and event_hash(row.prev_hash, row, candidate) == row.hash:
                return candidate
        return None

    def _seq_candidates(self, row: EventFields) -> Iterator[int]:
        parent = self._recent.get(row.prev_hash)
        if parent is not None:
            yield parent + 1
        yield self._prev.recorded_seq + 1
        for distance in range(1, SEQ_SEARCH + 1):
            yield row.seq - distance
            yield row.seq + distance

    def _remember(self, row_hash: str, recorded: int) -> None:
        self._recent[row_hash] = recorded
        if len(self._recent) > RECENT_HASHES:
            self._recent.popitem(last=False)

    # -- the end of the chain ------------------------------------------------------------------

    def _check_tail(self) -> None:
        last = self._prev
        if self.head_seq is None or (last.recorded_seq == self.head_seq and last.hash == self.head_hash):
            return
        if last.recorded_seq < self.head_seq:
            first = last.recorded_seq + 1
            span = f"seq {first}" if first == self.head_seq else f"seq {first}..{self.head_seq}"
            self._add(Problem(first, "deleted", f"{span} missing at the end: the chain head records "
                                                f"seq {self.head_seq}", last_seq=self.head_seq))
        else:
            self._add(Problem(last.seq, "edited", f"the chain head records hash {self.head_hash} for "
                                                  f"seq {self.head_seq}, the row holds {last.hash}"))

    # -- collecting problems in bounded memory ------------------------------------------------

    def _add_moved(self, seq: int, recorded: int) -> None:
        offset = recorded - seq
        last = self.problems[-1] if self.problems else None
        if last and last.kind == "reordered" and last.offset == offset and last.last_seq == seq - 1:
            last.last_seq = seq
            last.detail = f"seq {last.seq}..{seq} were recorded as seq {last.seq + offset}..{recorded}"
            return
        self._add(Problem(seq, "reordered", f"recorded as seq {recorded}", last_seq=seq, offset=offset))

    def _reported(self, seq: int, kind: str) -> bool:
        return bool(self.problems) and (self.problems[-1].seq, self.problems[-1].kind) == (seq, kind)

    def _add(self, problem: Problem) -> None:
        self.problems_total += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)


# -- reading the chain from the ledger ---------------------------------------------------------

@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A read-only connection that sees one consistent state for the whole walk.

    PostgreSQL: a REPEATABLE READ transaction. SQLite (WAL): an explicit BEGIN, so every SELECT
    reads the same snapshot even while writers commit.
    """
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
        elif engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN")
        try:
            yield conn
        finally:
            conn.rollback()


def read_head(conn: Connection) -> tuple[int, str]:
    row = conn.execute(
        select(AuditChainHead.last_seq, AuditChainHead.last_hash).where(AuditChainHead.id == CHAIN_HEAD_ID)
    ).one()
    return int(row.last_seq), row.last_hash


def stream_rows(conn: Connection, after_seq: int | None = None, through_seq: int | None = None) -> Iterable[Any]:
    """Rows in seq order through a server-side cursor (PostgreSQL) / stepping cursor (SQLite)."""
    query = select(*EVENT_COLUMNS).order_by(AuditEvent.seq)
    if after_seq is not None:
        query = query.where(AuditEvent.seq > after_seq)
    if through_seq is not None:
        query = query.where(AuditEvent.seq <= through_seq)
    return conn.execution_options(yield_per=STREAM_ROWS).execute(query)


def verify_export(lines: Iterable[str | bytes], anchors: Mapping[int, str] | None = None) -> VerifyResult:
    """Verify a complete JSON Lines export (no filters) on its own, without access to the ledger.

    It proves the file is one unbroken chain from the genesis hash to its last event, and matches
    the given anchors; it cannot tell whether events after the export's end are missing.
    """
    walker = ChainWalker(None, None, anchors)
    for line in lines:
        if line.strip():
            event = json.loads(line)
            event["ts"] = datetime.fromisoformat(event["ts"])
            walker.feed(SimpleNamespace(**event))  # type: ignore[arg-type]
    return walker.finish()


def verify_chain(engine: Engine, anchors: Mapping[int, str] | None = None) -> VerifyResult:
    """Walk the whole chain and compare it with the chain head row and the given anchors.

    Load the anchors *before* calling (``core.audit.anchors.load_anchors``): an anchor written after
    the snapshot began could name a seq the snapshot cannot see.
    """
    with snapshot(engine) as conn:
        head_seq, head_hash = read_head(conn)
        walker = ChainWalker(head_seq, head_hash, anchors)
        for row in stream_rows(conn):
            walker.feed(row)
        return walker.finish()
